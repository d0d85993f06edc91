"""evaluate --conventions authors on a real smoke store: its rows (mnk-authors, ...) are the authors' conventions of
mnkpipe.kernels.mnk applied to the stored Gram, beside the formulas' rows in the same results.json."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.evaluation.evaluate import evaluate
from mnkpipe.evaluation.phi import CachedGram, kernel_reader, phi_settings, task_ops_list
from mnkpipe.evaluation.protocol import train_subsets
from mnkpipe.kernels import mnk
from mnkpipe.pipeline.driver import compute_kernel
from mnkpipe.pipeline.ray_session import start_ray, stop_ray
from mnkpipe.store import open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, omniglot_root):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("MNKPIPE_DATA", str(omniglot_root))
    start_ray(None, cpus=2)
    try:
        path = tmp_path_factory.mktemp("conv") / "smoke.zarr"
        compute_kernel(REPO / "configs" / "smoke.toml", path, cpus=2, progress=False)
        yield path
    finally:
        stop_ray()
        mp.undo()


def authors_accuracy(store, subset, ridge):
    """Per test task accuracy of MNK and r_t with the authors' conventions, one-hot labels, from the stored Gram."""
    gram = CachedGram(store)
    kb = mnk.ridged_cosine_normalised(gram, gram.diag, ridge)
    ep = store.episodes()

    def ops(tasks):
        return [mnk.task_ops(kb, s, sl, q, ql, way=ep.way, ridge=ridge, conventions="authors")
                for s, sl, q, ql in zip(tasks.support, tasks.support_labels, tasks.query, tasks.query_labels)]

    train, test = ops(ep.train.subset(subset)), ops(ep.test)
    fit = mnk.mnk_fit(train, mnk.mnk_train_matrix(kb, train), ridge=ridge, conventions="authors")
    acc = {"mnk": [], "r_t": []}
    for t, labels in zip(test, ep.test.query_labels):
        acc["mnk"].append(np.mean((t.r_q + mnk.phi_test(kb, train, t, fit) @ fit.alpha).argmax(1) == labels))
        acc["r_t"].append(np.mean(t.r_q.argmax(1) == labels))
    return acc


def test_authors_rows_beside_the_formulas(smoke_store, tmp_path):
    out = tmp_path / "res"
    kw = {"train_counts": [2, 4], "seeds": 1, "out": out, "methods": ["mnk", "r_t", "pixel_1nn"], "ridge": 1e-3,
          "cpus": 2, "progress": False}
    evaluate(smoke_store, **kw)
    r = evaluate(smoke_store, conventions="authors", **kw)
    assert set(r["methods"]) == {"mnk-authors/onehot/K1", "r_t-authors/onehot"}  # pixel 1-NN does not depend on it
    saved = json.loads((out / "results.json").read_text())["methods"]
    assert set(saved) == {"mnk/onehot/K1", "r_t/onehot", "pixel_1nn", "mnk-authors/onehot/K1", "r_t-authors/onehot"}
    assert saved["mnk-authors/onehot/K1"]["hyperparameters"]["conventions"] == "authors"
    assert "conventions" not in saved["mnk/onehot/K1"]["hyperparameters"]
    groups = [dict(zarr.open_group(str(g), mode="r").attrs) for g in (out / "phi").iterdir()
              if (g / "zarr.json").exists()]
    assert sorted(g.get("conventions", "formulas") for g in groups) == ["authors", "formulas"]
    store = open_store(smoke_store)
    settings = phi_settings(1e-3, conventions="authors")  # what evaluate builds its operators from
    kb, gram = kernel_reader(store, settings)
    rows = np.arange(6)
    np.testing.assert_allclose(kb(rows, rows), mnk.ridged_cosine_normalised(gram, gram.diag, 1e-3)(rows, rows))
    op = task_ops_list(kb, store.episodes().test, settings)[0]
    np.testing.assert_allclose(op.T, np.linalg.pinv(op.k_ss), rtol=1e-8)
    np.testing.assert_allclose(op.R, np.linalg.inv(op.k_ss + 1e-3 * np.eye(len(op.k_ss))), rtol=1e-8)
    for i, n in enumerate([2, 4]):
        want = authors_accuracy(store, train_subsets(store.episodes().train.n_tasks, [n], 0)[n], 1e-3)
        assert saved["mnk-authors/onehot/K1"]["per_seed"][i][0] == want["mnk"]
        assert saved["r_t-authors/onehot"]["per_seed"][i][0] == want["r_t"]


def test_cli_conventions_bad_value_names_the_option(smoke_store, tmp_path):
    out = tmp_path / "res"
    for args in (["--conventions", "paper"], ["--conventions", "authors", "--no-normalise"]):
        r = CliRunner().invoke(main, ["evaluate", "--store", str(smoke_store), "--out", str(out), "--no-progress",
                                      *args])
        assert r.exit_code != 0 and "--conventions" in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()
