import os
import socket
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def data_root() -> Path:
    """$MNKPIPE_DATA (relative to cwd or to the repo root; CI sets it), else ../shared/data/omniglot beside the repo."""
    env = os.environ.get("MNKPIPE_DATA")
    candidates = [Path(env), REPO / env] if env else [SHARED / "data" / "omniglot"]
    for c in candidates:
        if (c / "images_background_small1.zip").is_file():
            return c.resolve()
    pytest.fail(f"Omniglot data not found; tried {[str(c) for c in candidates]} (set MNKPIPE_DATA)")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def shared_smoke_store(tmp_path_factory, omniglot_root) -> Path:
    """configs/smoke.toml's store, computed once per session for the tests that only read it (never write into it:
    evaluate and baselines write under their own --out)."""
    from mnkpipe.pipeline.driver import compute_kernel
    path = tmp_path_factory.mktemp("shared") / "smoke.zarr"
    compute_kernel(REPO / "configs" / "smoke.toml", path, data=str(omniglot_root), cpus=2, progress=False)
    return path


GOLDEN = REPO / "tests" / "data" / "cntk_neural_tangents.npz"


@pytest.fixture(scope="session")
def golden():
    """neural-tangents' CNTK values (tests/data/README.md says how they were made)."""
    assert GOLDEN.exists(), f"golden CNTK values missing: {GOLDEN}"
    return dict(np.load(GOLDEN))


# -- Ray processes: tests touch only the Ray instances they started ---------------------------------------------
def free_port() -> int:
    """A TCP port no one listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(roots) -> list:
    """roots and their descendants (for a driver: its private GCS, raylet and the raylet's workers), and every
    process whose RAY_RAYLET_PID names one of them (the workers a raylet of theirs started)."""
    procs = {p.pid: p for r in roots for p in [r, *_children(r)]}
    for p in workers_of(procs):
        procs.setdefault(p.pid, p)
    return list(procs.values())


def workers_of(pids) -> list:
    """The processes a raylet among pids started (workers, agents): they carry its pid in RAY_RAYLET_PID."""
    wanted, found = {str(pid) for pid in pids}, []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_RAYLET_PID") in wanted:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_processes(procs) -> None:
    """SIGKILL each process (by pid, never by name) and reap those that are our children."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def kill_ray_tree(pid: int) -> None:
    """SIGKILL process pid and the Ray instance it started, as a crash of its machine would; then the workers that
    its raylets may have started in the meantime."""
    try:
        procs = ray_processes([psutil.Process(pid)])
    except psutil.NoSuchProcess:
        return
    kill_processes(procs)
    kill_processes(workers_of([p.pid for p in procs]))


def _children(p) -> list:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny nets run fastest on one thread, and oversubscribed threads crawl when the CPUs are shared."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def crash_after_saving(monkeypatch, key: str, at: int) -> list:
    """Make the baselines' checkpoint writer record state[key] of every save and raise KeyboardInterrupt right
    after the save where it equals `at` (a run killed just after a checkpoint); returns the records."""
    from mnkpipe.baselines import checkpoint
    saves, real_save = [], checkpoint.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        saves.append(state[key])
        if state[key] == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    return saves
