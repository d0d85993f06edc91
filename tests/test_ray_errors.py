"""Ray trouble the user can meet, said in words through the CLI: a bad --address, CPUs or GPUs the machine does
not have, a worker that does not see the store, a tile that fails on a worker. No traceback, nothing written."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.exceptions
from conftest import free_port

from mnkpipe import __version__
from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import prepare_store
from mnkpipe.pipeline.ray_session import explain, local_cpus, local_gpus, start_ray, stop_ray
from mnkpipe.workers.tile import CNTKSource, make_ray_worker

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


@pytest.fixture(scope="module")
def env(omniglot_root):
    return dict(os.environ, RAY_AUTH_MODE="disabled", MNKPIPE_DATA=str(omniglot_root), PYTHONPATH=str(REPO))


def compute(store, *options, env):
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", "compute-kernel", "--config", str(SMOKE),
                           "--store", str(store), "--no-progress", *map(str, options)], env=env,
                          capture_output=True, text=True, timeout=300)


def refused(r, store, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr
    assert not store.exists() and not Path(f"{store}.lock").exists()  # nothing was built


def test_an_address_where_no_cluster_answers_is_refused_at_once(env, tmp_path):
    """Today ray.init retries for minutes, then the run dies with a raw Ray error."""
    store, port = tmp_path / "s.zarr", free_port()
    t0 = time.time()
    r = compute(store, "--address", f"127.0.0.1:{port}", env=env)
    refused(r, store, f"no Ray cluster answers at --address 127.0.0.1:{port}", "ray start --head")
    assert time.time() - t0 < 60


def test_address_auto_joins_only_a_cluster_started_with_ray_start(env, tmp_path):
    """`auto` never falls back to another user's private instance found among the host's processes."""
    store = tmp_path / "s.zarr"
    no_cluster = dict(env, RAY_TMPDIR=tempfile.mkdtemp(prefix="mnkauto", dir="/tmp"))
    no_cluster.pop("RAY_ADDRESS", None)
    refused(compute(store, "--address", "auto", env=no_cluster), store, "--address auto found no cluster")


def test_cpus_and_gpus_the_machine_lacks_are_refused_before_anything_is_built(env, tmp_path):
    store = tmp_path / "s.zarr"
    # --cpus 0 and --cpus -1 are refused by click itself (tests/test_inputs.py)
    n = local_cpus()
    refused(compute(store, "--cpus", n + 1, env=env), store, f"--cpus {n + 1} is more than the {n} CPUs")
    g = local_gpus()
    refused(compute(store, "--gpus", g + 1, env=env), store, f"--gpus {g + 1} asked for", f"has {g} usable GPUs")


def test_a_worker_that_does_not_see_the_store_or_runs_another_version_names_its_node(tmp_path, omniglot_root):
    store = prepare_store(load_config(SMOKE), tmp_path / "s.zarr", data=str(omniglot_root))
    started = start_ray(None, cpus=1)
    try:
        worker = make_ray_worker()
        node = ray.get_runtime_context().get_node_id()
        ours = store.manifest["fingerprint"]
        for path, fingerprint, version, words in [
                (tmp_path / "elsewhere.zarr", ours, __version__, "cannot open the store at"),
                (store.path, "another experiment", __version__, "sees another store at"),
                (store.path, ours, "0.0.1", f"runs mnkpipe {__version__}, the driver 0.0.1")]:
            w = worker.options(num_cpus=1).remote(CNTKSource(path, fingerprint), str(path), "gram", version, "cpu", 1)
            with pytest.raises(ray.exceptions.RayTaskError) as e:
                ray.get(w.run.remote(0, 0))
            message = explain(e.value)
            assert words in message and node in message, message
            if version == __version__:
                assert str(path) in message and "the store must be on a filesystem every node can see" in message
            ray.kill(w)
    finally:
        if started:
            stop_ray()


def test_a_tile_that_fails_on_a_worker_is_a_clear_error(env, tmp_path, omniglot_root):
    store = prepare_store(load_config(SMOKE), tmp_path / "s.zarr", data=str(omniglot_root))
    (store.path / "gram" / "c").write_text("a file where the tiles' folder goes: writing any tile fails")
    r = compute(store.path, "--cpus", "1", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Error: a worker failed:" in r.stderr and "rerun the same command" in r.stderr, r.stderr
    assert not Path(f"{store.path}.lock").exists()
