"""Paired differences between methods of a results.json: on the same test tasks (each task's accuracy averaged
over the seeds), mean and 95% t-interval over tasks of accuracy(A) - accuracy(B), per number of training tasks
(points of A and B paired by that number; a number only one of them holds shows as '-').

    .venv/bin/python bench/paired_differences.py RESULTS_JSON A B [B ...]
    .venv/bin/python bench/paired_differences.py docs/results/omniglot-5w1s-cpu/results.json mnk/embedding/K15 \
        r_t/onehot r_t/embedding embedding_1nn maml imaml mnk/onehot/K15 mnk/embedding/K1
    .venv/bin/python bench/paired_differences.py RESULTS_JSON maml-test-selected maml   # the test selection's bias
"""

import json
import sys

from mnkpipe.evaluation.results import paired_differences


def table(methods: dict, a: str, others) -> str:
    """Markdown table: one row per method B, one column per number of training tasks of A, in percentage points."""
    counts = methods[a]["n_train_tasks"]
    lines = [f"| {a} minus | " + " | ".join(str(n) for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for b in others:
        diff = paired_differences(methods[a], methods[b])
        cells = [f"{100 * diff[n][0]:+.1f} [{100 * diff[n][1]:+.1f}, {100 * diff[n][2]:+.1f}]" if n in diff else "-"
                 for n in counts]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    path, a, *others = sys.argv[1:]
    with open(path) as f:
        methods = json.load(f)["methods"]
    missing = [m for m in [a, *others] if m not in methods]
    if missing:
        sys.exit(f"{path}: no method(s) {', '.join(missing)}; it holds {', '.join(sorted(methods))}")
    print(table(methods, a, others))


if __name__ == "__main__":
    main()
