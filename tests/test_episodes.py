"""Tests of few-shot task sampling (mnkpipe.data.episodes): determinism, disjointness, errors, storage round trip."""

from __future__ import annotations


import numpy as np
import pytest

from mnkpipe.data import DataError, EpisodeSet, TaskSet, load_omniglot, sample_episodes, sample_tasks



@pytest.fixture(scope="module")
def greek_latin(tmp_path_factory, omniglot_root):
    """50 real Omniglot classes (Greek + Latin of background_small1), 20 images each."""
    return load_omniglot(omniglot_root, "background_small1", alphabets=["Greek", "Latin"],
                         cache_dir=tmp_path_factory.mktemp("cache"))


LABELS = np.repeat(np.arange(30), 20)  # 30 classes x 20 images, image i has class i // 20


def _check_tasks(ts: TaskSet, labels: np.ndarray, way: int, shot: int, query: int) -> None:
    assert (ts.way, ts.shot, ts.n_query) == (way, shot, query)
    assert ts.support.shape == ts.support_labels.shape == (ts.n_tasks, way * shot)
    assert ts.query.shape == ts.query_labels.shape == (ts.n_tasks, way * query)
    assert ts.classes.shape == (ts.n_tasks, way)
    for f in ("support", "support_labels", "query", "query_labels", "classes"):
        assert getattr(ts, f).dtype == np.int64
    np.testing.assert_array_equal(ts.support_labels, np.tile(np.repeat(np.arange(way), shot), (ts.n_tasks, 1)))
    np.testing.assert_array_equal(ts.query_labels, np.tile(np.repeat(np.arange(way), query), (ts.n_tasks, 1)))
    for t in range(ts.n_tasks):
        assert len(set(ts.classes[t])) == way
        # every image belongs to the class its label points to
        np.testing.assert_array_equal(labels[ts.support[t]], ts.classes[t][ts.support_labels[t]])
        np.testing.assert_array_equal(labels[ts.query[t]], ts.classes[t][ts.query_labels[t]])
        # no image twice in a task, none in both support and query
        both = np.concatenate([ts.support[t], ts.query[t]])
        assert len(np.unique(both)) == len(both)


def test_sample_tasks_structure():
    ts = sample_tasks(LABELS, np.arange(30), way=5, shot=2, query=3, n_tasks=50, rng=np.random.default_rng(0))
    assert ts.n_tasks == 50
    _check_tasks(ts, LABELS, 5, 2, 3)
    assert len(np.unique(ts.classes)) > 20  # classes vary across tasks


def test_sample_tasks_only_given_classes():
    ts = sample_tasks(LABELS, [3, 7, 11, 19, 25, 28], way=5, shot=1, query=19, n_tasks=20,
                      rng=np.random.default_rng(1))
    assert set(np.unique(ts.classes)) <= {3, 7, 11, 19, 25, 28}
    _check_tasks(ts, LABELS, 5, 1, 19)


def test_sample_tasks_deterministic():
    kw = dict(way=5, shot=1, query=4, n_tasks=30)
    a = sample_tasks(LABELS, np.arange(30), rng=np.random.default_rng(42), **kw)
    b = sample_tasks(LABELS, np.arange(30), rng=np.random.default_rng(42), **kw)
    c = sample_tasks(LABELS, np.arange(30), rng=np.random.default_rng(43), **kw)
    for f in ("support", "support_labels", "query", "query_labels", "classes"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.support, c.support) and not np.array_equal(a.classes, c.classes)


def test_sample_tasks_too_few_classes():
    with pytest.raises(DataError, match=r"only 4 classes .* 5-way"):
        sample_tasks(LABELS, [0, 1, 2, 3], way=5, shot=1, query=1, n_tasks=1, rng=np.random.default_rng(0))


def test_sample_tasks_class_with_too_few_images_named():
    labels = np.concatenate([LABELS, [30] * 3])  # class 30 has only 3 images
    names = [f"Alpha/character{i:02d}" for i in range(31)]
    with pytest.raises(DataError, match=r"class 30 \('Alpha/character30'\) has 3 images"):
        sample_tasks(labels, np.arange(31), way=5, shot=1, query=5, n_tasks=2,
                     rng=np.random.default_rng(0), class_names=names)
    with pytest.raises(DataError, match="class 30 has 3 images"):
        sample_tasks(labels, np.arange(31), way=5, shot=1, query=5, n_tasks=2, rng=np.random.default_rng(0))


def test_sample_episodes_carved_from_one_dataset(greek_latin):
    ds = greek_latin
    ep = sample_episodes(ds, way=5, shot=1, query=19, n_train_tasks=12, n_val_tasks=4, n_test_tasks=6,
                         n_train_classes=20, n_val_classes=10, n_test_classes=10, seed=3)
    tr, va, te = (set(ep.meta[k]) for k in ("train_classes", "val_classes", "test_classes"))
    assert (len(tr), len(va), len(te)) == (20, 10, 10)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert set(np.unique(ep.train.classes)) <= tr
    assert set(np.unique(ep.val.classes)) <= va
    assert set(np.unique(ep.test.classes)) <= te
    for ts in (ep.train, ep.val, ep.test):
        _check_tasks(ts, ds.labels, 5, 1, 19)
    # images of different splits never coincide
    assert not set(ep.train.image_ids()) & set(ep.test.image_ids())
    assert ep.meta["train_class_names"] == [ds.classes[c] for c in ep.meta["train_classes"]]
    assert (ep.way, ep.shot, ep.query, ep.seed) == (5, 1, 19, 3)


def test_sample_episodes_separate_test_source_and_nesting():
    bg = np.repeat(np.arange(40), 20)
    ev = np.repeat(np.arange(25), 20)
    kw = dict(way=5, shot=1, query=5, n_test_tasks=8, n_val_tasks=3, n_val_classes=5)
    small = sample_episodes(bg, ev, n_train_tasks=10, n_train_classes=10, seed=7, **kw)
    large = sample_episodes(bg, ev, n_train_tasks=60, n_train_classes=30, seed=7, **kw)
    assert small.meta["test_classes"] == list(range(25))
    assert not set(small.meta["train_classes"]) & set(small.meta["val_classes"])
    # nested train classes; val and test unchanged by the training budget
    assert large.meta["train_classes"][:10] == small.meta["train_classes"]
    assert large.meta["val_classes"] == small.meta["val_classes"]
    for f in ("support", "query", "classes"):
        np.testing.assert_array_equal(getattr(small.test, f), getattr(large.test, f))
        np.testing.assert_array_equal(getattr(small.val, f), getattr(large.val, f))
    # same seed -> identical, other seed -> different
    again = sample_episodes(bg, ev, n_train_tasks=10, n_train_classes=10, seed=7, **kw)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(again, name).support, getattr(small, name).support)
    other = sample_episodes(bg, ev, n_train_tasks=10, n_train_classes=10, seed=8, **kw)
    assert not np.array_equal(other.train.support, small.train.support)
    assert not np.array_equal(other.test.support, small.test.support)
    # all remaining classes by default
    full = sample_episodes(bg, ev, n_train_tasks=5, seed=7, **kw)
    assert len(full.meta["train_classes"]) == 35


def test_families_stay_on_one_side_of_every_cut():
    """A character and its rotations (one family) never end up in both val (or carved test) and train."""
    labels = np.repeat(np.arange(40), 20)  # 10 characters x 4 rotations: class c + 10 r
    fam = np.arange(40) % 10
    for seed in range(5):
        ep = sample_episodes(labels, way=3, shot=1, query=2, n_train_tasks=4, n_test_tasks=2, n_val_tasks=2,
                             n_val_classes=6, n_test_classes=5, seed=seed, families=fam)
        groups = [set(fam[ep.meta[f"{s}_classes"]]) for s in ("test", "val", "train")]
        assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
        assert len(ep.meta["val_classes"]) == 8 and len(ep.meta["test_classes"]) == 8  # cuts moved up to 2 families
    with pytest.raises(DataError, match="families"):
        sample_episodes(labels, labels.copy(), way=3, shot=1, query=2, n_train_tasks=1, n_test_tasks=1,
                        families=fam[:5])


def test_sample_episodes_errors():
    bg = np.repeat(np.arange(12), 20)
    ev = bg.copy()
    with pytest.raises(DataError, match="test_source is train_source"):
        sample_episodes(bg, bg, way=5, shot=1, query=1, n_train_tasks=1, n_test_tasks=1)
    with pytest.raises(DataError, match="n_train_classes=20"):
        sample_episodes(bg, ev, way=5, shot=1, query=1, n_train_tasks=1, n_test_tasks=1, n_train_classes=20)
    with pytest.raises(DataError, match="n_val_classes"):
        sample_episodes(bg, ev, way=5, shot=1, query=1, n_train_tasks=1, n_test_tasks=1, n_val_tasks=2)
    with pytest.raises(DataError, match="n_test_classes"):
        sample_episodes(bg, way=5, shot=1, query=1, n_train_tasks=1, n_test_tasks=1)
    with pytest.raises(DataError, match=r"only 2 classes .* 5-way"):
        sample_episodes(bg, way=5, shot=1, query=1, n_train_tasks=1, n_test_tasks=1, n_test_classes=10)


def _assert_same(a: EpisodeSet, b: EpisodeSet) -> None:
    assert (a.way, a.shot, a.query, a.seed, a.meta) == (b.way, b.shot, b.query, b.seed, b.meta)
    assert a.splits().keys() == b.splits().keys()
    for name, ts in a.splits().items():
        other = b.splits()[name]
        for f in ("support", "support_labels", "query", "query_labels", "classes"):
            x, y = getattr(ts, f), getattr(other, f)
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def test_episode_set_round_trip(tmp_path):
    bg = np.repeat(np.arange(40), 20)
    ev = np.repeat(np.arange(25), 20)
    ep = sample_episodes(bg, ev, way=5, shot=1, query=19, n_train_tasks=6, n_val_tasks=2, n_test_tasks=3,
                         n_val_classes=5, seed=11)
    ep.meta["note"] = "round trip"
    arrays = ep.to_arrays()
    assert arrays["train/support"].shape == (6, 5) and arrays["meta"].dtype.kind == "U"
    _assert_same(ep, EpisodeSet.from_arrays(arrays))
    path = ep.save(tmp_path / "episodes.bin")  # kept at exactly this path
    assert path == tmp_path / "episodes.bin" and path.is_file()
    _assert_same(ep, EpisodeSet.load(path))
    no_val = EpisodeSet(5, 1, 19, 0, ep.train, ep.test)
    no_val.save(tmp_path / "nv.npz")
    loaded = EpisodeSet.load(tmp_path / "nv.npz")
    assert loaded.val is None
    _assert_same(no_val, loaded)


def test_taskset_subset_remap_and_validation():
    ts = sample_tasks(LABELS, np.arange(30), way=5, shot=1, query=2, n_tasks=10, rng=np.random.default_rng(5))
    sub = ts.subset([7, 2])
    np.testing.assert_array_equal(sub.query, ts.query[[7, 2]])
    np.testing.assert_array_equal(sub.classes, ts.classes[[7, 2]])
    mapping = np.arange(len(LABELS)) + 1000
    moved = ts.remap(mapping)
    np.testing.assert_array_equal(moved.support, ts.support + 1000)
    np.testing.assert_array_equal(moved.query_labels, ts.query_labels)
    with pytest.raises(DataError):
        TaskSet(ts.support, ts.support_labels[:, :3], ts.query, ts.query_labels, ts.classes)
    with pytest.raises(DataError):
        EpisodeSet(way=4, shot=1, query=2, seed=0, train=ts, test=ts)
