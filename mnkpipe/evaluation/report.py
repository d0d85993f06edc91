"""results.json (merged, same store only) rendered as a CSV, a Markdown table and a PNG plot of accuracy against
the number of training tasks or characters."""

import csv
import json
from functools import partial
from pathlib import Path

from filelock import FileLock

from ..files import atomic_write_text, read_json
from .derived import check_results_dir, claim_results_dir
from .mirror import local_results, results_location
from .results import merged, method_label

ORDER = ("mnk", "meta_term", "r_t", "embedding_1nn", "pixel_1nn", "maml", "imaml")
TEST_SELECTED = "test-selected"  # maml-test-selected: the checkpoint of best mean test accuracy (biased upwards)
X_AXES = {"tasks": ("n_train_tasks", "number of training tasks"),
          "characters": ("n_train_characters", "number of training characters (classes)")}


def write_results(results: dict, out: Path) -> Path:
    """results.json (merged with the methods already there, refused if they come from another store), then render;
    only into a folder mnkpipe made (or a new or empty one, which it marks), never inside the store."""
    out = claim_results_dir(out, results.get("store"))
    path = out / "results.json"
    with FileLock(out / "results.json.lock"):  # evaluate and baselines may finish at the same moment
        results = merged(path, results)
        atomic_write_text(path, json.dumps(results, indent=1))
        render(out)
    return path


def chosen_on_test_key(method: str) -> str:
    """results.json key of a baseline's test-selected record: maml -> maml-test-selected."""
    return f"{method}-{TEST_SELECTED}"


def is_chosen_on_test(key: str) -> bool:
    """Whether a method key names a record whose checkpoints were chosen on the test tasks (biased upwards)."""
    return key.split("/")[0].endswith(f"-{TEST_SELECTED}")


def label(key: str) -> str:
    """method_label, with test-selected records marked: 'MAML (2nd order) (test-selected, biased)'."""
    if not is_chosen_on_test(key):
        return method_label(key)
    method, sep, rest = key.partition("/")
    return f"{method_label(method.removesuffix('-' + TEST_SELECTED) + sep + rest)} ({TEST_SELECTED}, biased)"


def line_style(key: str) -> dict:
    """Plot style of a method: dashed for the flat ablations, dashed with hollow markers for test-selected ones."""
    if is_chosen_on_test(key):
        return {"linestyle": "--", "markerfacecolor": "none"}
    flat = key.split("/")[0].split("-")[0] in ("r_t", "pixel_1nn", "embedding_1nn", "meta_term")
    return {"linestyle": "--" if flat else "-"}


def _methods(results: dict):
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(results["methods"], key=lambda k: (rank.get(k.split("/")[0].split("-")[0], len(ORDER)), k))


def render(out_dir, x: str = "tasks", store=None, plot_methods=None) -> dict:
    """Write results.csv, results.md and accuracy.png from results.json in out_dir (a folder mnkpipe made, outside
    the store when one is named); every method in the tables, those of plot_methods (default: all) in the figure;
    returns the paths."""
    if x not in X_AXES:
        raise ValueError(f"--x must be one of {', '.join(X_AXES)}; got {x!r}")
    out = check_results_dir(out_dir, store)
    path = out / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no results.json in {out}: run `mnkpipe evaluate` (and `mnkpipe baselines`) first")
    claim_results_dir(out, store)
    results = read_json(path)
    methods = _methods(results)
    unknown = sorted(set(plot_methods or ()) - set(methods))
    if unknown:
        raise ValueError(f"--plot-methods: {', '.join(unknown)} not in {path}; it holds {', '.join(methods)}")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n_train_tasks", "n_train_characters", "n_train_images", "seeds", "accuracy",
                    "ci95_low", "ci95_high", "n_test_tasks"])
        for k in methods:
            r = results["methods"][k]
            for n, c, i, m, (lo, hi), pt in zip(r["n_train_tasks"], r["n_train_characters"], r["n_train_images"],
                                                r["mean"], r["ci95"], r["per_task"]):
                w.writerow([k, n, f"{c:g}", f"{i:g}", r["seeds"], f"{m:.4f}", f"{lo:.4f}", f"{hi:.4f}", len(pt)])
    (out / "results.md").write_text(_table(results, methods))
    _plot(results, [k for k in methods if k in plot_methods] if plot_methods else methods, out / "accuracy.png", x)
    return {"csv": out / "results.csv", "md": out / "results.md", "png": out / "accuracy.png"}


def report(store=None, out=None, x: str = "tasks", plot_methods=None) -> dict:
    """render() of the results at --out, else at <store>-results (a local folder, or on the store's object store);
    returns the local paths and 'where' the results are."""
    loc = results_location(store, out)
    draw = partial(render, x=x, store=store, plot_methods=plot_methods)
    with local_results(loc, progress=False, rerender=draw) as local:
        if loc.is_s3 and not (local.folder / "results.json").exists():
            raise FileNotFoundError(f"no results.json at {loc.url}: run `mnkpipe evaluate` (and `mnkpipe baselines`) "
                                    "first")
        paths = draw(local.folder)
    return dict(paths, where=loc.url)


def _table(results: dict, methods) -> str:
    counts = sorted({n for k in methods for n in results["methods"][k]["n_train_tasks"]})
    chars = {}
    for k in methods:
        r = results["methods"][k]
        chars.update(zip(r["n_train_tasks"], r["n_train_characters"]))
    lines = [f"Meta-test accuracy (%), {results.get('way', '?')}-way {results.get('shot', '?')}-shot, "
             f"{results.get('n_test_tasks', '?')} test tasks; mean over test tasks (each averaged over the seeds) "
             "with 95% t-interval. Columns: training tasks (training characters).", "",
             "| method | seeds | " + " | ".join(f"{n} ({chars[n]:g} ch.)" for n in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for k in methods:
        r = results["methods"][k]
        cell = {n: f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                for n, m, (lo, hi) in zip(r["n_train_tasks"], r["mean"], r["ci95"])}
        lines.append(f"| {label(k)} | {r['seeds']} | " + " | ".join(cell.get(n, "") for n in counts) + " |")
    for k in methods:
        note = results["methods"][k].get("note")
        if note:
            lines.append(f"\n{label(k)}: {note}")
    return "\n".join(lines) + "\n"


def _plot(results: dict, methods, png: Path, x: str) -> None:
    """Error bars dodged sideways (a small factor on the log x-axis per method), chance level, seeds in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, xlabel = X_AXES[x]
    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=120)
    step = 2 ** 0.035
    for i, k in enumerate(methods):
        r = results["methods"][k]
        dodge = step ** (i - (len(methods) - 1) / 2)
        xs = [v * dodge for v in r[key]]
        m = [100 * v for v in r["mean"]]
        err = [[100 * (v - lo) for v, (lo, _) in zip(r["mean"], r["ci95"])],
               [100 * (hi - v) for v, (_, hi) in zip(r["mean"], r["ci95"])]]
        ax.errorbar(xs, m, yerr=err, marker="os^Dv"[i % 5], markersize=4, capsize=2, linewidth=1,
                    color=plt.cm.tab20(i % 20), label=f"{label(k)} ({r['seeds']} seeds)", **line_style(k))
    way = results.get("way")
    if way:
        ax.axhline(100 / way, color="grey", linewidth=1, linestyle=":", label=f"chance ({100 / way:.0f}%)")
    ax.set_xscale("log", base=2)
    ticks = sorted({v for k in methods for v in results["methods"][k][key]})
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("meta-test accuracy (%)")
    ax.set_title(f"{results.get('way', '?')}-way {results.get('shot', '?')}-shot, "
                 f"{results.get('n_test_tasks', '?')} test tasks (95% CI over test tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
