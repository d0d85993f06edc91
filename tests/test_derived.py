"""Derived results (meta-kernel groups, checkpoints, results.json) on real smoke stores: every interruption reruns,
two evaluates at once agree, derived data belongs to its exact store and kernel, the same store under another path
is the same store, and nothing a user owns is written over."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.evaluation.evaluate import evaluate
from mnkpipe.pipeline.local import compute_local
from mnkpipe.pipeline.ray_session import start_ray, stop_ray

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "configs" / "smoke.toml").read_text()
KW = dict(train_counts=[1, 2], seeds=1, methods=["mnk", "r_t"], augment=[1], progress=False)
ARGS = ["--train-tasks", "1,2", "--seeds", "1", "--methods", "mnk,r_t", "--no-progress"]

# A real `mnkpipe <args>` whose Zarr writes into `out` are counted: before write number `at` it sends itself `sig`
# (SIGKILL: dead on the spot), and each write into `out` takes `slow` seconds longer (a slow file system).
CHILD = r"""
import os, signal, sys, time
import zarr.storage
out, at, sig, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
real, count = zarr.storage.LocalStore._set, [0]

async def counted(self, key, value, exclusive=False):
    if str(self.root).startswith(out):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), sig)
            if sig == signal.SIGKILL:
                time.sleep(60)
        time.sleep(slow)
    return await real(self, key, value, exclusive=exclusive)

zarr.storage.LocalStore._set = counted
from mnkpipe.cli import main
sys.argv = ["mnkpipe", *sys.argv[5:]]
main()
"""


def build(path: Path, omniglot_root, depth: int = 3) -> Path:
    """A real smoke store at path (its Gram computed in-process), made with the given CNTK depth."""
    cfg = path.parent / f"smoke-depth{depth}.toml"
    cfg.write_text(SMOKE.replace("depth = 3", f"depth = {depth}"))
    compute_local(cfg, path, data=str(omniglot_root), progress=False)
    return path


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """One local Ray instance for the module, which in-process evaluates use and child processes join."""
    import ray
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    start_ray(None, cpus=2)
    yield ray.get_runtime_context().gcs_address
    stop_ray()
    mp.undo()


@pytest.fixture(scope="module")
def store(tmp_path_factory, omniglot_root):
    return build(tmp_path_factory.mktemp("derived") / "smoke.zarr", omniglot_root)


@pytest.fixture(scope="module")
def reference(store, ray_address, tmp_path_factory):
    """results.json of one uninterrupted evaluate with KW."""
    out = tmp_path_factory.mktemp("reference") / "res"
    evaluate(store, out=out, **KW)
    return json.loads((out / "results.json").read_text())


def child(store, out, address, at=0, sig=signal.SIGKILL, slow=0.0) -> subprocess.Popen:
    out = Path(out).resolve()
    argv = [sys.executable, "-c", CHILD, str(out), str(at), str(int(sig)), str(slow), "evaluate", "--store",
            str(store), "--out", str(out), "--address", address, *ARGS]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    # a test run started in the background of a script ignores SIGINT, and its children would inherit that
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509


def finish(p: subprocess.Popen) -> tuple[int, str]:
    output, _ = p.communicate(timeout=300)
    return p.returncode, output


def accuracies(results: dict) -> dict:
    return {k: m["per_seed"] for k, m in results["methods"].items()}


def same_results(out: Path, reference: dict) -> None:
    assert accuracies(json.loads((Path(out) / "results.json").read_text())) == accuracies(reference)


# -- every interruption reruns ----------------------------------------------------------------------------------
def test_evaluate_killed_before_any_write_into_the_results_reruns(store, ray_address, reference, tmp_path):
    """SIGKILL before each write of the results folder in turn (the first run is killed before its first write,
    the next one on the same folder before its second, ...): every rerun goes on, none is refused, and the last
    one, never killed, gives the uninterrupted results."""
    out = tmp_path / "res"
    for at in range(1, 40):
        rc, output = finish(child(store, out, ray_address, at=at))
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"killed before write {at} earlier, this run exits {rc}: {output}"
    else:
        pytest.fail("never finished")
    assert at > 3  # the meta-kernel group's creation was interrupted at each of its writes
    same_results(out, reference)
    assert not [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".partial")]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_evaluate_stopped_while_it_creates_a_meta_kernel_group_reruns(store, ray_address, reference, tmp_path, sig,
                                                                      code):
    out = tmp_path / "res"
    for at in (2, 4):
        rc, output = finish(child(store, out, ray_address, at=at, sig=sig))
        assert rc == code, output
        assert "Traceback" not in output, output
    rc, output = finish(child(store, out, ray_address))
    assert rc == 0, output
    same_results(out, reference)


def test_two_evaluates_at_once_on_one_results_folder_both_finish(store, ray_address, reference, tmp_path):
    """Started together on a slow file system, three times: both exit 0 and give the uninterrupted results."""
    for i in range(3):
        out = tmp_path / f"res{i}"
        procs = [child(store, out, ray_address, slow=0.05) for _ in range(2)]
        for p in procs:
            rc, output = finish(p)
            assert rc == 0, output
        same_results(out, reference)


# -- every derived result belongs to its exact store and kernel ---------------------------------------------------
def test_a_store_rebuilt_with_another_depth_reuses_nothing(tmp_path, omniglot_root, ray_address):
    path, out = tmp_path / "s.zarr", tmp_path / "s.zarr-results"
    build(path, omniglot_root, depth=3)
    evaluate(path, **KW)
    groups = sorted(p.name for p in (out / "phi").iterdir())
    saved = (out / "results.json").read_bytes()
    shutil.rmtree(path)
    build(path, omniglot_root, depth=4)  # same images, same tasks, another kernel
    with pytest.raises(ValueError, match=r"refusing to merge.*kernel\.depth"):
        evaluate(path, **KW)
    assert (out / "results.json").read_bytes() == saved
    (out / "results.json").unlink()  # the depth-3 meta-kernel groups stay: they must not be used
    r = evaluate(path, **KW)
    assert r["config"]["kernel"]["depth"] == 4
    fresh = evaluate(path, out=tmp_path / "fresh", **KW)
    assert accuracies(r) == accuracies(fresh)
    assert len(set(p.name for p in (out / "phi").iterdir()) - set(groups)) == len(groups)


def test_baselines_of_a_store_rebuilt_with_another_depth_are_not_reused(tmp_path, omniglot_root, torch_one_thread):
    from mnkpipe.evaluation.baselines_run import baseline_settings, run_baselines
    path, out = tmp_path / "s.zarr", tmp_path / "res"
    settings = baseline_settings(None, blocks=2, filters=4, meta_steps=2, eval_every=1, meta_batch=2, inner_steps=1)
    run = dict(methods=["maml"], train_counts=[1], seeds=1, settings=settings, out=out, progress=False, device="cpu")
    build(path, omniglot_root, depth=3)
    run_baselines(path, **run)
    dirs = set((out / "checkpoints").iterdir())
    shutil.rmtree(path)
    build(path, omniglot_root, depth=4)
    with pytest.raises(ValueError, match=r"refusing to merge.*kernel\.depth"):
        run_baselines(path, **run)
    (out / "results.json").unlink()
    run_baselines(path, **run)
    assert len(set((out / "checkpoints").iterdir()) - dirs) == len(dirs)


def test_the_same_store_by_a_relative_and_an_absolute_path(store, ray_address, reference, tmp_path, monkeypatch):
    out = tmp_path / "res"
    evaluate(store.resolve(), out=out, **KW)
    groups = sorted((out / "phi").iterdir())
    monkeypatch.chdir(store.parent)
    r = evaluate(store.name, out=out, **KW)
    assert accuracies(r) == accuracies(reference) and sorted((out / "phi").iterdir()) == groups
    rc = CliRunner().invoke(main, ["evaluate", "--store", store.name, "--out", str(out), *ARGS])
    assert rc.exit_code == 0, rc.output


def test_a_store_moved_with_its_results_folder(omniglot_root, ray_address, reference, tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    build(a / "s.zarr", omniglot_root)
    evaluate(a / "s.zarr", **KW)
    groups = sorted(p.name for p in (a / "s.zarr-results" / "phi").iterdir())
    b = a.rename(tmp_path / "b")
    r = evaluate(b / "s.zarr", **KW)
    assert accuracies(r) == accuracies(reference)
    assert sorted(p.name for p in (b / "s.zarr-results" / "phi").iterdir()) == groups


# -- nothing a user owns is touched -------------------------------------------------------------------------------
def user_folder(path: Path) -> dict:
    path.mkdir()
    for name in ("results.md", "results.csv", "accuracy.png", "notes.txt"):
        (path / name).write_text(f"the user's own {name}\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("command", [
    ["evaluate", "--methods", "pixel_1nn", "--train-tasks", "1", "--seeds", "1", "--no-progress"],
    ["baselines", "--methods", "maml", "--train-tasks", "1", "--meta-steps", "1", "--device", "cpu", "--no-progress"],
    ["report"],
])
def test_results_are_never_written_over_a_users_folder_or_into_the_store(store, tmp_path, command):
    mine = tmp_path / "mine"
    before = user_folder(mine)
    r = CliRunner().invoke(main, [command[0], "--store", str(store), "--out", str(mine), *command[1:]])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert str(mine) in r.output and "not made by mnkpipe" in r.output, r.output
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    files = sorted(store.rglob("*"))
    for inside in (store, store / "episodes", store / "new"):
        r = CliRunner().invoke(main, [command[0], "--store", str(store), "--out", str(inside), *command[1:]])
        assert r.exit_code != 0 and "inside the store" in r.output and "Traceback" not in r.output, r.output
    assert sorted(store.rglob("*")) == files


def test_results_folders_mnkpipe_made_are_reused(store, tmp_path):
    out = tmp_path / "res"
    args = ["evaluate", "--store", str(store), "--out", str(out), "--methods", "pixel_1nn", "--train-tasks", "1",
            "--seeds", "1", "--no-progress"]
    for _ in range(2):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    assert (out / ".mnkpipe-results").exists()
    (out / ".mnkpipe-results").unlink()  # a folder an older mnkpipe made: its results.json says so
    assert CliRunner().invoke(main, ["report", "--out", str(out)]).exit_code == 0
    assert CliRunner().invoke(main, args).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, [*args[:4], str(empty), *args[5:]]).exit_code == 0
