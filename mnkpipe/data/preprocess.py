"""Image preprocessing for the kernels: one scalar mean/std standardisation and centred zero padding."""

from __future__ import annotations

import numpy as np

from .dataset import DataError

__all__ = ["fit_standardiser", "standardise_and_pad"]


def fit_standardiser(images: np.ndarray) -> tuple[float, float]:
    """Scalar (mean, std) in float64 over all pixels of the given images (pass the meta-TRAINING images only)."""
    x = np.asarray(images)
    if x.size == 0:
        raise DataError("fit_standardiser: no images given")
    mean = float(np.mean(x, dtype=np.float64))
    std = float(np.std(x, dtype=np.float64))
    if not np.isfinite(mean) or not np.isfinite(std):
        raise DataError("fit_standardiser: images contain NaN or inf")
    if std == 0.0:
        raise DataError("fit_standardiser: all pixels are equal (std = 0), cannot standardise")
    return mean, std


def standardise_and_pad(images: np.ndarray, mean: float, std: float, pad: int | None = 32) -> np.ndarray:
    """float32 (x - mean) / std of (N, C, H, W) images, then zero-padded, centred, to pad x pad (None: no padding).

    When pad - H (or pad - W) is odd the extra row (column) goes at the bottom (right). pad smaller than the
    image raises DataError.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise DataError(f"standardise_and_pad expects (N, C, H, W) images, got shape {x.shape}")
    if not std > 0:
        raise DataError(f"standardise_and_pad: std must be > 0, got {std}")
    z = ((x.astype(np.float64) - mean) / std).astype(np.float32)
    if pad is None:
        return z
    h, w = x.shape[2:]
    if pad < h or pad < w:
        raise DataError(f"pad={pad} is smaller than the images ({h}x{w}); use pad >= {max(h, w)} or pad=None")
    if pad == h and pad == w:
        return z
    top, left = (pad - h) // 2, (pad - w) // 2
    out = np.zeros(x.shape[:2] + (pad, pad), dtype=np.float32)
    out[:, :, top:top + h, left:left + w] = z
    return out
