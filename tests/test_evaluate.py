"""evaluate / baselines / report on a real smoke store: files, sane values, derived data outside the (read-only)
store, task augmentation, and clear errors for bad input."""

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.data import TaskSet
from mnkpipe.evaluation.augment import augment_tasks
from mnkpipe.evaluation.baselines_run import baseline_settings, run_baselines
from mnkpipe.evaluation.evaluate import evaluate
from mnkpipe.evaluation.labels import extractor_training_set
from mnkpipe.evaluation.phi import (ARRAY, CachedGram, kernel_reader, phi_attrs, phi_key, phi_settings, read_phi,
                                    task_ops_list)
from mnkpipe.evaluation.protocol import train_subsets
from mnkpipe.kernels import mnk
from mnkpipe.pipeline.driver import compute_kernel
from mnkpipe.pipeline.ray_session import start_ray, stop_ray
from mnkpipe.store import StoreError, TiledArray, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def ray_instance(monkeypatch_module):
    """One local Ray instance for the module: every run_tiles call (Gram and meta-kernel arrays) joins it instead
    of starting and stopping its own."""
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    start_ray(None, cpus=2)
    yield
    stop_ray()


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, omniglot_root, monkeypatch_module, ray_instance):
    """The smoke store, made read-only (chmod) once computed: evaluate must never need to write into it."""
    monkeypatch_module.setenv("MNKPIPE_DATA", str(omniglot_root))
    path = tmp_path_factory.mktemp("eval") / "smoke.zarr"
    compute_kernel(REPO / "configs" / "smoke.toml", path, cpus=2, progress=False)
    set_writable(path, False)
    yield path
    set_writable(path, True)


def set_writable(path: Path, writable: bool) -> None:
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def snapshot(store_path: Path) -> dict:
    """Every file of the store with its bytes and modification time (root ignores chmod: compare contents too)."""
    return {p.relative_to(store_path): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(store_path.rglob("*"))
            if p.is_file()}


def writable_copy(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    set_writable(dest, True)
    return dest


@pytest.fixture(scope="module")
def evaluated(smoke_store, tmp_path_factory):
    """One evaluate on the read-only store (K = 1 and 2, counts 1 and 4, 2 seeds): (results folder, results,
    the store's files before)."""
    assert not os.stat(smoke_store / "zarr.json").st_mode & stat.S_IWUSR
    before = snapshot(smoke_store)
    out = tmp_path_factory.mktemp("evaluated") / "res"
    r = evaluate(smoke_store, train_counts=[1, 4], seeds=2, out=out, augment=[1, 2], cpus=2, progress=False)
    return out, r, before


def test_evaluate_on_read_only_store_writes_results_and_phi_outside(smoke_store, evaluated):
    out, r, before = evaluated
    assert snapshot(smoke_store) == before  # nothing written into the store, not even a meta-kernel array
    for f in ("results.json", "results.csv", "results.md", "accuracy.png"):
        assert (out / f).stat().st_size > 0, f
    assert set(r["methods"]) == {"mnk/onehot/K1", "mnk/onehot/K2", "meta_term/onehot/K1", "meta_term/onehot/K2",
                                 "r_t/onehot", "pixel_1nn"}
    for m in r["methods"].values():
        assert m["n_train_tasks"] == [1, 4] and m["seeds"] == 2
        assert m["n_train_characters"] == [3, 12] and m["n_train_images"] == [12, 48]
        assert np.array(m["per_seed"]).shape == (2, 2, 3)
        for mean, (lo, hi), per_task in zip(m["mean"], m["ci95"], m["per_task"]):
            assert 0 <= lo <= mean <= hi <= 1
            assert len(per_task) == 3 and all(0 <= a <= 1 for a in per_task)
    saved = json.loads((out / "results.json").read_text())
    assert saved["fingerprint"] == open_store(smoke_store).manifest["fingerprint"]
    assert saved["config"]["kernel"]["depth"] == 3 and saved["mnkpipe_version"] and saved["date"]
    assert saved["git_commit"] and saved["methods"]["mnk/onehot/K2"]["hyperparameters"]["augment"] == 2
    # one Phi group for K = 1 (all training tasks) and one per (count, seed) for K = 2, each with its settings
    groups = sorted((out / "phi").iterdir())
    assert len(groups) == 1 + 2 * 2
    for g in groups:
        attrs = dict(zarr.open_group(str(g), mode="r").attrs)
        assert attrs["gram_fingerprint"] == saved["fingerprint"] and attrs["gram_store"] == str(smoke_store)
        assert g.name == phi_key(attrs) and {"ridge", "eta", "normalise_k", "augment"} <= set(attrs)
        assert TiledArray(g, ARRAY).missing_tiles() == []


def test_stored_meta_kernels_match_dense_phi_train(smoke_store, evaluated):
    out = evaluated[0]
    store = open_store(smoke_store)
    settings = phi_settings()
    kb, _ = kernel_reader(store, settings)
    train = store.episodes().train
    subset = train_subsets(train.n_tasks, [4], 1)[4]
    for k, tasks in [(1, train), (2, augment_tasks(train.subset(subset), 2, np.random.default_rng([1, 2, *subset])))]:
        path = out / "phi" / phi_key(phi_attrs(store, settings, k, subset, 1))
        dense = mnk.mnk_train_matrix(kb, task_ops_list(kb, tasks, settings))
        assert np.allclose(read_phi(path), dense, rtol=1e-12, atol=1e-12)


def test_interrupted_evaluate_reruns_and_reuses_phi(smoke_store, tmp_path):
    """A Phi group whose creation stopped half-way (left under .partial/, never renamed into place), or whose tiles
    are partly done, is completed (tests/test_derived.py kills real runs at each write)."""
    kw = dict(train_counts=[1, 2], seeds=1, methods=["mnk"], augment=[1, 2], cpus=2, progress=False)
    first = evaluate(smoke_store, out=tmp_path / "a", **kw)
    groups = sorted((tmp_path / "a" / "phi").iterdir())
    partial = tmp_path / "a" / ".partial" / f"phi-{groups[0].name}"
    partial.parent.mkdir()
    groups[0].rename(partial)
    g0 = zarr.open_group(str(partial), mode="r+")
    for name in (ARRAY, f"{ARRAY}_crc32"):  # as if stopped right after writing the attributes and the plan
        del g0[name]
    zarr.open_group(str(groups[1]), mode="r+")[f"{ARRAY}_crc32"][0, 0] = -1  # as if stopped before a tile
    again = evaluate(smoke_store, out=tmp_path / "a", **kw)
    assert again["methods"] == first["methods"]
    assert sorted((tmp_path / "a" / "phi").iterdir()) == groups and not (tmp_path / "a" / ".partial").exists()


def test_augment_tasks_repartitions_the_same_images():
    rng = np.random.default_rng(0)
    way, shot, query, t = 3, 1, 2, 4
    classes = rng.choice(50, size=(t, way), replace=False)
    images = np.arange(t * way * (shot + query)).reshape(t, way, shot + query)
    tasks = TaskSet(images[:, :, :shot].reshape(t, -1), np.repeat(np.arange(way), shot)[None].repeat(t, 0),
                    images[:, :, shot:].reshape(t, -1), np.repeat(np.arange(way), query)[None].repeat(t, 0), classes)
    aug = augment_tasks(tasks, 5, rng)
    assert aug.n_tasks == 5 * t and np.array_equal(aug.subset(range(t)).support, tasks.support)  # first: as sampled
    assert augment_tasks(tasks, 1, rng).n_tasks == t
    cls_of = {int(i): int(classes[ti, c]) for ti in range(t) for c in range(way) for i in images[ti, c]}
    for k in range(5):
        part = aug.subset(range(k * t, (k + 1) * t))
        assert np.array_equal(np.sort(part.image_ids()), np.arange(images.size))  # same images, each once
        for ti in range(t):
            assert len(set(part.classes[ti])) == way
            for idx, lab in ((part.support[ti], part.support_labels[ti]), (part.query[ti], part.query_labels[ti])):
                assert all(cls_of[int(i)] == part.classes[ti, c] for i, c in zip(idx, lab))  # labels follow classes
    assert not np.array_equal(aug.subset(range(t, 2 * t)).classes, tasks.classes)
    with pytest.raises(ValueError, match="--augment"):
        augment_tasks(tasks, 0, rng)


def test_extractor_sees_only_training_task_images(smoke_store):
    store = open_store(smoke_store)
    ep = store.episodes()
    subset = train_subsets(ep.train.n_tasks, [2], 0)[2]
    idx, classes = extractor_training_set(ep.train.subset(subset))
    assert np.array_equal(idx, ep.train.subset(subset).image_ids())
    assert not set(idx.tolist()) & set(ep.test.image_ids().tolist())
    assert set(classes.tolist()) == set(ep.train.classes[subset].ravel().tolist())
    test_bytes = {x.tobytes() for x in store.images(ep.test.image_ids())}
    assert not any(x.tobytes() in test_bytes for x in store.images()[idx])


def test_embedding_mode_trains_on_training_task_images_only(smoke_store, tmp_path, monkeypatch):
    """The exact arrays handed to train_extractor: images of the subset's training tasks, global class labels;
    no test image among them. The extractor's checkpoints live under the results folder, keyed by subset and seed."""
    import mnkpipe.baselines.extractor as ex
    calls, real = [], ex.train_extractor

    def spy(images, labels, settings, **kw):
        calls.append((np.array(images), np.array(labels), kw["checkpoint_dir"]))
        return real(images, labels, settings, **kw)

    monkeypatch.setattr(ex, "train_extractor", spy)
    cfg = tmp_path / "emb.toml"
    cfg.write_text("[embedding]\nchannels = 8\nepochs = 2\n")
    out = tmp_path / "res"
    r = evaluate(smoke_store, train_counts=[1, 4], seeds=2, out=out, labels=["onehot", "embedding"], config=cfg,
                 cpus=2, progress=False)
    store = open_store(smoke_store)
    ep, pool = store.episodes(), store.images()
    test_images = {x.tobytes() for x in pool[ep.test.image_ids()]}
    assert len(calls) == 4 and len({c[2] for c in calls}) == 4
    for (images, labels, ckpt), (s, n) in zip(calls, [(0, 1), (0, 4), (1, 1), (1, 4)]):
        sub = ep.train.subset(train_subsets(ep.train.n_tasks, [n], s)[n])
        assert not any(x.tobytes() in test_images for x in images)
        assert np.array_equal(images, pool[sub.image_ids()])
        classes = {i: sub.classes[t, c] for part in (("support", "support_labels"), ("query", "query_labels"))
                   for t in range(sub.n_tasks) for i, c in zip(getattr(sub, part[0])[t], getattr(sub, part[1])[t])}
        assert labels.tolist() == [classes[i] for i in sub.image_ids()]
        assert ckpt.parent == out / "extractors" and (ckpt / "key.json").exists()
    for key in ("mnk/embedding/K1", "meta_term/embedding/K1", "r_t/embedding", "embedding_1nn"):
        assert r["methods"][key]["hyperparameters"]["embedding"]["channels"] == 8
        assert all(0 <= a <= 1 for a in r["methods"][key]["mean"])
    only = evaluate(smoke_store, train_counts=[1], seeds=1, out=tmp_path / "only", labels=["embedding"],
                    methods=["mnk"], config=cfg, cpus=2, progress=False)
    assert set(only["methods"]) == {"mnk/embedding/K1"}


def test_nested_training_subsets():
    s = train_subsets(16, [1, 2, 4, 8, 16], seed=3)
    for a, b in [(1, 2), (2, 4), (4, 8), (8, 16)]:
        assert set(s[a]) <= set(s[b])
    assert not np.array_equal(train_subsets(16, [4], 0)[4], train_subsets(16, [4], 1)[4])


@pytest.mark.parametrize("args, option", [
    (["--seeds", "0"], "--seeds"), (["--train-tasks", "abc"], "--train-tasks"), (["--eta", "abc"], "--eta"),
    (["--eta", "-1"], "--eta"), (["--labels", "words"], "--labels"), (["--augment", "0"], "--augment"),
    (["--augment", "x"], "--augment"), (["--train-tasks", "99"], "holds 4"), (["--methods", "mnk,svm"], "--methods"),
])
def test_cli_bad_input_names_the_option_and_writes_nothing(smoke_store, tmp_path, args, option):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["evaluate", "--store", str(smoke_store), "--out", str(out), "--no-progress", *args])
    assert r.exit_code != 0 and option in r.output, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AttributeError, TypeError, KeyError))
    assert not out.exists()


def test_evaluate_on_a_damaged_tile_names_it_and_says_how_to_repair(smoke_store, tmp_path):
    """A chunk overwritten with garbage of the same size passes status's presence check; reading it fails its CRC."""
    damaged = writable_copy(smoke_store, tmp_path / "damaged.zarr")
    for chunk in (damaged / "gram" / "c").glob("*/*"):
        chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["evaluate", "--store", str(damaged), "--out", str(out), "--methods", "r_t,mnk",
                                  "--no-progress"])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert re.search(r"gram tile \(\d+, \d+\) of .* is missing or damaged", r.output), r.output
    assert "mnkpipe verify --repair" in r.output


def test_store_errors(smoke_store, tmp_path):
    incomplete = writable_copy(smoke_store, tmp_path / "incomplete.zarr")
    st = open_store(incomplete, mode="r+")
    for t in st.planned_tiles()[:3]:
        st.clear_record(*t)
    with pytest.raises(StoreError, match=r"3 of \d+ Gram tiles are not done.*compute-kernel"):
        evaluate(incomplete, out=tmp_path / "r1", progress=False)
    no_episodes = writable_copy(smoke_store, tmp_path / "noepisodes.zarr")
    shutil.rmtree(no_episodes / "episodes")
    with pytest.raises(StoreError, match="holds no episodes"):
        evaluate(no_episodes, out=tmp_path / "r2", progress=False)


def test_results_of_another_store_are_never_merged(smoke_store, tmp_path):
    out = tmp_path / "res"
    evaluate(smoke_store, train_counts=[1], seeds=1, out=out, methods=["pixel_1nn"], progress=False)
    saved = json.loads((out / "results.json").read_text())
    saved["fingerprint"], saved["store"] = "0" * 64, "/elsewhere/other.zarr"
    (out / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other\.zarr.*000000000000.*smoke\.zarr"):
        evaluate(smoke_store, train_counts=[1], seeds=1, out=out, methods=["pixel_1nn"], progress=False)
    assert json.loads((out / "results.json").read_text()) == saved


def test_baselines_join_results_and_report_renders_all_methods(smoke_store, tmp_path):
    out = tmp_path / "res"
    evaluate(smoke_store, train_counts=[1, 4], seeds=1, out=out, cpus=2, progress=False)
    settings = baseline_settings(None, blocks=2, filters=8, meta_steps=4, eval_every=2, meta_batch=4)
    r = run_baselines(smoke_store, train_counts=[1, 4], seeds=1, settings=settings, out=out, progress=False)
    for m in ("maml", "imaml"):
        assert all(0 <= a <= 1 for a in r["methods"][m]["mean"])
        assert r["methods"][m]["n_train_characters"] == [3, 12] and r["methods"][m]["hyperparameters"]["filters"] == 8
        assert "BatchNorm" in r["methods"][m]["note"] and "validation tasks" in r["methods"][m]["note"]
    with pytest.raises(ValueError, match="unknown baseline method"):
        run_baselines(smoke_store, methods=["reptile"], out=out, progress=False)
    for x in ("characters", "tasks"):
        res = CliRunner().invoke(main, ["report", "--out", str(out), "--x", x])
        assert res.exit_code == 0, res.output
    for label in ("MNK", "r_t", "1-NN", "MAML", "iMAML", "| seeds |", "12 ch."):
        assert label in res.output
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"mnk/onehot/K1", "meta_term/onehot/K1", "r_t/onehot", "pixel_1nn", "maml",
                                     "imaml", "maml-test-selected", "imaml-test-selected"}


def test_lake_runs_protocol_end_to_end(tmp_path, omniglot_root, monkeypatch_module, ray_instance):
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
    for key, m in r["methods"].items():
        assert all(len(pt) == 20 for pt in m["per_task"])
        # the one-hot meta term alone is at chance by design (docs/math.md sec. 2.3)
        if not key.startswith("meta_term"):
            assert all(1 / 20 <= a <= 1 for a in m["mean"])


def test_cached_reader_equals_the_stored_gram(smoke_store):
    st = open_store(smoke_store)
    g = st.read_gram()
    small = CachedGram(st, max_bytes=1)  # keeps one tile at a time: every block re-read tile by tile
    rows, cols = np.array([0, 5, 60, 2]), np.array([3, 70, 1])
    assert np.array_equal(small(rows, cols), g[np.ix_(rows, cols)])
    assert np.array_equal(small.diag, np.diag(g)) and len(small.tiles) == 1


def test_reference_config_and_embedding_table(tmp_path):
    from mnkpipe.evaluation.labels import embedding_settings
    from mnkpipe.pipeline.config import ConfigError, load_config
    ref = REPO / "configs" / "omniglot-5w1s-reference.toml"
    cfg = load_config(ref)  # an [embedding] table is accepted beside [baselines]
    assert (cfg.data.image_size, cfg.data.pad, cfg.kernel.depth, cfg.tasks.query) == (28, 32, 20, 19)
    assert cfg.tasks.train_tasks * cfg.tasks.way == 20 and cfg.tasks.test_tasks >= 100
    assert embedding_settings(ref).channels == 250
    bad = tmp_path / "bad.toml"
    bad.write_text('[embedding]\nchannels = "many"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml \[embedding\]: channels"):
        embedding_settings(bad)


