"""The ridge chosen on validation tasks: the validation kernel against the CNTK of the images themselves, the choice
against brute force, and evaluate's -valridge records against evaluate runs at each fixed ridge."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.evaluation.evaluate import choose_ridge, evaluate
from mnkpipe.evaluation.phi import CachedGram
from mnkpipe.evaluation.validation import WithValidation, validation_kernel, validation_kernel_path
from mnkpipe.kernels import cntk, mnk
from mnkpipe.store import open_store

from support.numerics import rel_err

GRID = (1e-5, 0.3)


def test_validation_reader_equals_the_cntk_of_the_images(shared_smoke_store, tmp_path):
    store = open_store(shared_smoke_store)
    vk = validation_kernel(tmp_path, store, progress=False)
    assert validation_kernel_path(tmp_path, store).is_file()
    kb = WithValidation(CachedGram(store), store.n, vk)
    train = store.episodes().train.image_ids()
    nv = store.array("val_images").shape[0]
    idx = np.concatenate([train[::3], store.n + np.arange(nv)[::2]])  # training and validation images mixed
    images = np.concatenate([store.images(), store.array("val_images")[...]])
    dense = cntk(images[idx], depth=3, backend="reference")
    dense = np.triu(dense) + np.triu(dense, 1).T
    assert rel_err(kb(idx, idx), dense) < 1e-5
    assert rel_err(kb.diag[idx], np.diag(dense)) < 1e-5
    test_image = store.episodes().test.query[0, 0]
    with pytest.raises(ValueError, match="only training images"):
        kb([store.n], [test_image])


def test_choose_ridge_takes_the_best_validation_accuracy_per_seed_smallest_on_ties():
    val = {1e-3: np.array([0.5, 0.7, 0.6]), 1e-1: np.array([0.6, 0.7, 0.4]), 1.0: np.array([0.2, 0.1, 0.6])}
    test = {r: np.full((3, 2), r) for r in val}
    chosen, acc = choose_ridge(val, test)
    assert chosen.tolist() == [1e-1, 1e-3, 1e-3]
    assert acc.tolist() == [[1e-1, 1e-1], [1e-3, 1e-3], [1e-3, 1e-3]]


def r_t_validation_accuracy(store, ridge: float) -> float:
    """Mean accuracy of r_t (one-hot, cosine-normalised CNTK) on the store's validation tasks, from scratch."""
    val, v = store.episodes().val, store.array("val_images")[...]
    accs = []
    for s, sl, q, ql in zip(val.support, val.support_labels, val.query, val.query_labels):
        idx = np.concatenate([s, q])
        k = cntk(v[idx], depth=3, backend="reference")
        k = np.triu(k) + np.triu(k, 1).T
        k = k / np.sqrt(np.outer(np.diag(k), np.diag(k)))
        ns = len(s)
        scores = k[ns:, :ns] @ np.linalg.solve(k[:ns, :ns] + ridge * np.eye(ns), mnk.centred_onehot(sl, val.way))
        accs.append(np.mean(scores.argmax(1) == ql))
    return float(np.mean(accs))


def test_evaluate_ridge_grid_reports_the_test_accuracy_at_the_validation_choice(shared_smoke_store, tmp_path):
    store = open_store(shared_smoke_store)
    common = dict(train_counts=[1, 4], seeds=2, augment=[1], cpus=2, progress=False)
    r = evaluate(shared_smoke_store, out=tmp_path / "grid", ridge_grid=GRID, **common)
    fixed = {g: evaluate(shared_smoke_store, out=tmp_path / f"fixed{g}", ridge=g, **common)["methods"]
             for g in GRID}
    assert (tmp_path / "grid" / "validation").is_dir() and not (shared_smoke_store / "validation").exists()
    for key in ("mnk/onehot/K1", "meta_term/onehot/K1", "r_t/onehot"):
        method, _, rest = key.partition("/")
        rec = r["methods"][f"{method}-valridge/{rest}"]
        h = rec["hyperparameters"]
        assert h["ridge_grid"] == list(GRID) and h["n_validation_tasks"] == 2
        per_seed = np.array(rec["per_seed"])  # (counts, seeds, tasks)
        for ci, n in enumerate(rec["n_train_tasks"]):
            for s, ridge in enumerate(h["ridge_chosen"][str(n)]):
                assert ridge in GRID
                at = np.array(fixed[ridge][key]["per_seed"])[ci, s]
                np.testing.assert_array_equal(per_seed[ci, s], at)
        assert r["methods"][key]["per_seed"] == fixed[1e-5][key]["per_seed"]  # the fixed-ridge rows are unchanged
    # r_t's validation accuracy, recomputed from the images: the best of the grid is what was recorded
    h = r["methods"]["r_t-valridge/onehot"]["hyperparameters"]
    best = max(r_t_validation_accuracy(store, g) for g in GRID)
    assert all(abs(a - best) < 1e-9 for accs in h["validation_accuracy"].values() for a in accs)
    saved = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert "mnk-valridge/onehot/K1" in saved["methods"]
    assert "ridge chosen on validation tasks" in (tmp_path / "grid" / "results.md").read_text()


def test_ridge_grid_errors_name_the_option(shared_smoke_store, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--store", str(shared_smoke_store), "--out", str(tmp_path / "o"),
                                    "--ridge-grid", "1e-3,0"])
    assert res.exit_code == 2 and "--ridge-grid" in res.output and "finite and > 0" in res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="--ridge-grid"):
        evaluate(shared_smoke_store, out=tmp_path / "o", ridge_grid=[float("nan")])


def test_a_ridge_grid_embeds_each_subset_once(shared_smoke_store, tmp_path, monkeypatch):
    import mnkpipe.evaluation.evaluate as ev
    calls, real = [], ev.pool_embeddings
    monkeypatch.setattr(ev, "pool_embeddings", lambda *a, **kw: calls.append(kw["seed"]) or real(*a, **kw))
    cfg = tmp_path / "emb.toml"
    cfg.write_text("[embedding]\nchannels = 8\nblocks = 2\nepochs = 1\nbatch = 4\n")
    evaluate(shared_smoke_store, out=tmp_path / "res", config=cfg, labels=["embedding"], methods=["r_t"],
             ridge_grid=GRID, train_counts=[1, 4], seeds=2, cpus=2, progress=False)
    assert len(calls) == 2 * 2  # counts x seeds, not x the 2 grid ridges
