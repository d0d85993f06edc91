"""MAML/iMAML under the notebook's selection on the test tasks (biased), beside the validation-selected accuracy:
the test curve kept per evaluated step (also across resumes and reused checkpoints), the records in results.json,
the report's marking."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_after_saving
from test_baselines import TINY, make_problem

from mnkpipe.baselines.train import BASELINE_CHECKPOINT, chosen_on_test, run_baseline
from mnkpipe.evaluation.baselines_run import baseline_settings, run_baselines
from mnkpipe.evaluation.report import label, line_style, render
from mnkpipe.pipeline.local import compute_local

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def same_curves(a, b):
    assert a["val_curve"] == b["val_curve"] and a["best_step"] == b["best_step"]
    assert [k for k, _ in a["test_curve"]] == [k for k, _ in b["test_curve"]]
    for (_, x), (_, y) in zip(a["test_curve"], b["test_curve"]):
        np.testing.assert_array_equal(x, y)


def test_every_evaluated_step_is_scored_on_the_test_tasks(problem):
    r = run_baseline("maml", *problem, way=2, settings=TINY, seed=0, progress=False)
    assert [k for k, _ in r["test_curve"]] == [k for k, _ in r["val_curve"]] == [5, 10, 15, 20]
    assert all(a.shape == (20,) for _, a in r["test_curve"])
    # the validation-selected checkpoint's test accuracy is the curve's entry at its step
    np.testing.assert_array_equal(dict(r["test_curve"])[r["best_step"]], r["test_acc"])
    step, acc = chosen_on_test(r["test_curve"])
    means = [a.mean() for _, a in r["test_curve"]]
    assert acc.mean() == max(means) and step == r["test_curve"][int(np.argmax(means))][0]
    assert acc.mean() >= r["test_acc"].mean()


def test_resumed_and_reused_checkpoints_keep_the_test_curve(problem, tmp_path, monkeypatch):
    fresh = run_baseline("maml", *problem, way=2, settings=TINY, seed=0, progress=False)
    with monkeypatch.context() as m:
        crash_after_saving(m, "step", 10)
        with pytest.raises(KeyboardInterrupt):
            run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / BASELINE_CHECKPOINT, weights_only=True)
    assert [k for k, _ in saved["test_curve"]] == [5, 10]
    same_curves(run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path,
                             progress=False), fresh)  # resumed at 10
    same_curves(run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path,
                             progress=False), fresh)  # finished: nothing retrained
    # fewer meta-steps from the finished checkpoint: the curve up to them, when its selection lies within
    short = replace(TINY, meta_steps=10)
    if fresh["best_step"] <= 10:
        r = run_baseline("maml", *problem, way=2, settings=short, seed=0, checkpoint_dir=tmp_path, progress=False)
        same_curves(r, run_baseline("maml", *problem, way=2, settings=short, seed=0, progress=False))


def test_a_checkpoint_without_test_scores_is_retrained(problem, tmp_path, capsys):
    settings = replace(TINY, meta_steps=10)
    fresh = run_baseline("maml", *problem, way=2, settings=settings, seed=0, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / BASELINE_CHECKPOINT
    old = torch.load(path, weights_only=True)
    del old["test_curve"]  # as written before the test curve was kept
    torch.save(old, path)
    capsys.readouterr()
    r = run_baseline("maml", *problem, way=2, settings=settings, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert "has no test-task scores" in capsys.readouterr().err
    same_curves(r, fresh)
    assert [k for k, _ in torch.load(path, weights_only=True)["test_curve"]] == [5, 10]


def test_chosen_on_test_takes_the_first_best_mean():
    curve = [(2, np.array([0.2, 0.4])), (4, np.array([0.5, 0.5])), (6, np.array([0.6, 0.4]))]
    step, acc = chosen_on_test(curve)
    assert step == 4 and acc.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="no evaluated step"):
        chosen_on_test([])


# ------------------------------------------------------------------ on a real smoke store, through results.json

@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, omniglot_root):
    path = tmp_path_factory.mktemp("ts") / "smoke.zarr"
    compute_local(REPO / "configs" / "smoke.toml", path, data=str(omniglot_root), progress=False)
    return path


STORE_TINY = dict(blocks=2, filters=4, meta_steps=4, eval_every=1, meta_batch=2, inner_steps=1, imaml_steps=2,
                  cg_steps=2)


def test_results_hold_the_test_selected_records_and_the_report_marks_them(smoke_store, tmp_path):
    out = tmp_path / "res"

    def run():
        return run_baselines(smoke_store, methods=["maml", "imaml"], train_counts=[1, 2], seeds=2,
                             settings=baseline_settings(None, **STORE_TINY), out=out, progress=False, device="cpu")

    first = run()["methods"]
    for method in ("maml", "imaml"):
        honest, biased = first[method], first[f"{method}-test-selected"]
        assert "BIASED" in biased["note"] and "test tasks" in biased["note"]
        assert biased["n_train_tasks"] == honest["n_train_tasks"] and biased["seeds"] == honest["seeds"] == 2
        for i, n in enumerate(honest["n_train_tasks"]):
            for s in range(2):
                run_ = biased["runs"][f"n{n}-s{s}"]
                curve = dict(run_["test_curve"])
                assert sorted(curve) == [1, 2, 3, 4]
                acc = np.mean(biased["per_seed"][i][s])
                assert acc == pytest.approx(max(curve.values()), abs=1e-12)
                assert curve[run_["best_step"]] == max(curve.values())
                assert acc >= np.mean(honest["per_seed"][i][s])
                assert run_["validation_best_step"] == honest["runs"][f"n{n}-s{s}"]["best_step"]
                assert np.mean(honest["per_seed"][i][s]) == pytest.approx(curve[run_["validation_best_step"]],
                                                                          abs=1e-12)
    # a rerun reuses every finished checkpoint and still has the test-selected records, unchanged
    stamps = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob(BASELINE_CHECKPOINT)}
    again = run()["methods"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for key in ("maml-test-selected", "imaml-test-selected"):
        assert again[key]["per_seed"] == first[key]["per_seed"] and again[key]["runs"] == first[key]["runs"]

    render(out)
    md = (out / "results.md").read_text()
    for name in ("MAML (2nd order)", "iMAML (CG)"):
        assert f"| {name} | 2 |" in md and f"| {name} (test-selected, biased) | 2 |" in md
        assert f"\n{name} (test-selected, biased): BIASED UPWARDS" in md
    assert label("imaml-test-selected") == "iMAML (CG) (test-selected, biased)"
    assert line_style("maml-test-selected")["linestyle"] == "--" and line_style("maml")["linestyle"] == "-"
    assert (out / "accuracy.png").stat().st_size > 0

    paired = subprocess.run([sys.executable, str(REPO / "bench" / "paired_differences.py"), str(out / "results.json"),
                             "maml-test-selected", "maml"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    row = next(line for line in paired.splitlines() if line.startswith("| maml |"))
    saved = json.loads((out / "results.json").read_text())["methods"]
    diffs = [float(c.split()[0]) for c in row.strip("|").split("|")[1:]]
    expected = np.subtract(saved["maml-test-selected"]["mean"], saved["maml"]["mean"])
    assert np.allclose(diffs, 100 * expected, atol=0.051) and all(d >= 0 for d in diffs)
