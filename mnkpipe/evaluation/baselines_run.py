"""MAML and iMAML on exactly the store's episodes: the same training subsets as evaluate, validation-selected.

Checkpoints and results are tied to the store: checkpoint folders are keyed by the store's Gram key (fingerprint
and kernel settings) and the settings (and each checkpoint checks them on load), each made under its own lock, and
results are never merged into a results.json written for another Gram (a store rebuilt at the same path with another
seed, other tasks or another kernel).
"""

import time
from dataclasses import asdict

import numpy as np

from ..baselines.train import BASELINE_METHODS, BaselineSettings, chosen_on_test, resolve_device, run_baseline
from ..keys import settings_key
from ..pipeline.config import read_table, section
from ..store import open_store
from .derived import check_results_dir, claim_results_dir, held, store_gram_key
from .protocol import check_train_counts, default_counts, subset_size, train_subsets
from .mirror import local_results, results_location
from .report import chosen_on_test_key, render, write_results
from .results import merged, method_record, results_header

def baseline_settings(config_path=None, **overrides) -> BaselineSettings:
    """[baselines] table of a TOML file (optional, types checked) plus keyword overrides; ranges validated."""
    table, where = read_table(config_path, "baselines")
    s = section(BaselineSettings, {**table, **{k: v for k, v in overrides.items() if v is not None}}, where)
    s.validate(where)
    return s


def checkpoint_key(gram_key: str, way: int, settings: BaselineSettings) -> str:
    """sha256 of the store's Gram key, way and the settings except meta_steps (a longer run resumes a shorter one)."""
    ident = {"store": gram_key, "way": way,
             "settings": {k: v for k, v in asdict(settings).items() if k != "meta_steps"}}
    return settings_key(ident)


def biased_note(method: str, settings: BaselineSettings) -> str:
    """What a test-selected record is, plainly: chosen on the test tasks, so not an estimate for new tasks."""
    return (f"BIASED UPWARDS: the same {method} runs, but for each count and seed the checkpoint with the best mean "
            f"accuracy on the test tasks themselves (among the steps evaluated: every {settings.eval_every} and the "
            "last), as the authors' notebook reports MAML and iMAML; selection on the test set, shown only to measure "
            f"that bias beside the validation-selected \"{method}\" (runs: the chosen step per count and seed).")


def run_baselines(store_path, *, methods=BASELINE_METHODS, train_counts=None, seeds: int = 1, settings=None, out=None,
                  progress: bool = True, device: str = "auto") -> dict:
    """For each method, count n and seed: meta-train on the seed's first n training tasks, select on val, test;
    beside each method's record, its test-selected one (the checkpoint of best mean test accuracy: biased upwards)."""
    unknown = set(methods) - set(BASELINE_METHODS)
    if unknown:
        raise ValueError(f"unknown baseline method(s) {sorted(unknown)}; choose from {', '.join(BASELINE_METHODS)}")
    if int(seeds) < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}")
    settings = settings or BaselineSettings()
    settings.validate()
    device = resolve_device(device)
    store = open_store(store_path)
    ep = store.episodes()
    if ep.val is None or ep.val.n_tasks == 0:
        raise ValueError(f"{store.path} has no validation tasks ([tasks] val_tasks = 0): the baselines select on them")
    counts = check_train_counts(train_counts or default_counts(ep.train.n_tasks), ep.train.n_tasks)
    with local_results(results_location(store.path, out), progress, render) as local:
        return _train_and_test(store, local.folder, methods, counts, seeds, settings, progress, device)


def _train_and_test(store, folder, methods, counts, seeds: int, settings, progress: bool, device: str) -> dict:
    """run_baselines' work with the results in the local folder `folder`."""
    gram_key = store_gram_key(store)
    ep = store.episodes()
    out_dir = check_results_dir(folder, store.path)  # outside the store, made by mnkpipe
    results = results_header(store)
    merged(out_dir / "results.json", results)  # refuses another store's results before any training
    claim_results_dir(out_dir, store.path)
    val_images = store.array("val_images")[...]
    images = np.concatenate([store.images(), val_images])  # validation tasks index val_images: stack them after
    val = ep.val.remap(np.arange(len(val_images)) + store.n)  # the pool and shift their indices
    ckpt_root = out_dir / "checkpoints"
    key = checkpoint_key(gram_key, ep.way, settings)
    for method in methods:
        per = {n: np.zeros((seeds, ep.test.n_tasks)) for n in counts}
        per_biased = {n: np.zeros((seeds, ep.test.n_tasks)) for n in counts}
        info, info_biased = {}, {}
        t0 = time.time()
        for s in range(seeds):
            for n, subset in train_subsets(ep.train.n_tasks, counts, s).items():
                ckpt = ckpt_root / f"{method}-n{n}-s{s}-{key}"
                with held(out_dir, ckpt):  # one run trains it, a second one on the same folder waits and resumes it
                    r = run_baseline(method, images, ep.train.subset(subset), val, ep.test, way=ep.way,
                                     settings=settings, seed=s, checkpoint_dir=ckpt, progress=progress, device=device,
                                     run_key={"gram_key": gram_key, "train_tasks": subset.tolist()})
                per[n][s] = r["test_acc"]
                info[f"n{n}-s{s}"] = {"best_step": r["best_step"], "best_val_acc": r.get("best_val_acc"),
                                      "seconds": r["seconds"]}
                step, per_biased[n][s] = chosen_on_test(r["test_curve"])
                info_biased[f"n{n}-s{s}"] = {"best_step": step, "best_test_acc": float(per_biased[n][s].mean()),
                                             "validation_best_step": r["best_step"],
                                             "test_curve": [[k, float(np.mean(a))] for k, a in r["test_curve"]]}
                bn = r["bn_mode"]
        sizes = {n: [subset_size(ep.train, train_subsets(ep.train.n_tasks, [n], s)[n]) for s in range(seeds)]
                 for n in counts}
        note = (f"{bn} Checkpoint chosen on {ep.val.n_tasks} validation tasks from training-split classes unused "
                f"by the training tasks; {settings.meta_steps} meta-steps; {seeds} seed(s); device {device}; "
                f"{time.time() - t0:.0f} s in this call (finished checkpoints are reused, not retrained).")
        hyper = dict(asdict(settings), device=device)
        summary = method_record(counts, per, sizes, hyper, note=note)
        summary["runs"] = info
        results["methods"][method] = summary
        biased = method_record(counts, per_biased, sizes, hyper, note=biased_note(method, settings))
        biased["runs"] = info_biased
        results["methods"][chosen_on_test_key(method)] = biased
        write_results(results, out_dir)
    return results
