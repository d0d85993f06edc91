"""The tiled Gram job with real Ray, real Zarr and real processes killed mid-run."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import kill_processes, kill_ray_tree

from mnkpipe.kernels import cntk
from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import compute_kernel, prepare_store, run_tiles
from mnkpipe.pipeline.inspect import store_status, verify_store
from mnkpipe.pipeline.ray_session import RayFailure
from mnkpipe.store import open_store

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")


def fault_config(tmp: Path, **changes) -> Path:
    """The smoke experiment with tiles slow enough to be killed in the middle: 20 tiles of up to 256 pairs of 16x16
    images at depth 36, about 0.3 s of one core each with the wavefront CPU kernel."""
    text = (REPO / "configs" / "smoke.toml").read_text()
    subs = {"image_size = 10": "image_size = 14", "pad = 12": "pad = 16", "depth = 3": "depth = 36",
            "tile_size = 8": "tile_size = 16"}
    subs.update(changes)
    for a, b in subs.items():
        text = text.replace(a, b)
    path = tmp / f"fault{len(changes)}.toml"
    path.write_text(text)
    return path


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def start_driver(config, store) -> subprocess.Popen:
    """The driver in a session of its own, with Ctrl-C's default handling even where this test runs in a background
    job of a script (which ignores SIGINT, and so would its children)."""
    return subprocess.Popen([sys.executable, "-m", "mnkpipe.cli", "compute-kernel", "--config", str(config),
                             "--store", str(store), "--cpus", "2", "--no-progress"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of the Ray instance it started (found by process tree and by their
    raylet's pid, never by name), as a crash of its machine would."""
    kill_ray_tree(p.pid)
    p.wait(timeout=30)


def worker_pids(store) -> list[int]:
    """Pids of the tile workers the driver recorded in the store's progress ("host:pid" each): this test's own."""
    try:
        return [int(w.rsplit(":", 1)[1]) for w in open_store(store).progress().get("workers", {})]
    except Exception:  # noqa: BLE001 - the store or its progress may not exist yet
        return []


def raylet_of(worker_pid: int) -> psutil.Process:
    """The raylet that started a worker: Ray records its pid in the worker's RAY_RAYLET_PID."""
    return psutil.Process(int(psutil.Process(worker_pid).environ()["RAY_RAYLET_PID"]))


def tiles_done(store) -> int:
    try:
        return store_status(store)["tiles_done"]
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0


def wait_for(cond, timeout=120, step=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, omniglot_root):
    os.environ["MNKPIPE_DATA"] = ENV["MNKPIPE_DATA"] = str(omniglot_root)
    return tmp_path_factory.mktemp("compute")


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run: (config, store path, full Gram)."""
    cfg = fault_config(workdir)
    store = workdir / "reference.zarr"
    r = cli("compute-kernel", "--config", cfg, "--store", store, "--cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    return cfg, store, open_store(store).read_gram()


def test_smoke_gram_equals_direct_cntk_and_resume_is_a_no_op(workdir):
    store = workdir / "smoke.zarr"
    s = compute_kernel(REPO / "configs" / "smoke.toml", store, cpus=2, progress=False)
    assert s["tiles_computed"] == s["tiles_planned"] > 0
    st = open_store(store)
    g = st.read_gram()
    k = cntk(st.images(), depth=3, backend="cpu")
    done = np.isfinite(g)
    assert np.array_equal(g[done], k[done])  # bit for bit: Ray workers and this process compile the kernel apart
    # the mnk plan covers train x all and each test task with itself, and skips test x test across tasks
    ep = st.episodes()
    train = np.unique(np.concatenate([ep.train.support.ravel(), ep.train.query.ravel()]))
    assert done[np.ix_(train, np.arange(st.n))].all()
    for s_, q in zip(ep.test.support, ep.test.query):
        t = np.concatenate([s_, q])
        assert done[np.ix_(t, t)].all()
    assert not done.all()
    assert np.array_equal(st.gram_block([0, 50, 3], [60, 2]), k[np.ix_([0, 50, 3], [60, 2])])
    s2 = compute_kernel(REPO / "configs" / "smoke.toml", store, cpus=2, progress=False)
    assert s2["tiles_computed"] == 0 and s2["tiles_skipped"] == s["tiles_planned"]
    r = cli("status", store)
    assert r.returncode == 0 and f"{s['tiles_planned']} / {s['tiles_planned']} done" in r.stdout


def test_worker_killed_mid_tile_job_finishes_identical(workdir, reference):
    cfg, _, gram = reference
    store = workdir / "killworker.zarr"
    p = start_driver(cfg, store)
    try:
        assert wait_for(lambda: worker_pids(store)), "no worker recorded"
        victim = psutil.Process(worker_pids(store)[0])
        assert tiles_done(store) < 20, "the job ended before a worker could be killed in it"
        victim.kill()  # SIGKILL; with two tiles in flight per worker, in the middle of one
        victim.wait(10)
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    finally:
        kill_group(p)
    assert np.array_equal(open_store(store).read_gram(), gram, equal_nan=True)
    assert verify_store(store)["bad"] == []


def test_driver_sigkilled_at_random_moments_then_resumed_bit_identical(workdir, reference):
    cfg, _, gram = reference
    store = workdir / "killdriver.zarr"
    rng = random.Random(7)
    progress = []
    for _ in range(3):
        before = tiles_done(store)
        p = start_driver(cfg, store)
        wait_for(lambda: tiles_done(store) > before, timeout=60)  # let it make some progress...
        deadline = time.monotonic() + rng.uniform(0.0, 1.5)       # ...then kill it at a random moment, but
        while time.monotonic() < deadline and tiles_done(store) < 12:  # before it can finish (4 tiles in flight)
            time.sleep(0.05)
        kill_group(p)
        progress.append(tiles_done(store))
    done_before = tiles_done(store)
    assert 0 < done_before < 20, progress
    r = cli("compute-kernel", "--config", cfg, "--store", store, "--cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    computed, skipped = map(int, re.search(r"(\d+) tiles computed, (\d+) already done", r.stdout).groups())
    assert skipped == done_before and computed == 20 - done_before
    assert np.array_equal(open_store(store).read_gram(), gram, equal_nan=True)


def test_raylet_sigkilled_mid_job_driver_restarts_ray_and_finishes_identical(workdir, reference):
    """The driver's own node lost (as when it is declared dead under load): Ray is restarted and the job resumed."""
    cfg, _, gram = reference
    store = workdir / "killraylet.zarr"
    p = start_driver(cfg, store)
    try:
        assert wait_for(lambda: tiles_done(store) >= 2 and worker_pids(store)), "no tile finished"
        raylet_of(worker_pids(store)[0]).kill()
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out
    finally:
        kill_group(p)
    assert "restarting Ray and resuming (1/3)" in out and "Traceback" not in out, out
    assert np.array_equal(open_store(store).read_gram(), gram, equal_nan=True)
    assert verify_store(store)["bad"] == []


def test_ray_lost_more_often_than_the_bound_stops_with_a_clear_error(workdir, reference):
    cfg, _, _ = reference
    store = workdir / "lostraylet.zarr"
    prepare_store(load_config(cfg), store)

    def kill_raylet_after_a_tile():
        wait_for(lambda: tiles_done(store) >= 1 and worker_pids(store))
        kill_processes([raylet_of(worker_pids(store)[0])])

    threading.Thread(target=kill_raylet_after_a_tile, daemon=True).start()
    with pytest.raises(RayFailure, match="the private Ray instance lost its raylet") as e:
        run_tiles(store, cpus=2, progress=False, restarts=0)
    assert "rerun the same command" in str(e.value)
    assert tiles_done(store) >= 1 and verify_store(store)["bad"] == []


@pytest.mark.parametrize("sig, code, message", [(signal.SIGINT, 130, "Interrupted (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "Stopped (SIGTERM)")])
def test_ctrl_c_and_sigterm_stop_cleanly_and_the_rerun_resumes(workdir, reference, sig, code, message):
    """Ctrl-C reaches the terminal's whole process group (Ray's processes too); SIGTERM only the driver."""
    cfg, _, gram = reference
    store = workdir / f"signal{code}.zarr"
    p = start_driver(cfg, store)
    try:
        assert wait_for(lambda: tiles_done(store) >= 2), "no tile finished"
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
    finally:
        kill_group(p)
    assert p.returncode == code, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == [f"{message}: finished tiles are kept; rerun the same command to resume."], out
    assert not Path(f"{store}.lock").exists()
    done = tiles_done(store)
    assert 2 <= done < 20 and verify_store(store)["bad"] == []
    r = cli("compute-kernel", "--config", cfg, "--store", store, "--cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"{20 - done} tiles computed, {done} already done" in r.stdout
    assert np.array_equal(open_store(store).read_gram(), gram, equal_nan=True)


def test_corrupt_chunks_are_found_and_repaired(workdir, reference):
    cfg, ref_store, gram = reference
    store = workdir / "corrupt.zarr"
    shutil.copytree(ref_store, store)
    chunks = sorted((store / "gram" / "c").glob("*/*"))
    truncated, overwritten = chunks[0], chunks[-1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    overwritten.write_bytes(np.random.default_rng(0).bytes(overwritten.stat().st_size))
    r = cli("verify", store)
    assert r.returncode == 1
    assert r.stdout.count("BAD tile") == 2 and "checksum" in r.stdout and "unreadable" in r.stdout
    r = cli("verify", store, "--repair", "--cpus", "2")
    assert r.returncode == 0 and "2 tiles recomputed" in r.stdout, r.stdout + r.stderr
    assert cli("verify", store).returncode == 0
    assert np.array_equal(open_store(store).read_gram(), gram, equal_nan=True)


def test_second_driver_is_refused(workdir, reference):
    cfg, _, _ = reference
    store = workdir / "locked.zarr"
    p = start_driver(cfg, store)
    try:
        assert wait_for(lambda: Path(f"{store}.lock").exists(), timeout=60)
        r = cli("compute-kernel", "--config", cfg, "--store", store, "--cpus", "1", "--no-progress")
        assert r.returncode != 0
        assert "being computed by another driver" in r.stderr and f"pid {p.pid}" in r.stderr
    finally:
        kill_group(p)


def test_changed_config_or_tile_size_is_refused_and_nothing_changes(workdir, reference):
    _, ref_store, _ = reference
    before = open_store(ref_store).records().copy()
    other = fault_config(workdir, **{"depth = 3": "depth = 5"})
    r = cli("compute-kernel", "--config", other, "--store", ref_store, "--no-progress")
    assert r.returncode != 0 and "kernel.depth: store has 36, now 5" in r.stderr
    r = cli("compute-kernel", "--config", reference[0], "--store", ref_store, "--tile-size", "8", "--no-progress")
    assert r.returncode != 0 and "compute.tile_size: store has 16, now 8" in r.stderr
    assert np.array_equal(open_store(ref_store).records(), before)
    assert not Path(f"{ref_store}.lock").exists()
