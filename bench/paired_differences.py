"""Paired differences between methods of a results.json: on the same test tasks (each task's accuracy averaged
over the seeds), mean and 95% t-interval over tasks of accuracy(A) - accuracy(B), per number of training tasks.

    .venv/bin/python bench/paired_differences.py RESULTS_JSON A B [B ...]
    .venv/bin/python bench/paired_differences.py docs/results/omniglot-5w1s-cpu/results.json mnk/embedding/K15 \
        r_t/onehot r_t/embedding embedding_1nn maml imaml mnk/onehot/K15 mnk/embedding/K1
"""

import json
import math
import sys

import numpy as np

from mnkpipe.evaluation.results import _t975


def main():
    path, a, *others = sys.argv[1:]
    methods = json.loads(open(path).read())["methods"]
    ra = methods[a]
    print(f"| {a} minus | " + " | ".join(str(n) for n in ra["n_train_tasks"]) + " |")
    for b in others:
        cells = []
        for pa, pb in zip(ra["per_task"], methods[b]["per_task"]):
            d = 100 * (np.asarray(pa) - np.asarray(pb))  # d_t = acc_A(t) - acc_B(t), percentage points
            h = _t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            cells.append(f"{d.mean():+.1f} [{d.mean() - h:+.1f}, {d.mean() + h:+.1f}]")
        print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
