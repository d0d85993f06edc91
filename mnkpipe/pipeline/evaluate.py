"""Meta-test evaluation on a stored Gram: MNK, support-only CNTK regression (r_t) and pixel 1-NN vs training tasks."""

import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..kernels import mnk
from ..store import StoreError, open_store
from .mnk_tiles import INF, mnk_settings, prepare_mnk_array, reader_for, task_ops_list

KERNEL_METHODS = ("mnk", "cntk_support", "pixel_1nn")
ALL_METHODS = KERNEL_METHODS + ("maml", "imaml")
LABELS = {"mnk": "MNK (meta neural kernel)", "cntk_support": "CNTK on test support only (r_t, no meta-training)",
          "pixel_1nn": "1-NN on pixels", "maml": "MAML (2nd order)", "imaml": "iMAML (CG)"}


def results_dir(store_path, out=None) -> Path:
    """Where evaluate/baselines/report write: --out, or <store>-results beside the store."""
    if out:
        return Path(out)
    p = Path(store_path).resolve()
    return p.with_name(p.name + "-results")


def train_subsets(n_train: int, counts, seed: int) -> dict[int, np.ndarray]:
    """Nested random subsets of the training tasks: one permutation per seed, its first n for each count n."""
    perm = np.random.default_rng(1000 + seed).permutation(n_train)
    return {int(n): np.sort(perm[:n]) for n in counts}


def check_counts(counts, n_train: int) -> list[int]:
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"--train-tasks must be positive integers; got {counts}")
    if counts[-1] > n_train:
        raise ValueError(f"--train-tasks asks for {counts[-1]} training tasks but the store holds {n_train}")
    return counts


def default_counts(n_train: int) -> list[int]:
    """1, 2, 4, ... up to the number of training tasks (which is always included)."""
    return sorted({2 ** k for k in range(int(math.log2(n_train)) + 1)} | {n_train})


def ci95(per_task: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval over test tasks (each task's accuracy averaged over seeds first), clipped to [0, 1]."""
    x = np.asarray(per_task, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    h = _t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, max(0.0, m - h), min(1.0, m + h)


def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t (table for small df, normal approximation with a correction beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    if df in table:
        return table[df]
    below = max(k for k in table if k <= df) if df > 1 else 1
    return table[below] if df < 120 else 1.96 + 2.4 / df


def pixel_1nn(images: np.ndarray, task) -> float:
    """Accuracy of labelling each query by its nearest support image (Euclidean, standardised pixels)."""
    s = images[task[0]].reshape(len(task[0]), -1)
    q = images[task[2]].reshape(len(task[2]), -1)
    d = (q * q).sum(1)[:, None] - 2 * q @ s.T + (s * s).sum(1)[None, :]
    return float(np.mean(task[1][d.argmin(1)] == task[3]))


def check_complete(store) -> None:
    missing = store.missing_tiles("gram")
    if missing:
        cfg = store.manifest["config"]
        raise StoreError(f"{store.path}: {len(missing)} of {len(store.planned_tiles('gram'))} Gram tiles are not done. "
                         f"Finish them first: mnkpipe compute-kernel --config <the {cfg['kernel']['name']} config> "
                         f"--store {store.path} (the same command that started it resumes it)")


def evaluate(store_path, *, train_counts=None, seeds: int = 3, out=None, methods=KERNEL_METHODS, ridge: float = 1e-5,
             eta: float = INF, t_outer: float = INF, normalise: bool = True, cpus: int | None = None,
             address: str | None = None, progress: bool = True) -> dict:
    """Accuracy of MNK, r_t and pixel 1-NN on every test task, for nested subsets of training tasks and K seeds."""
    unknown = set(methods) - set(KERNEL_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)} for evaluate; choose from {', '.join(KERNEL_METHODS)} "
                         "(maml and imaml come from `mnkpipe baselines`)")
    store = open_store(store_path, mode="r+")
    episodes = store.episodes()  # raises a clear StoreError when the store holds none
    check_complete(store)
    n_train = episodes.train.n_tasks
    counts = check_counts(train_counts or default_counts(n_train), n_train)
    settings = mnk_settings(ridge, eta, normalise)
    results = {"store": str(store.path), "settings": dict(settings, t_outer=str(float(t_outer)), seeds=seeds),
               "n_test_tasks": episodes.test.n_tasks, "way": episodes.way, "shot": episodes.shot, "methods": {}}

    kb = reader_for(store, settings)
    test_ops = task_ops_list(kb, episodes.test, settings)
    test_tasks = list(zip(episodes.test.support, episodes.test.support_labels, episodes.test.query,
                          episodes.test.query_labels))
    flat = {}
    if "cntk_support" in methods:
        flat["cntk_support"] = np.array([mnk.accuracy(t.r_q, t.y_q.argmax(1)) for t in test_ops])
    if "pixel_1nn" in methods:
        images = store.images()
        flat["pixel_1nn"] = np.array([pixel_1nn(images, t) for t in test_tasks])
    for name, acc in flat.items():  # these do not use the training tasks: the same at every count
        results["methods"][name] = _summary(counts, {n: np.tile(acc, (seeds, 1)) for n in counts})

    if "mnk" in methods:
        from .driver import run_tiles
        prepare_mnk_array(store, settings)
        run_tiles(store.path, name="mnk", cpus=cpus, address=address, progress=progress)
        phi = open_store(store.path).read_gram("mnk")
        train_ops = task_ops_list(kb, episodes.train, settings)
        offsets = np.cumsum([0] + [t.n_q for t in train_ops])
        per = {n: np.zeros((seeds, len(test_ops))) for n in counts}
        bar = tqdm(total=seeds * len(counts), desc="MNK fits", disable=not progress)
        for s in range(seeds):
            for n, subset in train_subsets(n_train, counts, s).items():
                rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in subset])
                ops = [train_ops[i] for i in subset]
                fit = mnk.mnk_fit(ops, phi[np.ix_(rows, rows)], ridge=ridge, t_outer=t_outer, normalise_phi=normalise)
                per[n][s] = [mnk.accuracy(mnk.mnk_predict(kb, ops, t, fit=fit), t.y_q.argmax(1)) for t in test_ops]
                bar.update()
        bar.close()
        results["methods"]["mnk"] = _summary(counts, per)
    write_results(results, results_dir(store.path, out), merge=True)
    return results


def _summary(counts, per: dict) -> dict:
    """{n: (seeds, tasks) accuracies} -> lists per count: mean, CI, and the per-task seed means."""
    out = {"n_train_tasks": [], "mean": [], "ci95": [], "per_task": []}
    for n in counts:
        task_means = per[n].mean(0)
        m, lo, hi = ci95(task_means)
        out["n_train_tasks"].append(int(n))
        out["mean"].append(m)
        out["ci95"].append([lo, hi])
        out["per_task"].append(task_means.tolist())
    return out


def write_results(results: dict, out: Path, merge: bool = True) -> Path:
    """results.json (merged with what is there: baselines and kernel methods share it), .csv, .md and the plot."""
    from .report import render
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if merge and path.exists():
        old = json.loads(path.read_text())
        old["methods"].update(results["methods"])
        results = dict(old, **{k: v for k, v in results.items() if k != "methods"}, methods=old["methods"])
    path.write_text(json.dumps(results, indent=1))
    render(out)
    return path
