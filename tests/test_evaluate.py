"""evaluate / baselines / report on a real smoke store: files, sane values, and clear errors for bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.kernels import mnk
from mnkpipe.pipeline.baselines_run import baseline_settings, run_baselines
from mnkpipe.pipeline.driver import compute_kernel
from mnkpipe.pipeline.evaluate import evaluate, train_subsets
from mnkpipe.pipeline.mnk_tiles import mnk_settings, reader_for, task_ops_list
from mnkpipe.store import StoreError, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, omniglot_root, monkeypatch_module):
    monkeypatch_module.setenv("MNKPIPE_DATA", str(omniglot_root))
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    path = tmp_path_factory.mktemp("eval") / "smoke.zarr"
    compute_kernel(REPO / "configs" / "smoke.toml", path, cpus=2, progress=False)
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def snapshot(store_path: Path) -> dict:
    """Bytes of everything in the store except the mnk array evaluate may add."""
    return {p.relative_to(store_path): p.read_bytes() for p in sorted(store_path.rglob("*"))
            if p.is_file() and not p.relative_to(store_path).parts[0].startswith("mnk")}


def test_evaluate_writes_all_files_with_sane_values(smoke_store, tmp_path):
    before = snapshot(smoke_store)
    out = tmp_path / "res"
    r = evaluate(smoke_store, train_counts=[1, 2, 4], seeds=2, out=out, cpus=2, progress=False)
    for f in ("results.json", "results.csv", "results.md", "accuracy.png"):
        assert (out / f).stat().st_size > 0, f
    assert set(r["methods"]) == {"mnk", "cntk_support", "pixel_1nn"}
    for m in r["methods"].values():
        assert m["n_train_tasks"] == [1, 2, 4]
        for mean, (lo, hi), per_task in zip(m["mean"], m["ci95"], m["per_task"]):
            assert 0 <= lo <= mean <= hi <= 1
            assert len(per_task) == 3 and all(0 <= a <= 1 for a in per_task)
    assert snapshot(smoke_store) == before  # only the mnk array was added
    assert "mnk" in open_store(smoke_store).root
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["mnk"]["mean"] == r["methods"]["mnk"]["mean"]


def test_stored_meta_kernel_matches_dense_phi_train(smoke_store, tmp_path):
    evaluate(smoke_store, train_counts=[4], seeds=1, out=tmp_path, methods=["mnk"], cpus=2, progress=False)
    store = open_store(smoke_store)
    settings = mnk_settings()
    kb = reader_for(store, settings)
    ops = task_ops_list(kb, store.episodes().train, settings)
    dense = mnk.mnk_train_matrix(kb, ops)
    assert np.allclose(store.read_gram("mnk"), dense, rtol=1e-12, atol=1e-12)


def test_nested_training_subsets():
    s = train_subsets(16, [1, 2, 4, 8, 16], seed=3)
    for a, b in [(1, 2), (2, 4), (4, 8), (8, 16)]:
        assert set(s[a]) <= set(s[b])
    assert not np.array_equal(train_subsets(16, [4], 0)[4], train_subsets(16, [4], 1)[4])


def test_bad_input_errors(smoke_store, tmp_path):
    with pytest.raises(ValueError, match="holds 4"):
        evaluate(smoke_store, train_counts=[8], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(smoke_store, methods=["mnk", "svm"], out=tmp_path, progress=False)
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(smoke_store, incomplete)
    st = open_store(incomplete, mode="r+")
    for t in st.planned_tiles()[:3]:
        st.clear_record(*t)
    with pytest.raises(StoreError, match=r"3 of \d+ Gram tiles are not done.*compute-kernel"):
        evaluate(incomplete, out=tmp_path, progress=False)
    no_episodes = tmp_path / "noepisodes.zarr"
    shutil.copytree(smoke_store, no_episodes)
    shutil.rmtree(no_episodes / "episodes")
    with pytest.raises(StoreError, match="holds no episodes"):
        evaluate(no_episodes, out=tmp_path, progress=False)
    r = CliRunner().invoke(main, ["evaluate", "--store", str(smoke_store), "--train-tasks", "99", "--out",
                                  str(tmp_path)])
    assert r.exit_code != 0 and "holds 4" in r.output


def test_baselines_join_results_and_report_renders_all_methods(smoke_store, tmp_path):
    out = tmp_path / "res"
    evaluate(smoke_store, train_counts=[1, 4], seeds=1, out=out, cpus=2, progress=False)
    settings = baseline_settings(None, blocks=2, filters=8, meta_steps=4, eval_every=2, meta_batch=4)
    r = run_baselines(smoke_store, train_counts=[1, 4], seeds=1, settings=settings, out=out, progress=False)
    for m in ("maml", "imaml"):
        assert all(0 <= a <= 1 for a in r["methods"][m]["mean"])
        assert "BatchNorm" in r["methods"][m]["note"] and "validation tasks" in r["methods"][m]["note"]
    with pytest.raises(ValueError, match="unknown baseline method"):
        run_baselines(smoke_store, methods=["reptile"], out=out, progress=False)
    res = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for label in ("MNK", "r_t", "1-NN", "MAML", "iMAML"):
        assert label in res.output
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"mnk", "cntk_support", "pixel_1nn", "maml", "imaml"}


def test_lake_runs_protocol_end_to_end(tmp_path, omniglot_root, monkeypatch_module):
    """A store built with the 20 official one-shot runs as test tasks evaluates on exactly those 20 runs."""
    monkeypatch_module.setenv("MNKPIPE_DATA", str(omniglot_root))
    cfg = tmp_path / "lake.toml"
    cfg.write_text('[data]\ntrain_split = "background_small1"\nimage_size = 8\npad = 0\n'
                   '[tasks]\nprotocol = "lake-runs"\nway = 20\nshot = 1\nquery = 1\ntrain_tasks = 2\nval_tasks = 0\n'
                   '[kernel]\ndepth = 3\n[compute]\ntile_size = 64\n')
    store = tmp_path / "lake.zarr"
    compute_kernel(cfg, store, cpus=2, progress=False)
    ep = open_store(store).episodes()
    assert ep.test.n_tasks == 20 and ep.test.way == 20 and ep.test.support.shape == (20, 20)
    r = evaluate(store, train_counts=[1, 2], seeds=1, out=tmp_path / "res", cpus=2, progress=False)
    assert r["n_test_tasks"] == 20 and r["way"] == 20
    for m in r["methods"].values():
        assert all(len(pt) == 20 for pt in m["per_task"])
        assert all(1 / 20 <= a <= 1 for a in m["mean"])  # above or at chance on 20-way


def test_tile_by_tile_reader_equals_in_memory_reader(smoke_store):
    from mnkpipe.pipeline.mnk_tiles import base_reader
    st = open_store(smoke_store)
    mem, tiles = base_reader(st), base_reader(st, max_bytes=0)
    rows, cols = np.array([0, 5, 60, 2]), np.array([3, 70, 1])
    assert np.array_equal(mem(rows, cols), tiles(rows, cols))
    assert np.array_equal(mem.diag, tiles.diag)
