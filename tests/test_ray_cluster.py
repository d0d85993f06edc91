"""A real two-node Ray cluster (started with `ray start --block` on free ports and a private temp dir, so that its
processes are descendants of ours, and stopped by pid): joined on purpose with --address, never joined without it."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import free_port, kill_processes, ray_processes

from mnkpipe.kernels import cntk
from mnkpipe.pipeline.inspect import store_status
from mnkpipe.store import open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
RAY = str(Path(sys.executable).parent / "ray")


def cli(*args, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def start_node(cmd: list[str], env, log: Path) -> psutil.Process:
    """Run cmd, a `ray start ... --block`, in the background and return its process once the node is up: its GCS,
    raylet and their workers are its descendants, found by pid (ray_processes), never by name or command line."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            if p.poll() is None:
                kill_processes(ray_processes([psutil.Process(p.pid)]))
            raise RuntimeError(f"ray start failed:\n{log.read_text()}")
        time.sleep(0.2)
    return psutil.Process(p.pid)


def node_ids(nodes) -> set[str]:
    """The Ray node ids of the processes started by start_node (their raylets carry --node_id=...)."""
    ids = set()
    for p in ray_processes(nodes):
        try:
            ids |= {a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id=")}
        except psutil.NoSuchProcess:
            pass
    return ids


@pytest.fixture(scope="module")
def env(omniglot_root):
    return dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", MNKPIPE_DATA=str(omniglot_root),
                PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def cluster(env):
    """A head and a second node, one CPU each, on this machine: (address, their `ray start` processes)."""
    temp_dir = tempfile.mkdtemp(prefix="mnkray", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
              f"--dashboard-agent-listen-port={free_port()}"]
    nodes = []
    try:
        head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common, "--block"]
        nodes.append(start_node(head, env, Path(temp_dir) / "head.log"))
        nodes.append(start_node([RAY, "start", f"--address=127.0.0.1:{port}", *common, "--block"], env,
                                Path(temp_dir) / "node.log"))
        yield f"127.0.0.1:{port}", nodes
    finally:
        kill_processes(ray_processes(nodes))  # by pid only: other users' Ray jobs live on this machine too


def smoke_gram_is_right(store) -> None:
    st = open_store(store)
    g = st.read_gram()
    done = np.isfinite(g)
    assert done.any() and np.array_equal(g[done], cntk(st.images(), depth=3, backend="cpu")[done])


def test_two_node_ray_cluster_with_a_relative_store_path(cluster, env, tmp_path):
    """Today a relative --store reaches the workers as is, and every --address run dies with an ActorDiedError."""
    address, _ = cluster
    store = tmp_path / "cluster.zarr"
    r = cli("compute-kernel", "--config", SMOKE, "--store", "cluster.zarr", "--address", address, "--no-progress",
            env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    nodes = {w["node"] for w in store_status(store)["workers"].values()}
    assert len(nodes) == 2, nodes
    smoke_gram_is_right(store)


def test_without_address_a_private_instance_even_beside_a_cluster(cluster, env, tmp_path):
    """RAY_ADDRESS and the host's `ray start` cluster are ignored without --address (today: refused or joined)."""
    address, nodes = cluster
    store = tmp_path / "private.zarr"
    ray_tmp = tempfile.mkdtemp(prefix="mnkpriv", dir="/tmp")
    r = cli("compute-kernel", "--config", SMOKE, "--store", store, "--cpus", "1", "--no-progress",
            env=dict(env, RAY_ADDRESS=address, RAY_TMPDIR=ray_tmp))
    assert r.returncode == 0, r.stderr
    # it ran in a session of its own and did not make itself the host's "current" cluster for plain ray.init()
    assert (Path(ray_tmp) / "ray" / "session_latest").exists()
    assert not (Path(ray_tmp) / "ray" / "ray_current_cluster").exists()
    used = {w["node"] for w in store_status(store)["workers"].values()}
    assert len(used) == 1 and not used & node_ids(nodes), (used, node_ids(nodes))
    smoke_gram_is_right(store)


def test_cpus_beyond_the_cluster_are_refused_before_anything_is_built(cluster, env, tmp_path):
    address, _ = cluster
    r = cli("compute-kernel", "--config", SMOKE, "--store", tmp_path / "s.zarr", "--address", address, "--cpus", 3,
            "--no-progress", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"--cpus 3 is more than the 2 CPUs of the Ray cluster at {address}" in r.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_a_node_that_does_not_see_the_store_is_named_in_a_clear_error(cluster, env, tmp_path):
    """A third node in a mount namespace of its own, where the store's folder is an empty tmpfs."""
    address, _ = cluster
    hidden = Path(tempfile.mkdtemp(prefix="mnkhidden", dir="/tmp"))
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root or user namespaces) to give a node its own view of the filesystem")
    node_tmp = tempfile.mkdtemp(prefix="mnkray", dir="/tmp")
    start = (f"mount -t tmpfs none {hidden} && exec {RAY} start --address={address} --num-cpus=1 "
             f"--disable-usage-stats --temp-dir={node_tmp} --dashboard-agent-listen-port={free_port()} --block")
    node = start_node(["unshare", "-m", "--propagation", "private", "sh", "-c", start], env,
                      Path(node_tmp) / "node.log")
    try:
        (node_id,) = node_ids([node])
        store = hidden / "s.zarr"
        r = cli("compute-kernel", "--config", SMOKE, "--store", store, "--address", address, "--no-progress", env=env)
    finally:
        kill_processes(ray_processes([node]))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"the worker on node {node_id}" in r.stderr and str(store) in r.stderr, r.stderr
    assert "the store must be on a filesystem every node can see" in r.stderr
    assert not Path(f"{store}.lock").exists()
