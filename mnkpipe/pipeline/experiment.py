"""Dataset -> episodes -> the image pool of one experiment (what the store holds and the Gram is computed on)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import (DataError, EpisodeSet, ImageDataset, TaskSet, fit_standardiser, load_image_folder, load_lake_runs,
                    load_omniglot, omniglot_alphabets, resolve_data_root, sample_episodes, standardise_and_pad)
from ..data.episodes import family_cut, family_permutation, sample_tasks
from .config import ConfigError, ExperimentConfig
from .plan import plan_full, plan_mnk


@dataclass
class Experiment:
    images: np.ndarray       # (N, C, H, W) float32, standardised and padded: train-task images, then test-task images
    val_images: np.ndarray   # images of the validation tasks (for the baselines only; not in the Gram)
    episodes: EpisodeSet     # train/test index `images`, val indexes `val_images`
    n_train_images: int      # images[:n_train_images] belong to training tasks
    mean: float
    std: float
    paths: list[str]         # source of each pool image

    def fingerprint(self) -> str:
        """sha256 over the pool images and the episode arrays: what makes two stores the same experiment."""
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        for key, a in sorted(self.episodes.to_arrays().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def make_plan(plan: str, n: int, tile_size: int, n_train: int, test_tasks) -> np.ndarray:
    """The tile plan (pipeline/plan.py) of a pool of n images whose first n_train belong to training tasks; a pure
    function of the config and the episodes, so a lost plan is rebuilt from the manifest and the stored episodes."""
    if plan == "full":
        return plan_full(n, tile_size)
    return plan_mnk(n, tile_size, n_train, [list(s) + list(q) for s, q in zip(test_tasks.support, test_tasks.query)])


def experiment_plan(cfg: ExperimentConfig, exp: Experiment) -> np.ndarray:
    """The plan of cfg's [compute] table over exp's pool and test tasks."""
    return make_plan(cfg.compute.plan, len(exp.images), cfg.compute.tile_size, exp.n_train_images, exp.episodes.test)


def store_plan(store) -> np.ndarray:
    """The plan the store's manifest (config, pool size) and stored episodes determine."""
    c = store.manifest["config"]["compute"]
    return make_plan(c["plan"], store.n, store.tile_size, int(store.manifest["n_train_images"]), store.episodes().test)


def _load_split(cfg: ExperimentConfig, root: Path, split: str) -> ImageDataset:
    if cfg.data.dataset == "omniglot":
        return load_omniglot(root, split, image_size=cfg.data.image_size)
    return load_image_folder(root / split, image_size=cfg.data.image_size)


def _pool(tasks: TaskSet, start: int) -> tuple[np.ndarray, TaskSet]:
    """Unique images of the tasks in first-use order (support, then query, task by task), and the tasks remapped."""
    order = np.concatenate([np.concatenate([s, q]) for s, q in zip(tasks.support, tasks.query)])
    uniq, first = np.unique(order, return_index=True)
    used = uniq[np.argsort(first)]
    mapping = np.full(order.max() + 1, -1, np.int64)
    mapping[used] = start + np.arange(len(used))
    return used, tasks.remap(mapping)


def build_experiment(cfg: ExperimentConfig, data: str | None = None) -> Experiment:
    """Load the data named by cfg, sample the episodes (seeded), and lay out the image pool."""
    root = resolve_data_root(cfg.data.root or data)
    t = cfg.tasks
    train_ds = _load_split(cfg, root, cfg.data.train_split)
    families = None
    if t.rotations:
        families = np.arange(4 * train_ds.n_classes) % train_ds.n_classes  # a character and its 3 rotations
        train_ds = train_ds.with_rotations()
    val_classes = t.val_classes if t.val_tasks else 0
    if t.protocol == "lake-runs":
        if t.way != 20 or t.shot != 1:
            raise ConfigError("[tasks] protocol = 'lake-runs' has 20-way 1-shot test tasks: set way = 20 and shot = 1")
        test_ds, test = load_lake_runs(root, image_size=cfg.data.image_size)
        ep = _lake_episodes(train_ds, test, t, val_classes, families)
        if cfg.data.dataset == "omniglot":
            check_lake_alphabets(cfg, root, train_ds)
    else:
        test_ds = _load_split(cfg, root, cfg.data.test_split)
        ep = sample_episodes(train_ds, test_ds, way=t.way, shot=t.shot, query=t.query, n_train_tasks=t.train_tasks,
                             n_test_tasks=t.test_tasks, n_val_tasks=t.val_tasks,
                             n_train_classes=t.train_classes or None, n_val_classes=val_classes, seed=t.seed,
                             families=families)
    check_disjoint(cfg, train_ds, test_ds, ep)
    mean, std = fit_standardiser(train_ds.images)
    prep = lambda x: standardise_and_pad(x, mean, std, cfg.data.pad or None)  # noqa: E731
    train_used, train = _pool(ep.train, 0)
    test_used, test = _pool(ep.test, len(train_used))
    images = np.concatenate([prep(train_ds.images[train_used]), prep(test_ds.images[test_used])])
    paths = [train_ds.paths[i] for i in train_used] + [test_ds.paths[i] for i in test_used]
    check_not_blank(images, paths, mean)
    val_images = np.zeros((0,) + images.shape[1:], np.float32)
    val = None
    if ep.val is not None and ep.val.n_tasks:
        val_used, val = _pool(ep.val, 0)
        val_images = prep(train_ds.images[val_used])
        check_not_blank(val_images, [train_ds.paths[i] for i in val_used], mean)
    meta = dict(ep.meta, protocol=t.protocol, dataset=cfg.data.dataset)
    episodes = EpisodeSet(way=ep.way, shot=ep.shot, query=ep.query, seed=ep.seed, train=train, test=test, val=val,
                          meta=meta)
    return Experiment(images=images.astype(np.float32), val_images=val_images.astype(np.float32), episodes=episodes,
                      n_train_images=len(train_used), mean=float(mean), std=float(std), paths=paths)


def check_not_blank(images: np.ndarray, paths: list[str], mean: float) -> None:
    """DataError naming the file of an image whose standardised pixels are all 0 (each equals the training mean):
    its CNTK with every image is 0, so the cosine normalisation K_ij / sqrt(K_ii K_jj) would be 0/0."""
    blank = np.flatnonzero(~np.any(images.reshape(len(images), -1) != 0, axis=1))
    if blank.size:
        more = f" (and {blank.size - 1} more)" if blank.size > 1 else ""
        raise DataError(f"image {paths[blank[0]]}{more} is blank after standardisation (every pixel equals the "
                          f"training mean {mean:.6g}): its kernel with every image is 0, so the normalised kernel "
                          "would be 0/0; remove it from the data (nothing was written)")


def _base_class(name: str) -> str:
    """The class a rotated copy comes from: 'Latin/character01/rot90' -> 'Latin/character01'."""
    head, _, last = name.rpartition("/")
    return head if head and last in ("rot90", "rot180", "rot270") else name


def _class_pool(ds: ImageDataset, ep: EpisodeSet, split: str) -> set[str]:
    """Base class names (rotations folded onto their originals) of the classes a split's tasks are drawn from:
    the sampler's class pool (meta '<split>_classes'), else the classes its tasks use."""
    tasks = ep.splits().get(split)
    ids = ep.meta.get(f"{split}_classes", [] if tasks is None else np.unique(tasks.classes))
    return {_base_class(ds.classes[c]) for c in ids}


def check_disjoint(cfg: ExperimentConfig, train_ds: ImageDataset, test_ds: ImageDataset, ep: EpisodeSet) -> None:
    """The test class pool shares no class (by identity: Omniglot alphabet/character, or class folder) with the
    training or validation pools, and validation none with training, rotations included; ConfigError otherwise."""
    train, val = _class_pool(train_ds, ep, "train"), _class_pool(train_ds, ep, "val")
    test = _class_pool(test_ds, ep, "test")
    where = f"[data] train_split = {cfg.data.train_split!r}, test_split = {cfg.data.test_split!r}"
    for a, b, what in ((train | val, test, f"{where}: training and test"), (train, val, "validation and training")):
        both = sorted(a & b)
        if both:
            raise ConfigError(f"{what} tasks share {len(both)} classes, e.g. {both[:3]}: the split would leak; "
                              "choose splits with disjoint classes (e.g. Omniglot background and evaluation)")


def check_lake_alphabets(cfg: ExperimentConfig, root: Path, train_ds: ImageDataset) -> None:
    """Lake's 20 runs are drawn from the Omniglot evaluation alphabets: the training split (the train and val class
    pool) must hold none of them; ConfigError otherwise."""
    both = sorted(set(train_ds.groups) & set(omniglot_alphabets(root, "evaluation")))
    if both:
        raise ConfigError(f"[data] train_split = {cfg.data.train_split!r} with [tasks] protocol = 'lake-runs': the "
                          f"runs are drawn from the evaluation alphabets, and training would use {len(both)} of them, "
                          f"e.g. {both[:3]}: choose a background split")


def _lake_episodes(train_ds: ImageDataset, test: TaskSet, t, val_classes: int, families) -> EpisodeSet:
    """Training (and validation) tasks from the training split; the 20 official runs as test tasks."""
    rng = np.random.default_rng(t.seed)
    classes = rng.permutation(train_ds.n_classes) if families is None else family_permutation(families, rng)
    val_classes = family_cut(classes, val_classes, families)  # a character's rotations stay on one side
    val_ids, train_ids = classes[:val_classes], classes[val_classes:]
    if t.train_classes:
        train_ids = train_ids[: t.train_classes]
    train = sample_tasks(train_ds.labels, train_ids, way=t.way, shot=t.shot, query=t.query, n_tasks=t.train_tasks,
                         rng=rng)
    val = (sample_tasks(train_ds.labels, val_ids, way=t.way, shot=t.shot, query=t.query, n_tasks=t.val_tasks, rng=rng)
           if t.val_tasks else None)
    return EpisodeSet(way=t.way, shot=t.shot, query=t.query, seed=t.seed, train=train, test=test, val=val,
                      meta={"test": "lake-runs"})
