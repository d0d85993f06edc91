"""Which training tasks each point of the curve uses: nested random subsets per seed, and their size."""

import math

import numpy as np


def train_subsets(n_train: int, counts, seed: int) -> dict[int, np.ndarray]:
    """Nested random subsets of the training tasks: one permutation per seed, its first n for each count n."""
    perm = np.random.default_rng(1000 + seed).permutation(n_train)
    return {int(n): np.sort(perm[:n]) for n in counts}


def check_train_counts(counts, n_train: int) -> list[int]:
    """The distinct counts of training tasks, sorted; ValueError naming --train-tasks unless 1 <= each <= n_train."""
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"--train-tasks must be positive integers; got {counts}")
    if counts[-1] > n_train:
        raise ValueError(f"--train-tasks asks for {counts[-1]} training tasks but the store holds {n_train}")
    return counts


def default_counts(n_train: int) -> list[int]:
    """1, 2, 4, ... up to the number of training tasks (which is always included)."""
    return sorted({2 ** k for k in range(int(math.log2(n_train)) + 1)} | {n_train})


def subset_size(tasks, subset) -> tuple[int, int]:
    """(training characters, training images) of the tasks `subset` of a TaskSet: distinct classes and images."""
    sub = tasks.subset(subset)
    return int(np.unique(sub.classes).size), int(sub.image_ids().size)
