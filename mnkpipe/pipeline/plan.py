"""Tile plans: which upper-triangle tiles (bi <= bj) of an N x N Gram a job computes. Pure functions, no I/O."""

import numpy as np

from ..store import n_blocks


def plan_full(n: int, tile_size: int) -> np.ndarray:
    """Every tile of the upper triangle, diagonal tiles included."""
    nb = n_blocks(n, tile_size)
    return np.triu(np.ones((nb, nb), bool))


def plan_mnk(n: int, tile_size: int, n_train: int, test_tasks: list[np.ndarray]) -> np.ndarray:
    """Only what MNK reads (docs/math.md eq. (12)): train x train, test x train, and each test task with itself."""
    nb = n_blocks(n, tile_size)
    need = np.zeros((nb, nb), bool)
    train_blocks = np.arange(n_blocks(n_train, tile_size))
    need[train_blocks, :] = True  # train x everything covers train x train and test x train
    for idx in test_tasks:
        b = np.unique(np.asarray(idx) // tile_size)
        need[np.ix_(b, b)] = True
    return np.triu(need | need.T)

