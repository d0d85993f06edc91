"""Relative errors and the neural-tangents golden values, one copy for every test that compares numbers."""

import numpy as np


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the elementwise error relative to the reference's largest entry."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def rel_norm(a, b) -> float:
    """||a - b|| / ||b|| in the Frobenius norm (numpy arrays or torch tensors alike)."""
    d = a - b
    return float((d * d).sum() ** 0.5 / (b * b).sum() ** 0.5)


def golden_case(golden: dict, key: str) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(x, K, depth, gap) of a golden key '<inputs>_d<depth>_<gap|vanilla>' (tests/data/README.md): neural-tangents
    divides the input covariance by C channels and docs/math.md eq. (1) does not, so K is the stored value times C."""
    name, d, head = key.rsplit("_", 2)
    x = golden[f"{name}_x"]
    return x, golden[key] * x.shape[1], int(d[1:]), head == "gap"
