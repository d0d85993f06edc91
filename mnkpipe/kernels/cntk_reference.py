"""The float64 numpy CNTK on full 4-D (H, W, H, W) tensors, written for reading: the oracle."""

import numpy as np

from .scales import scale_maps

# rho within rounding distance of 1 is 1: S and l_x l_z reach the same value by different float paths (about 1e-16
# apart per layer), and arccos would turn that into theta ~ 1e-8. Identical patches (x = z, flat background) need it.
RHO_SNAP = 1e-14


def aggregate(m: np.ndarray) -> np.ndarray:
    """A(M)[p, q] = sum_{d in {-1,0,1}^2} M[p+d, q+d], zero outside the image (docs/math.md eq. (2))."""
    h, w = m.shape[:2]
    p = np.pad(m, 1)
    out = np.zeros_like(m)
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            out += p[1 + i : 1 + i + h, 1 + j : 1 + j + w, 1 + i : 1 + i + h, 1 + j : 1 + j + w]
    return out


def relu_step(s, t, lx, lz):
    """V: rho = S/(l_x l_z), S' = o (rho (pi - theta) + sqrt(1 - rho^2)) / (9 pi), T' = T (pi - theta)/(9 pi) + S'
    (docs/math.md eq. (4); rho = 0 where l_x l_z = 0)."""
    o = lx[:, :, None, None] * lz[None, None, :, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(o > 0, np.clip(s / o, -1.0, 1.0), 0.0)  # rho = 0 is the limit where o = 0
    rho = np.where(rho > 1.0 - RHO_SNAP, 1.0, rho)
    theta = np.arccos(rho)
    s_new = o * (rho * (np.pi - theta) + np.sqrt(1.0 - rho * rho)) / (9 * np.pi)
    return s_new, t * (np.pi - theta) / (9 * np.pi) + s_new


def cntk_pair(x, z, lx, lz, *, depth: int, gap: bool = True, fix: bool = False) -> float:
    """K(x, z) of docs/math.md eqs. (1)-(6) for one pair; lx, lz are the scale maps (depth-1, H, W)."""
    g = np.einsum("cab,cde->abde", x, z)
    s = aggregate(g)
    t = np.zeros_like(s) if fix else s.copy()
    for h in range(depth - 2):
        s, t = relu_step(s, t, lx[h], lz[h])
        s, t = aggregate(s), aggregate(t)
    s, t = relu_step(s, t, lx[depth - 2], lz[depth - 2])
    if fix:
        t = t - s
    if gap:
        return float(t.mean())
    hw = x.shape[1] * x.shape[2]
    return float(np.trace(t.reshape(hw, hw)))


def cntk_reference(x1, x2=None, *, depth: int, gap: bool = True, fix: bool = False) -> np.ndarray:
    """Gram K[i, j] = K(x1_i, x2_j) (docs/math.md eq. (6)) in float64; x2 = None gives the symmetric Gram of x1
    from its upper triangle."""
    x1 = np.asarray(x1, dtype=np.float64)
    l1 = scale_maps(x1, depth)
    if x2 is None:
        n = len(x1)
        k = np.empty((n, n))
        for i in range(n):
            for j in range(i, n):
                k[i, j] = k[j, i] = cntk_pair(x1[i], x1[j], l1[i], l1[j], depth=depth, gap=gap, fix=fix)
        return k
    x2 = np.asarray(x2, dtype=np.float64)
    l2 = scale_maps(x2, depth)
    return np.array([[cntk_pair(a, b, la, lb, depth=depth, gap=gap, fix=fix) for b, lb in zip(x2, l2)]
                     for a, la in zip(x1, l1)]).reshape(len(x1), len(x2))
