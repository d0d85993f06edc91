"""Per-image scale maps of the CNTK: the diagonal of the (x, x) recursion, by a cheap 2-D recursion.

The CNTK is positively homogeneous, K(a x, b z) = a b K(x, z), and so are the maps, l(a x) = a l(x) (docs/math.md
sec. 1). Every
backend divides each image by a power of two near its own magnitude (exact in floating point: ordinary inputs give
bit-identical results), computes, and multiplies back in float64, so any finite input gets the right value.
"""

import numpy as np


def box3(a: np.ndarray) -> np.ndarray:
    """box3(a)[.., r, s] = sum_{|i|,|j|<=1} a[.., r+i, s+j], zero outside the image (docs/math.md eq. (3))."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)])
    h, w = a.shape[-2:]
    return sum(p[..., 1 + i : 1 + i + h, 1 + j : 1 + j + w] for i in (-1, 0, 1) for j in (-1, 0, 1))


def pow2_scale(x: np.ndarray) -> np.ndarray:
    """m_i = 2^floor(log2 max|x_i|) per image (1 for an all-zero image): max |x_i / m_i| lies in [1, 2), exactly."""
    x = np.asarray(x)
    peak = np.abs(x).max(axis=tuple(range(1, x.ndim)), initial=0.0).astype(np.float64)
    _, e = np.frexp(peak)  # peak = f 2^e with f in [0.5, 1)
    return np.where(peak > 0, np.ldexp(1.0, e - 1), 1.0)


def normalise(a: np.ndarray, m: np.ndarray, dtype=np.float64) -> np.ndarray:
    """a_i / m_i, divided in float64 (exact for powers of two m_i) and stored as dtype without a float64 copy."""
    a = np.asarray(a)
    m = np.asarray(m, dtype=np.float64).reshape((len(a),) + (1,) * (a.ndim - 1))
    return np.divide(a, m, out=np.empty(a.shape, dtype), dtype=np.float64, casting="same_kind")


def scale_maps(x: np.ndarray, depth: int) -> np.ndarray:
    """l(h) = sqrt(e(h)), e(1) = box3(sum_c x_c^2), e(h+1) = box3(e(h))/9, h = 1..depth-1 (docs/math.md eq. (3));
    shape (N, depth-1, H, W).

    Computed on x / m with m = pow2_scale(x) and multiplied by m: no under- or overflow for any finite x."""
    x = np.asarray(x, dtype=np.float64)
    m = pow2_scale(x)[:, None, None]
    x = x / m[:, None]
    e = box3((x * x).sum(axis=1))
    out = np.empty((x.shape[0], depth - 1) + x.shape[2:], dtype=np.float64)
    for h in range(depth - 1):
        out[:, h] = np.sqrt(e) * m
        e = box3(e) / 9.0
    return out
