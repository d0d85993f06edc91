"""What results.json holds: its header (store, Gram key, config, versions), one record per method, and merging that
refuses results of another store or kernel."""

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from .. import __version__
from ..files import read_json
from .derived import RESULTS_FORMAT, gram_key, gram_settings, store_gram_key, store_where

METHOD_NAMES = {"mnk": "MNK", "meta_term": "MNK meta term alone", "r_t": "CNTK on test support only (r_t)",
                "embedding_1nn": "1-NN in the extractor's embedding space", "pixel_1nn": "1-NN on pixels",
                "maml": "MAML (2nd order)", "imaml": "iMAML (CG)"}


def method_key(method: str, labels: str | None = None, augment: int | None = None) -> str:
    """results.json key of a method variant: mnk/embedding/K15, r_t/onehot, pixel_1nn, maml, ..."""
    return "/".join([method] + ([labels] if labels else []) + ([f"K{augment}"] if augment else []))


VARIANT_NAMES = {"authors": "authors' conventions", "valridge": "ridge chosen on validation tasks"}


def method_label(key: str) -> str:
    """Human label of a method key: 'MNK, embedding labels, tasks x15'; mnk-authors-valridge/...: 'MNK, authors'
    conventions, ridge chosen on validation tasks'."""
    method, *rest = key.split("/")
    base, *tags = method.split("-")
    parts = [METHOD_NAMES.get(base, base)] + [VARIANT_NAMES.get(t, t) for t in tags]
    for r in rest:
        parts.append(f"tasks x{r[1:]}" if r.startswith("K") else f"{r} labels")
    return ", ".join(parts)


def results_dir(store_path, out=None) -> Path:
    """Where evaluate/baselines/report write: --out, or <store>-results beside the store."""
    if out:
        return Path(out)
    p = Path(store_path).resolve()
    return p.with_name(p.name + "-results")


def ci95(per_task: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval over test tasks (each task's accuracy averaged over seeds first), clipped to [0, 1]."""
    x = np.asarray(per_task, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    h = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, max(0.0, m - h), min(1.0, m + h)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (two-sided 95% interval)."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1; got {df}")
    return float(student_t.ppf(0.975, df))


def paired_differences(a: dict, b: dict) -> dict[int, tuple[float, float, float]]:
    """{n: (mean, low, high)} of d_t = acc_A(t) - acc_B(t) over the test tasks t (seed-averaged per_task of two
    method records), with its 95% t-interval, at each number of training tasks n that both records hold."""
    pb = dict(zip(b["n_train_tasks"], b["per_task"]))
    out = {}
    for n, pa in zip(a["n_train_tasks"], a["per_task"]):
        if n not in pb:
            continue
        if len(pa) != len(pb[n]):
            raise ValueError(f"at {n} training tasks the records hold {len(pa)} and {len(pb[n])} test tasks: "
                             "not the same test tasks, so not paired")
        d = np.asarray(pa, float) - np.asarray(pb[n], float)
        h = t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        out[int(n)] = (float(d.mean()), float(d.mean()) - h, float(d.mean()) + h)
    return out


def method_record(counts, per: dict, sizes: dict, hyperparameters: dict, note: str | None = None) -> dict:
    """One method's results: per[n] is a (seeds, test tasks) accuracy array and sizes[n] the (characters, images)
    of each seed's training subset at count n; mean and 95% CI over test tasks of the seed-averaged accuracy."""
    out = {"n_train_tasks": [], "n_train_characters": [], "n_train_images": [], "sizes_per_seed": [], "mean": [],
           "ci95": [], "per_task": [], "per_seed": [], "seeds": int(per[counts[0]].shape[0]),
           "hyperparameters": hyperparameters}
    for n in counts:
        acc = np.asarray(per[n], float)
        m, lo, hi = ci95(acc.mean(0))
        out["n_train_tasks"].append(int(n))
        out["n_train_characters"].append(float(np.mean([c for c, _ in sizes[n]])))
        out["n_train_images"].append(float(np.mean([i for _, i in sizes[n]])))
        out["sizes_per_seed"].append([[int(c), int(i)] for c, i in sizes[n]])
        out["mean"].append(m)
        out["ci95"].append([lo, hi])
        out["per_task"].append(acc.mean(0).tolist())
        out["per_seed"].append(acc.tolist())
    if note:
        out["note"] = note
    return out


def results_header(store) -> dict:
    """Where the numbers come from: store path, Gram key and fingerprint, its config, mnkpipe version and git
    commit, date."""
    ep = store.episodes()
    return {"format": RESULTS_FORMAT, "store": store_where(store), "gram_key": store_gram_key(store),
            "fingerprint": store.manifest["fingerprint"], "config": store.manifest["config"],
            "mnkpipe_version": __version__, "git_commit": _git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_test_tasks": ep.test.n_tasks, "way": ep.way, "shot": ep.shot, "methods": {}}


def _git_commit() -> str | None:
    """HEAD of the checkout mnkpipe runs from (with '+dirty' when it has uncommitted changes), None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def header_key(header: dict) -> str:
    """The Gram key of a results header, from its fingerprint and config (headers without a gram_key too)."""
    return gram_key(header.get("fingerprint"), header.get("config") or {})


def check_same_store(path: Path, old: dict, new: dict) -> None:
    """Refuse to merge results of two different Grams (other images, tasks or kernel settings), naming both
    stores and what differs; the same store under another path is the same store."""
    if header_key(old) != header_key(new):
        differ = _differences(gram_settings(old.get("config") or {}), gram_settings(new.get("config") or {}))
        if old.get("fingerprint") != new.get("fingerprint"):
            differ.insert(0, "images or tasks (fingerprint)")
        raise ValueError(f"{path} holds results of store {old.get('store')} (fingerprint "
                         f"{str(old.get('fingerprint'))[:12]}), not of {new.get('store')} (fingerprint "
                         f"{str(new.get('fingerprint'))[:12]}); refusing to merge them (they differ in "
                         f"{', '.join(differ)}): use another --out")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'kernel.depth: 3 there, 4 here' for each setting that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} there, {json.dumps(b)} here")
    return out


def merged(path: Path, results: dict) -> dict:
    """results with what the results.json at path (same store only) holds and results do not redo: the methods,
    and header keys results lack."""
    if not path.exists():
        return results
    old = read_json(path)
    check_same_store(path, old, results)
    return {**old, **results, "methods": {**old.get("methods", {}), **results["methods"]}}
