"""Few-shot tasks: index-based task sets, seeded N-way K-shot sampling, and class-disjoint train/val/test episode
sets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..files import atomic_write
from .dataset import DataError, ImageDataset

__all__ = ["TaskSet", "EpisodeSet", "sample_tasks", "sample_episodes"]

_TASK_FIELDS = ("support", "support_labels", "query", "query_labels", "classes")


def _int2d(name: str, a) -> np.ndarray:
    """Coerce to a 2-D int64 array (DataError otherwise)."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise DataError(f"TaskSet.{name} must be 2-D (tasks, items), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"TaskSet.{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass
class TaskSet:
    """T few-shot tasks as image indices: support/query (T, way*shot)/(T, way*query), labels in [0, way), class ids
    (T, way)."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        """Coerce to int64 and check that the shapes agree."""
        for name in _TASK_FIELDS:
            setattr(self, name, _int2d(name, getattr(self, name)))
        t, way = self.classes.shape
        if way < 1:
            raise DataError("TaskSet.classes must have at least one class per task")
        for a, b in (("support", "support_labels"), ("query", "query_labels")):
            x, y = getattr(self, a), getattr(self, b)
            if x.shape != y.shape or x.shape[0] != t:
                raise DataError(f"TaskSet.{a} {x.shape} / {b} {y.shape} do not match {t} tasks")
            if x.shape[1] % way:
                raise DataError(f"TaskSet.{a} has {x.shape[1]} items per task, not a multiple of way={way}")
            if y.size and (y.min() < 0 or y.max() >= way):
                raise DataError(f"TaskSet.{b} must lie in [0, {way})")

    @property
    def n_tasks(self) -> int:
        """Number of tasks T."""
        return int(self.classes.shape[0])

    @property
    def way(self) -> int:
        """Classes per task."""
        return int(self.classes.shape[1])

    @property
    def shot(self) -> int:
        """Support images per class."""
        return int(self.support.shape[1] // self.way)

    @property
    def n_query(self) -> int:
        """Query images per class."""
        return int(self.query.shape[1] // self.way)

    def subset(self, task_ids) -> "TaskSet":
        """The tasks task_ids (in that order)."""
        ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        return TaskSet(*(getattr(self, n)[ids] for n in _TASK_FIELDS))

    def remap(self, mapping: np.ndarray, class_mapping: np.ndarray | None = None) -> "TaskSet":
        """Image indices i -> mapping[i] (and, if given, class ids c -> class_mapping[c]); labels unchanged."""
        mapping = np.asarray(mapping, dtype=np.int64)
        classes = self.classes if class_mapping is None else np.asarray(class_mapping, dtype=np.int64)[self.classes]
        return TaskSet(mapping[self.support], self.support_labels, mapping[self.query], self.query_labels, classes)

    def image_ids(self) -> np.ndarray:
        """Sorted unique image indices used by any task (support or query)."""
        return np.unique(np.concatenate([self.support.ravel(), self.query.ravel()]))

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Flat dict {prefix + field: array}."""
        return {prefix + n: getattr(self, n) for n in _TASK_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> "TaskSet":
        """Inverse of to_arrays."""
        return cls(*(np.asarray(arrays[prefix + n]) for n in _TASK_FIELDS))


def _scalar(a) -> object:
    """First element of a scalar-like array (0-d or shape (1,))."""
    return np.asarray(a).reshape(-1)[0]


def _json_default(o):
    """JSON encoder fallback for numpy scalars and arrays."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


@dataclass
class EpisodeSet:
    """Train / (val) / test TaskSets of one way-shot-query protocol, with the seed and JSON-able metadata."""

    way: int
    shot: int
    query: int
    seed: int
    train: TaskSet
    test: TaskSet
    val: TaskSet | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that every TaskSet has `way` classes per task."""
        for name in ("train", "val", "test"):
            ts = getattr(self, name)
            if ts is not None and ts.way != self.way:
                raise DataError(f"EpisodeSet.{name} has {ts.way}-way tasks but way={self.way}")

    def splits(self) -> dict[str, TaskSet]:
        """{'train': ..., 'val': ... (if any), 'test': ...}."""
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays ('train/support', ..., 'way', 'shot', 'query', 'seed' as (1,) int64, 'meta' as (1,)
        JSON str)."""
        out: dict[str, np.ndarray] = {
            k: np.array([int(getattr(self, k))], dtype=np.int64) for k in ("way", "shot", "query", "seed")
        }
        out["meta"] = np.array([json.dumps(self.meta, sort_keys=True, default=_json_default)])
        for name, ts in self.splits().items():
            out.update(ts.to_arrays(name + "/"))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "EpisodeSet":
        """Inverse of to_arrays (accepts any mapping of array-likes, e.g. an NpzFile or a zarr group)."""
        has_val = "val/support" in arrays
        meta = json.loads(str(_scalar(arrays["meta"]))) if "meta" in arrays else {}
        return cls(
            way=int(_scalar(arrays["way"])),
            shot=int(_scalar(arrays["shot"])),
            query=int(_scalar(arrays["query"])),
            seed=int(_scalar(arrays["seed"])),
            train=TaskSet.from_arrays(arrays, "train/"),
            test=TaskSet.from_arrays(arrays, "test/"),
            val=TaskSet.from_arrays(arrays, "val/") if has_val else None,
            meta=meta,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write to an .npz file at exactly `path` (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda f: np.savez_compressed(f, **self.to_arrays()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EpisodeSet":
        """Read an EpisodeSet written by save."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files})
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot read episode file {path}: {exc}") from exc


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    """Human-readable name of class id c."""
    return f"class {c} ({class_names[c]!r})" if class_names is not None else f"class {c}"


def sample_tasks(
    labels: np.ndarray,
    class_ids: Sequence[int],
    *,
    way: int,
    shot: int,
    query: int,
    n_tasks: int,
    rng: np.random.Generator,
    class_names: Sequence[str] | None = None,
) -> TaskSet:
    """n_tasks random way-shot tasks over class_ids: image indices into labels, support and query class-major.

    Per task: `way` distinct classes (label = draw order), shot + query distinct images each (first `shot` =
    support). Every class in class_ids needs shot + query images; class_names only improves error messages.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if way < 1 or shot < 1 or query < 0 or n_tasks < 0:
        raise DataError(f"need way >= 1, shot >= 1, query >= 0, n_tasks >= 0; got {way}, {shot}, {query}, {n_tasks}")
    cls = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if len(np.unique(cls)) != len(cls):
        raise DataError("class_ids contain duplicates")
    if len(cls) < way:
        raise DataError(f"only {len(cls)} classes available for {way}-way tasks")
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    per_class = {}
    need = shot + query
    for c in cls:
        lo, hi = np.searchsorted(sorted_labels, [c, c + 1])
        if hi - lo < need:
            raise DataError(
                f"{_class_name(int(c), class_names)} has {hi - lo} images, "
                f"fewer than shot + query = {shot} + {query} = {need}"
            )
        per_class[int(c)] = order[lo:hi]
    support = np.empty((n_tasks, way * shot), dtype=np.int64)
    query_idx = np.empty((n_tasks, way * query), dtype=np.int64)
    chosen = np.empty((n_tasks, way), dtype=np.int64)
    for t in range(n_tasks):
        chosen[t] = rng.choice(cls, size=way, replace=False)
        for j, c in enumerate(chosen[t]):
            pick = rng.choice(per_class[int(c)], size=need, replace=False)
            support[t, j * shot:(j + 1) * shot] = pick[:shot]
            query_idx[t, j * query:(j + 1) * query] = pick[shot:]
    s_lab = np.broadcast_to(np.repeat(np.arange(way, dtype=np.int64), shot), support.shape).copy()
    q_lab = np.broadcast_to(np.repeat(np.arange(way, dtype=np.int64), query), query_idx.shape).copy()
    return TaskSet(support, s_lab, query_idx, q_lab, chosen)


def _labels_and_names(source, what: str) -> tuple[np.ndarray, list[str] | None, int]:
    """(labels, class names or None, number of classes) of an ImageDataset or a label array."""
    if isinstance(source, ImageDataset):
        return source.labels, list(source.classes), source.n_classes
    labels = np.asarray(source)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{what} must be an ImageDataset or a 1-D integer label array")
    return labels.astype(np.int64), None, int(labels.max()) + 1 if labels.size else 0


def family_permutation(fam: np.ndarray, rng) -> np.ndarray:
    """Class ids in a random order of their families, each family's classes together in ascending order."""
    return np.concatenate([np.flatnonzero(fam == f) for f in rng.permutation(np.unique(fam))])


def family_cut(order: np.ndarray, n: int, fam: np.ndarray | None) -> int:
    """n, moved up to the next family boundary of the class order (n itself without families)."""
    if fam is None:
        return n
    while 0 < n < len(order) and fam[order[n]] == fam[order[n - 1]]:
        n += 1
    return n


def sample_episodes(
    train_source: ImageDataset | np.ndarray,
    test_source: ImageDataset | np.ndarray | None = None,
    *,
    way: int,
    shot: int,
    query: int,
    n_train_tasks: int,
    n_test_tasks: int,
    n_val_tasks: int = 0,
    n_train_classes: int | None = None,
    n_val_classes: int = 0,
    n_test_classes: int | None = None,
    seed: int = 0,
    families: np.ndarray | None = None,
) -> EpisodeSet:
    """Seeded train / val / test TaskSets over class-disjoint class sets (an EpisodeSet).

    Train and val classes come from train_source (an ImageDataset or its labels, e.g. Omniglot background), test
    classes from test_source (all, or n_test_classes at random), or, with test_source=None, are carved from
    train_source too. One seeded permutation of train_source's classes is cut into [test (if carved) | val
    (n_val_classes) | train (n_train_classes, None = the rest)], so for one seed smaller training class sets are
    prefixes of larger ones. Train/val/test tasks use independent seed streams: test and val tasks do not change
    with n_train_classes or n_train_tasks. Train/val indices point into train_source, test indices into
    test_source (or train_source). meta holds the class ids (and names) of each split.

    families: one id per train_source class (e.g. the character a rotated copy comes from). Then the permutation
    keeps each family's classes together and the test/val cuts move up to a family boundary, so no family has
    classes on both sides of a cut (val disjoint from train including rotations).
    """
    ss = np.random.SeedSequence(seed)
    split_rng, train_rng, val_rng, test_rng = (np.random.default_rng(s) for s in ss.spawn(4))
    tr_labels, tr_names, tr_k = _labels_and_names(train_source, "train_source")
    fam = None if families is None else np.asarray(families, dtype=np.int64)
    if fam is not None and fam.shape != (tr_k,):
        raise DataError(f"families must give one id per train_source class ({tr_k}), got shape {fam.shape}")
    perm = split_rng.permutation(tr_k) if fam is None else family_permutation(fam, split_rng)
    if test_source is not None and test_source is train_source:
        raise DataError("sample_episodes: test_source is train_source; "
                        "pass test_source=None to carve disjoint test classes")
    if test_source is None:
        if n_test_classes is None:
            raise DataError("sample_episodes: with test_source=None give n_test_classes (carved from train_source)")
        te_labels, te_names = tr_labels, tr_names
        if n_test_classes > tr_k:
            raise DataError(f"n_test_classes={n_test_classes} but train_source has only {tr_k} classes")
        cut = family_cut(perm, n_test_classes, fam)
        test_cls, rest = perm[:cut], perm[cut:]
    else:
        te_labels, te_names, te_k = _labels_and_names(test_source, "test_source")
        te_perm = split_rng.permutation(te_k)
        if n_test_classes is not None and n_test_classes > te_k:
            raise DataError(f"n_test_classes={n_test_classes} but test_source has only {te_k} classes")
        test_cls = np.sort(te_perm[:n_test_classes]) if n_test_classes is not None else np.arange(te_k)
        rest = perm
    if n_val_tasks > 0 and n_val_classes < way:
        raise DataError(f"n_val_tasks={n_val_tasks} needs n_val_classes >= way={way}, got {n_val_classes}")
    if n_val_classes > len(rest):
        raise DataError(f"n_val_classes={n_val_classes} but only {len(rest)} classes are left for val and train")
    cut = family_cut(rest, n_val_classes, fam)
    val_cls, pool = rest[:cut], rest[cut:]
    if n_train_classes is not None:
        if n_train_classes > len(pool):
            raise DataError(f"n_train_classes={n_train_classes} but only {len(pool)} classes are left for training")
        pool = pool[:n_train_classes]
    train_cls = pool

    common = dict(way=way, shot=shot, query=query)
    train = sample_tasks(tr_labels, train_cls, n_tasks=n_train_tasks, rng=train_rng, class_names=tr_names, **common)
    val = (sample_tasks(tr_labels, val_cls, n_tasks=n_val_tasks, rng=val_rng, class_names=tr_names, **common)
           if n_val_tasks > 0 else None)
    test = sample_tasks(te_labels, test_cls, n_tasks=n_test_tasks, rng=test_rng, class_names=te_names, **common)
    meta = {
        "protocol": "sample_episodes",
        "test_source": "train_source" if test_source is None else "test_source",
        "train_classes": [int(c) for c in train_cls],
        "val_classes": [int(c) for c in val_cls],
        "test_classes": [int(c) for c in test_cls],
    }
    if tr_names is not None:
        meta["train_class_names"] = [tr_names[c] for c in train_cls]
        meta["val_class_names"] = [tr_names[c] for c in val_cls]
    if te_names is not None:
        meta["test_class_names"] = [te_names[c] for c in test_cls]
    return EpisodeSet(way=way, shot=shot, query=query, seed=int(seed), train=train, test=test, val=val, meta=meta)
