"""Render results.json as a CSV, a Markdown table and a PNG plot (accuracy vs number of training tasks)."""

import csv
import json
from pathlib import Path

ORDER = ("mnk", "cntk_support", "pixel_1nn", "maml", "imaml")


def _methods(results: dict):
    m = results["methods"]
    return [k for k in ORDER if k in m] + sorted(k for k in m if k not in ORDER)


def render(out_dir) -> dict:
    """Write results.csv, results.md and accuracy.png from results.json in out_dir; returns the paths."""
    from .evaluate import LABELS
    out = Path(out_dir)
    path = out / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no results.json in {out}: run `mnkpipe evaluate` (and `mnkpipe baselines`) first")
    results = json.loads(path.read_text())
    methods = _methods(results)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n_train_tasks", "accuracy", "ci95_low", "ci95_high", "n_test_tasks"])
        for k in methods:
            r = results["methods"][k]
            for n, m, (lo, hi), pt in zip(r["n_train_tasks"], r["mean"], r["ci95"], r["per_task"]):
                w.writerow([k, n, f"{m:.4f}", f"{lo:.4f}", f"{hi:.4f}", len(pt)])
    counts = sorted({n for k in methods for n in results["methods"][k]["n_train_tasks"]})
    lines = [f"Meta-test accuracy, {results.get('way', '?')}-way {results.get('shot', '?')}-shot, "
             f"{results.get('n_test_tasks', '?')} test tasks; mean over test tasks (each averaged over seeds) "
             "with 95% t-interval.", "",
             "| method | " + " | ".join(f"{n} tasks" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for k in methods:
        r = results["methods"][k]
        cell = {n: f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                for n, m, (lo, hi) in zip(r["n_train_tasks"], r["mean"], r["ci95"])}
        lines.append(f"| {LABELS.get(k, k)} | " + " | ".join(cell.get(n, "") for n in counts) + " |")
    for k in methods:
        note = results["methods"][k].get("note")
        if note:
            lines.append(f"\n{LABELS.get(k, k)}: {note}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(results, methods, out / "accuracy.png")
    return {"csv": out / "results.csv", "md": out / "results.md", "png": out / "accuracy.png"}


def _plot(results: dict, methods, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .evaluate import LABELS
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    for k in methods:
        r = results["methods"][k]
        n, m = r["n_train_tasks"], [100 * v for v in r["mean"]]
        err = [[100 * (v - lo) for v, (lo, _) in zip(r["mean"], r["ci95"])],
               [100 * (hi - v) for v, (_, hi) in zip(r["mean"], r["ci95"])]]
        ax.errorbar(n, m, yerr=err, marker="o", capsize=3, label=LABELS.get(k, k),
                    linestyle="--" if k in ("cntk_support", "pixel_1nn") else "-")
    ax.set_xscale("log", base=2)
    counts = sorted({n for k in methods for n in results["methods"][k]["n_train_tasks"]})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("number of training tasks")
    ax.set_ylabel("meta-test accuracy (%)")
    ax.set_title(f"{results.get('way', '?')}-way {results.get('shot', '?')}-shot, "
                 f"{results.get('n_test_tasks', '?')} test tasks (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
