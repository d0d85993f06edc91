"""Baseline for the device check: the seed's per-pair method ported straight to cupy.

One pair at a time on the full 4-D tensors M[p, q] of shape (H, W, H, W) in float32: G by a tensordot, then per
layer two elementwise kernels, one for the ReLU step V and one for the 3x3 diagonal aggregation A of S and T.
This is the method docs/math.md sec. 3 describes (~60 launches and ~0.6 GB of memory traffic per 32x32 pair).
"""

from __future__ import annotations

import numpy as np

_SRC = r"""
extern "C" __global__ void vstep4(float* S, float* T, const float* lx, const float* lz, int P)
{   // V: rho = clip(S/(l_x l_z), -1, 1), S' = o (rho (pi - theta) + sqrt(1 - rho^2)) / (9 pi), T' = T Sdot + S'
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)P * P) return;
    const float o = lx[k / P] * lz[k % P];
    float rho = o > 0.f ? fminf(fmaxf(S[k] / o, -1.f), 1.f) : 0.f;
    if (rho > 1.f - 4e-6f) rho = 1.f;
    const float pt = 3.14159265358979f - acosf(rho);
    const float sn = o * (rho * pt + sqrtf((1.f - rho) * (1.f + rho))) * 0.0353677651315323f;
    T[k] = T[k] * pt * 0.0353677651315323f + sn;
    S[k] = sn;
}

extern "C" __global__ void agg4(const float* S, const float* T, float* S2, float* T2, int H, int W)
{   // A(M)[p, q] = sum_{d in {-1,0,1}^2} M[p+d, q+d], zero outside the image, for S and T
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)H * W * H * W;
    if (k >= n) return;
    const int v = k % W, u = (k / W) % H, s = (k / (W * H)) % W, r = k / ((long long)W * H * W);
    float as = 0.f, at = 0.f;
    for (int di = -1; di <= 1; ++di)
        for (int dj = -1; dj <= 1; ++dj) {
            const int r2 = r + di, s2 = s + dj, u2 = u + di, v2 = v + dj;
            if (r2 < 0 || r2 >= H || u2 < 0 || u2 >= H || s2 < 0 || s2 >= W || v2 < 0 || v2 >= W) continue;
            const long long m = (((long long)r2 * W + s2) * H + u2) * W + v2;
            as += S[m];
            at += T[m];
        }
    S2[k] = as;
    T2[k] = at;
}
"""

_MOD = {}


def _kernels(cp):
    """(vstep4, agg4) compiled once per device."""
    key = cp.cuda.Device().id
    if key not in _MOD:
        mod = cp.RawModule(code=_SRC)
        _MOD[key] = (mod.get_function("vstep4"), mod.get_function("agg4"))
    return _MOD[key]


def baseline_pair(cp, x, z, lx, lz, *, depth: int, gap: bool = True, fix: bool = False) -> float:
    """K(x, z) by the 4-D per-pair recursion; x, z (C, H, W) and lx, lz (depth-1, H, W) are cupy float32 arrays."""
    vstep, agg = _kernels(cp)
    _, h, w = x.shape
    n = h * w * h * w
    grid, block = ((n + 255) // 256,), (256,)
    g = cp.tensordot(x, z, axes=([0], [0]))  # G[p, q] = sum_c x_c[p] z_c[q], shape (H, W, H, W)
    s, t = cp.empty_like(g), cp.empty_like(g)
    agg(grid, block, (g, g, s, t, np.int32(h), np.int32(w)))
    t = cp.zeros_like(s) if fix else s.copy()
    s2, t2 = cp.empty_like(s), cp.empty_like(t)
    for layer in range(depth - 1):
        vstep(grid, block, (s, t, lx[layer], lz[layer], np.int32(h * w)))
        if layer == depth - 2:
            break
        agg(grid, block, (s, t, s2, t2, np.int32(h), np.int32(w)))
        s, s2, t, t2 = s2, s, t2, t
    if fix:
        t = t - s
    total = float(t.sum(dtype=cp.float64))
    return total / (h * w) ** 2 if gap else float(cp.trace(t.reshape(h * w, h * w), dtype=cp.float64))
