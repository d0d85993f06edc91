"""A Gram store on S3: compute-kernel, status and verify [--repair] against a real SeaweedFS server
(tests/support/seaweed.py), with real Ray workers, a real SIGKILL of the driver, and a local-disk run to compare."""

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import obstore
import pytest
from conftest import free_port, kill_processes, ray_processes
from test_compute import fault_config, kill_group, wait_for
from test_ray_cluster import RAY, node_ids, start_node

from mnkpipe.pipeline.driver import compute_kernel
from mnkpipe.pipeline.executors import LocalExecutor
from mnkpipe.pipeline.inspect import store_status, verify_store
from mnkpipe.store import CREATION_MARKER, StoreError, open_store
from mnkpipe.store.location import ObjectLock, object_store, parse_location
from mnkpipe.workers.tile import CNTKSource, StoreNotShared, TileComputer
from support.naive_s3 import start_naive_s3
from support.seaweed import commands_env, start_seaweed

BUCKET = "mnkpipe-test"
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


@pytest.fixture(scope="module")
def s3():
    server = start_seaweed(bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(s3, omniglot_root):
    """The environment of the commands (the S3 server's AWS variables), also set in this process while the module
    runs."""
    with commands_env(s3, MNKPIPE_DATA=str(omniglot_root)) as env:
        yield env


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def start_driver(env, config, store) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnkpipe.cli", "compute-kernel", "--config", str(config),
                             "--store", str(store), "--cpus", "2", "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def tiles_done(store) -> int:
    try:
        return store_status(store)["tiles_done"]
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, env):
    """The slow-tile experiment computed uninterrupted into a local folder: (config, Gram)."""
    tmp = tmp_path_factory.mktemp("s3store")
    cfg = fault_config(tmp)
    r = cli(env, "compute-kernel", "--config", cfg, "--store", tmp / "local.zarr", "--cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    return cfg, open_store(tmp / "local.zarr").read_gram()


def test_driver_sigkilled_mid_job_on_s3_then_rerun_gives_the_local_disk_gram(env, local_run):
    cfg, gram = local_run
    url = f"s3://{BUCKET}/runs/killed.zarr"
    p = start_driver(env, cfg, url)
    try:
        assert wait_for(lambda: tiles_done(url) >= 2, timeout=180), "no tile written"
    finally:
        kill_group(p)
    done = tiles_done(url)
    assert 0 < done < 20, done
    assert ObjectLock(parse_location(url)).owner()["pid"] == p.pid  # the killed driver's lock is left behind
    r = cli(env, "status", url)
    assert r.returncode == 0 and f"{done} / 20 done" in r.stdout and f"pid {p.pid}" in r.stdout, r.stdout
    assert "NOT running: stale lock" in r.stdout, r.stdout
    r = cli(env, "compute-kernel", "--config", cfg, "--store", url, "--cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    computed, skipped = map(int, re.search(r"(\d+) tiles computed, (\d+) already done", r.stdout).groups())
    assert skipped == done and computed == 20 - done
    assert np.array_equal(open_store(url).read_gram(), gram, equal_nan=True)  # bit for bit
    assert verify_store(url)["bad"] == [] and ObjectLock(parse_location(url)).owner() is None


def test_two_drivers_racing_for_the_s3_lock_exactly_one_runs(env, local_run):
    cfg, gram = local_run
    url = f"s3://{BUCKET}/runs/raced.zarr"
    procs = [start_driver(env, cfg, url) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = outs[[p.returncode for p in procs].index(codes[1])]
    assert "being computed by another driver" in loser and "Traceback" not in loser, loser
    assert np.array_equal(open_store(url).read_gram(), gram, equal_nan=True)


@pytest.fixture(scope="module")
def smoke_url(env) -> str:
    """The smoke experiment computed into S3 by the command line."""
    url = f"s3://{BUCKET}/runs/smoke.zarr"
    r = cli(env, "compute-kernel", "--config", SMOKE, "--store", url, "--cpus", "2", "--no-progress")
    assert r.returncode == 0 and "59 tiles computed" in r.stdout, r.stderr
    return url


def test_status_verify_and_repair_on_s3(env, smoke_url):
    url = smoke_url
    store = open_store(url)
    gram, tiles = store.read_gram(), store.planned_tiles()
    r = cli(env, "status", url)
    assert r.returncode == 0 and "59 / 59 done" in r.stdout and url in r.stdout, r.stderr
    objects, (a, b) = object_store(parse_location(url)), (tiles[1], tiles[-1])
    obstore.put(objects, f"gram/c/{a[0]}/{a[1]}", b"\0" * (8 * 8 * 8))  # a tile overwritten: same size, other bytes
    obstore.delete(objects, f"gram/c/{b[0]}/{b[1]}")  # a tile lost
    r = cli(env, "verify", url)
    assert r.returncode == 1 and f"BAD tile {a}" in r.stdout and f"BAD tile {b}" in r.stdout, r.stdout
    r = cli(env, "verify", "--repair", "--cpus", "2", url)
    assert r.returncode == 0 and "repaired: 2 tiles recomputed" in r.stdout, r.stdout + r.stderr
    assert cli(env, "verify", url).returncode == 0
    assert np.array_equal(open_store(url).read_gram(), gram, equal_nan=True)


def test_a_server_ignoring_conditional_writes_is_refused_and_nothing_is_written(env):
    server, endpoint = start_naive_s3()
    try:
        r = cli(dict(env, AWS_ENDPOINT_URL=endpoint), "compute-kernel", "--config", SMOKE,
                "--store", "s3://plain/runs/x.zarr", "--cpus", "1")
    finally:
        server.shutdown()
    assert r.returncode == 1 and "ignores conditional writes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert server.RequestHandlerClass.objects == {}


def test_an_unreachable_object_store_is_one_line_naming_the_url(env):
    bad = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens on the discard port
    for args in (["status", f"s3://{BUCKET}/runs/smoke.zarr"],
                 ["compute-kernel", "--config", SMOKE, "--store", f"s3://{BUCKET}/runs/y.zarr"]):
        r = cli(bad, *args)
        assert r.returncode == 1 and f"s3://{BUCKET}/runs/" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_worker_that_cannot_reach_the_store_names_its_host_and_the_url(smoke_url, monkeypatch):
    url = smoke_url
    fingerprint = open_store(url).manifest["fingerprint"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreNotShared, match=re.escape(url)) as e:
        TileComputer(CNTKSource(url, fingerprint), url)
    assert "AWS_ACCESS_KEY_ID" in str(e.value) and isinstance(e.value, StoreError)


def test_a_second_node_without_the_drivers_files_computes_into_s3(env, smoke_url, tmp_path):
    """A two-node Ray cluster whose second node runs in a mount namespace of its own, where the driver's working
    folder (its config, its files, the local copy of the results) is an empty tmpfs: the store and its results on S3
    are all the workers share, for the Gram and for evaluate's meta-kernel tiles. Then a third node joins with a
    wrong secret key: the next job stops with one line naming that node and the URL."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root or user namespaces) to give a node its own view of the filesystem")
    work = tmp_path / "driver"
    work.mkdir()
    shutil.copy(SMOKE, work / "smoke.toml")
    node_env = dict(env, PYTHONPATH=str(SMOKE.parents[1]))
    temp_dir = tempfile.mkdtemp(prefix="mnkray", dir="/tmp")  # short: Ray's socket paths live under it
    port, nodes = free_port(), []
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        nodes.append(start_node([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common,
                                 f"--dashboard-agent-listen-port={free_port()}", "--block"], node_env,
                                Path(temp_dir) / "head.log"))
        hidden = (f"mount -t tmpfs none {work} && exec {RAY} start --address=127.0.0.1:{port} {' '.join(common)} "
                  f"--dashboard-agent-listen-port={free_port()} --block")
        nodes.append(start_node(["unshare", "-m", "--propagation", "private", "sh", "-c", hidden], node_env,
                                Path(temp_dir) / "node.log"))
        (private_node,) = node_ids(nodes[1:])
        url = f"s3://{BUCKET}/runs/cluster.zarr"
        args = [sys.executable, "-m", "mnkpipe.cli", "compute-kernel", "--config", "smoke.toml", "--store", url,
                "--address", f"127.0.0.1:{port}", "--no-progress"]
        r = subprocess.run(args, env=node_env, cwd=work, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        used = {w["node"] for w in store_status(url)["workers"].values()}
        assert len(used) == 2 and private_node in used, (used, private_node)
        assert np.array_equal(open_store(url).read_gram(), open_store(smoke_url).read_gram(), equal_nan=True)
        # evaluate on the cluster: its local copy of the results (MNKPIPE_CACHE) is hidden from the private node
        # too, so that node's workers write their meta-kernel tiles into <store>-results on S3
        evaluate = ["evaluate", "--store", url, "--train-tasks", "4", "--seeds", "1", "--methods", "mnk",
                    "--phi-tile-size", "4", "--address", f"127.0.0.1:{port}", "--no-progress"]
        r = subprocess.run([sys.executable, "-m", "mnkpipe.cli", *evaluate], cwd=work, capture_output=True, text=True,
                           env=dict(node_env, MNKPIPE_CACHE=str(work / "cache")), timeout=600)
        assert r.returncode == 0, r.stderr
        (group,) = store_status(url)["meta_kernels"]
        assert group["tiles_done"] == group["tiles_total"] == 45, group
        assert private_node in {w["node"] for w in group["workers"].values()}, (group["workers"], private_node)
        nodes.append(start_node([RAY, "start", f"--address=127.0.0.1:{port}", *common,
                                 f"--dashboard-agent-listen-port={free_port()}", "--block"],
                                dict(node_env, AWS_SECRET_ACCESS_KEY="not-the-secret"), Path(temp_dir) / "bad.log"))
        (bad_node,) = node_ids(nodes[2:])
        bad_url = f"s3://{BUCKET}/runs/cluster-bad.zarr"
        r = subprocess.run([*args[:7], bad_url, *args[8:]], env=node_env, cwd=work, capture_output=True, text=True,
                           timeout=600)
    finally:
        kill_processes(ray_processes(nodes))  # by pid only
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"the worker on node {bad_node}" in r.stderr and bad_url in r.stderr, r.stderr
    assert "AWS_SECRET_ACCESS_KEY" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_read_only_credentials_status_and_verify_and_nothing_else(env, s3, smoke_url):
    objects = object_store(parse_location(smoke_url), prefix="")
    before = {o["path"]: o["e_tag"] for batch in obstore.list(objects) for o in batch}
    reader = dict(env, **s3.env("reader"))
    r = cli(reader, "status", smoke_url)
    assert r.returncode == 0 and "59 / 59 done" in r.stdout, r.stdout + r.stderr
    r = cli(reader, "verify", smoke_url)
    assert r.returncode == 0 and "59 done tiles checked, 0 bad" in r.stdout, r.stdout + r.stderr
    for args in (["verify", "--repair", "--cpus", "1", smoke_url],
                 ["compute-kernel", "--config", SMOKE, "--store", smoke_url, "--cpus", "1"]):
        r = cli(reader, *args)
        assert r.returncode == 1 and smoke_url in r.stderr and "PermissionDenied" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {o["path"]: o["e_tag"] for batch in obstore.list(objects) for o in batch} == before


@pytest.mark.parametrize("url", ["s3://ab/runs/x.zarr", "s3://My_Bucket/runs/x.zarr", "s3://-bucket/x.zarr"])
def test_a_bucket_name_s3_does_not_allow_is_refused_naming_it(url):
    """SeaweedFS takes objects into a bucket named `ab` but lists none of them back: status read 0 tiles done."""
    with pytest.raises(StoreError, match="bucket name"):
        parse_location(url)


def test_on_s3_only_an_interrupted_creation_is_rebuilt_and_other_objects_are_refused_untouched(env, omniglot_root):
    foreign, crashed = f"s3://{BUCKET}/runs/notes.zarr", f"s3://{BUCKET}/runs/crashed.zarr"
    obstore.put(object_store(parse_location(foreign)), "notes.txt", b"mine")
    with pytest.raises(StoreError, match="prefix not made by mnkpipe"):
        compute_kernel(SMOKE, foreign, data=str(omniglot_root), progress=False, executor=LocalExecutor())
    assert [o["path"] for b in obstore.list(object_store(parse_location(foreign))) for o in b] == ["notes.txt"]
    leftovers = object_store(parse_location(crashed))
    obstore.put(leftovers, CREATION_MARKER, b"")  # a creation killed after its first arrays
    obstore.put(leftovers, "images/c/0/0/0/0", b"half")
    s = compute_kernel(SMOKE, crashed, data=str(omniglot_root), progress=False, executor=LocalExecutor())
    assert s["tiles_computed"] == 59 and verify_store(crashed)["bad"] == []
    assert not open_store(crashed).storage.exists(CREATION_MARKER)
