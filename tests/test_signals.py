"""Ctrl-C and SIGTERM at any moment of compute-kernel, evaluate and baselines: exit 130 / 143, one line on stderr,
no traceback, no temporary file left. Real processes, real Ray, real signals, sent at moments the child announces
on stdout (a small shim around the real CLI prints a marker at the moment and, for the moments after Ray's
shutdown and inside a checkpoint write, stays there long enough for the signal to land)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import kill_processes, workers_of

from mnkpipe.baselines import checkpoint

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
MESSAGES = {signal.SIGINT: (130, "Interrupted (Ctrl-C)"), signal.SIGTERM: (143, "Stopped (SIGTERM)")}

SHIM = r"""
import sys, time
moment = sys.argv.pop(1)

def mark(word):
    print("@" + word, flush=True)

if moment == "ray-init":  # inside ray.init: the private instance is starting
    import ray
    real_init = ray.init
    def init(*a, **kw):
        mark(moment)
        return real_init(*a, **kw)
    ray.init = init
elif moment == "ray-down":  # just after Ray was shut down: results are being written
    import mnkpipe.evaluation.evaluate as ev
    import mnkpipe.pipeline.executors as executors
    import mnkpipe.pipeline.ray_session as rs
    real_stop = rs.stop_ray
    def stop_ray():
        real_stop()
        mark(moment)
        time.sleep(5)
    rs.stop_ray = executors.stop_ray = ev.stop_ray = stop_ray
elif moment == "save":  # a checkpoint's temporary file is written, not yet renamed
    import torch
    real_save = torch.save
    def save(*a, **kw):
        real_save(*a, **kw)
        mark(moment)
        time.sleep(5)
    torch.save = save
elif moment == "zarr":  # inside zarr's sync() of a coroutine before it runs: a stop leaves it never awaited
    import zarr.core.array, zarr.core.group, zarr.core.sync
    real_sync, first = zarr.core.sync.sync, [True]
    def sync(coro, *a, **kw):
        if first[0]:
            first[0] = False
            mark(moment)
            time.sleep(5)
        return real_sync(coro, *a, **kw)
    for m in (zarr.core.sync, zarr.core.array, zarr.core.group):
        m.sync = sync
elif moment == "zarr-late":  # a task of zarr's event loop still running as the interpreter exits after the command
    import asyncio, atexit
    import zarr.core.sync
    async def late():
        await asyncio.sleep(0.5)  # the command has ended by now, and the thread pools have shut down
        await asyncio.to_thread(int)
    zarr.core.sync._get_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(late()))
    atexit.register(time.sleep, 1.5)  # work at exit after the pools shut down (Ray's shutdown, in a real run)
from mnkpipe.cli import main
if moment in ("parse-group", "parse-command"):  # inside click's parsing of the group's or the command's arguments
    import click
    real_parse = click.Group.parse_args if moment == "parse-group" else click.Command.parse_args
    def parse_args(self, ctx, args):
        if moment == "parse-command" and isinstance(self, click.Group):
            return real_parse(self, ctx, args)
        mark(moment)
        time.sleep(5)
        return real_parse(self, ctx, args)
    setattr(click.Group if moment == "parse-group" else click.Command, "parse_args", parse_args)
mark("start")
main(prog_name="mnkpipe")
"""


@pytest.fixture(scope="module")
def env(omniglot_root):
    return dict(os.environ, RAY_AUTH_MODE="disabled", MNKPIPE_DATA=str(omniglot_root), PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, env):
    store = tmp_path_factory.mktemp("signals") / "smoke.zarr"
    r = subprocess.run([sys.executable, "-m", "mnkpipe.cli", "compute-kernel", "--config", str(SMOKE), "--store",
                        str(store), "--cpus", "1", "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return store


def interrupt(args, moment, sig, env, cwd, tries: int = 3) -> subprocess.CompletedProcess:
    """Run `mnkpipe *args` under the shim, send sig when it prints @moment (Ctrl-C to its whole process group, as
    a terminal does; SIGTERM to the process alone), and return how it ended; every process it left is killed.

    On a loaded machine this test process may read @moment only after the child has already finished the whole
    command (seen for the start moment: exit 0, no signal ever delivered); such a run says nothing about the
    command, so it is run again, up to `tries` times."""
    for _ in range(tries):
        r = _interrupt_once(args, moment, sig, env, cwd)
        if r is not None:
            return r
    pytest.fail(f"the child finished before the signal could be sent, {tries} times (machine too loaded?)")


def _interrupt_once(args, moment, sig, env, cwd) -> subprocess.CompletedProcess | None:
    """One run of interrupt(); None when the child had ended before the signal was sent."""
    p = subprocess.Popen([sys.executable, "-c", SHIM, moment, *map(str, args)], env=env, cwd=cwd, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - no threads yet
    seen, procs = [], []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.strip() == f"@{moment}":
                procs = psutil.Process(p.pid).children(recursive=True)
                time.sleep(0.5 if moment == "start" else 0)  # past the shim, into the command
                if p.poll() is not None:  # finished (or died) before the signal: nothing was tested
                    return None
                os.killpg(p.pid, sig) if sig == signal.SIGINT else p.send_signal(sig)
                break
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
        p.wait()
        kill_processes(procs + workers_of([q.pid for q in procs]))
    assert f"@{moment}\n" in seen, f"the child never reached {moment}: {''.join(seen)}"
    return subprocess.CompletedProcess(p.args, p.returncode, "".join(seen) + out, err)


def assert_stopped(r, sig, folder: Path):
    code, message = MESSAGES[sig]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith(message), (r.returncode, r.stderr)
    left = [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert left == [] and not (folder / "s.zarr.lock").exists(), left


@pytest.mark.parametrize("moment", ["start", "ray-init", "ray-down", "zarr"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_compute_kernel_stops_cleanly_at_any_moment(tmp_path, env, moment, sig):
    """Mid-run is tests/test_compute.py's; here the moments around it: imports, Ray starting, Ray shut down."""
    store = tmp_path / "s.zarr"
    r = interrupt(["compute-kernel", "--config", SMOKE, "--store", store, "--cpus", "1", "--no-progress"],
                  moment, sig, env, tmp_path)
    assert_stopped(r, sig, tmp_path)


@pytest.mark.parametrize("moment, sig", [("ray-init", signal.SIGINT), ("ray-down", signal.SIGTERM)],
                         ids=["ray-init-SIGINT", "ray-down-SIGTERM"])
def test_evaluate_stops_cleanly_while_ray_starts_and_after_it_stopped(tmp_path, env, smoke_store, moment, sig):
    out = tmp_path / "results"
    r = interrupt(["evaluate", "--store", smoke_store, "--out", out, "--methods", "mnk", "--seeds", "1",
                   "--train-tasks", "1,4", "--cpus", "1", "--no-progress"], moment, sig, env, tmp_path)
    assert_stopped(r, sig, tmp_path)


@pytest.mark.parametrize("moment, sig", [("start", signal.SIGTERM), ("save", signal.SIGINT),
                                         ("save", signal.SIGTERM)], ids=["start-SIGTERM", "save-SIGINT",
                                                                         "save-SIGTERM"])
def test_baselines_stop_cleanly_and_leave_no_temporary_checkpoint(tmp_path, env, smoke_store, moment, sig):
    """Today Ctrl-C prints click's "Aborted!" with exit 1 and SIGTERM kills it silently, leaving
    checkpoint.pt.tmp<pid> behind."""
    out = tmp_path / "results"
    r = interrupt(["baselines", "--store", smoke_store, "--out", out, "--methods", "maml", "--meta-steps", "2",
                   "--train-tasks", "1", "--device", "cpu", "--no-progress"], moment, sig, env, tmp_path)
    assert_stopped(r, sig, tmp_path)


@pytest.mark.parametrize("moment", ["parse-group", "parse-command"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_arguments_are_parsed_is_one_line(tmp_path, env, moment, sig):
    """Click parses the group's arguments outside any command (Ctrl-C there printed "Aborted!" with exit 1, SIGTERM
    a traceback)."""
    r = interrupt(["status", tmp_path], moment, sig, env, tmp_path)
    assert_stopped(r, sig, tmp_path)


def test_an_error_exit_is_one_line_even_with_zarr_work_left_at_exit(tmp_path, env):
    """A task of zarr's event loop that fails during the interpreter's exit ("cannot schedule new futures after
    shutdown") was logged after the command's one-line error, with a traceback (seen once in verify --repair of a
    damaged store)."""
    r = subprocess.run([sys.executable, "-c", SHIM, "zarr-late", "status", tmp_path], env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "no mnkpipe store" in lines[0], r.stderr


def test_a_checkpoint_write_that_fails_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot be pickled")

    with pytest.raises(RuntimeError, match="cannot be pickled"):
        checkpoint.save_checkpoint(target, {"state": Unpicklable()})
    assert list(tmp_path.iterdir()) == []
