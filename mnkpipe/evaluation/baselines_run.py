"""MAML and iMAML on exactly the store's episodes: the same training subsets as evaluate, validation-selected."""

import time
from dataclasses import asdict, fields

import numpy as np

from ..baselines.train import BaselineSettings, run_baseline
from ..store import open_store
from .protocol import check_counts, default_counts, subset_size, train_subsets
from .report import write_results
from .results import method_record, results_dir, results_header

METHODS = ("maml", "imaml")


def baseline_settings(config_path=None, **overrides) -> BaselineSettings:
    """[baselines] table of a TOML file (optional) plus keyword overrides."""
    s = BaselineSettings()
    table = {}
    if config_path:
        import tomllib
        with open(config_path, "rb") as f:
            table = tomllib.load(f).get("baselines", {})
    names = {f.name for f in fields(s)}
    for k, v in {**table, **{k: v for k, v in overrides.items() if v is not None}}.items():
        if k not in names:
            raise ValueError(f"unknown baseline setting {k!r}; known: {', '.join(sorted(names))}")
        setattr(s, k, type(getattr(s, k))(v))
    return s


def run_baselines(store_path, *, methods=METHODS, train_counts=None, seeds: int = 1, settings=None, out=None,
                  progress: bool = True) -> dict:
    """For each method, count n and seed: meta-train on the seed's first n training tasks, select on val, test."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown baseline method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    store = open_store(store_path)
    ep = store.episodes()
    if ep.val is None or ep.val.n_tasks == 0:
        raise ValueError(f"{store.path} has no validation tasks ([tasks] val_tasks = 0): the baselines select on them")
    settings = settings or BaselineSettings()
    counts = check_counts(train_counts or default_counts(ep.train.n_tasks), ep.train.n_tasks)
    val_images = store.array("val_images")[...]
    images = np.concatenate([store.images(), val_images])  # validation tasks index val_images: stack them after
    val = ep.val.remap(np.arange(len(val_images)) + store.n)  # the pool and shift their indices
    out_dir = results_dir(store.path, out)
    ckpt_root = out_dir / "checkpoints"
    results = results_header(store)
    sizes = {n: [subset_size(ep.train, sub[n]) for sub in (train_subsets(ep.train.n_tasks, counts, s)
                                                            for s in range(seeds))] for n in counts}
    for method in methods:
        per = {n: np.zeros((seeds, ep.test.n_tasks)) for n in counts}
        info = {}
        t0 = time.time()
        for s in range(seeds):
            for n, subset in train_subsets(ep.train.n_tasks, counts, s).items():
                r = run_baseline(method, images, ep.train.subset(subset), val, ep.test, way=ep.way,
                                 settings=settings, seed=s, checkpoint_dir=ckpt_root / f"{method}-n{n}-s{s}",
                                 progress=progress)
                per[n][s] = r["test_acc"]
                info[f"n{n}-s{s}"] = {"best_step": r["best_step"], "best_val_acc": r.get("best_val_acc")}
                bn = r["bn_mode"]
        summary = method_record(counts, per, sizes, asdict(settings))
        summary["note"] = (f"{bn} Checkpoint chosen on {ep.val.n_tasks} validation tasks from training-split classes "
                           f"unused by the training tasks; {settings.meta_steps} meta-steps; "
                           f"{time.time() - t0:.0f} s in all.")
        summary["runs"] = info
        results["methods"][method] = summary
        write_results(results, out_dir)
    return results

