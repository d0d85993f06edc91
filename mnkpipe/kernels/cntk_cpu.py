"""Fast CPU CNTK: a fused numba kernel that runs all layers of a pair band by band.

A(.) never mixes offsets D = p - q, so each slab {(p, p - D)} is an ordinary 2-D image on which A is a 3x3 box
filter with zero boundary and V is elementwise. All slabs that share the row offset dr are laid side by side in
one buffer (a "band"), separated by zero columns: every pass is then one long contiguous loop that the compiler
vectorises, and a 32x32 band is ~150 KiB, so the whole recursion of a pair runs in L2 cache.
Arithmetic is float32; each band row is summed in float32 and added to the pair's float64 total.
"""

import math

import numba as nb
import numpy as np

# Float32 rounding puts rho of identical patches (x = z, flat background) up to ~1e-6 below 1 after 20 layers, and
# arccos turns that into theta ~ 1e-3. Within this distance rho is indistinguishable from 1 in float32: snap to 1.
RHO_SNAP32 = 4e-6
_PI = np.float32(math.pi)
_INV_9PI = np.float32(1.0 / (9.0 * math.pi))
_TINY = np.float32(1e-30)
# fastmath without "reassoc": LLVM may not reorder float sums. Elementwise loops vectorise without it, and the
# result no longer depends on how a particular process's compile happened to order the IR (bit-identical Grams).
_FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@nb.njit(fastmath=_FM, inline="always", cache=True)
def _acos(x):
    """acos(x) on [-1, 1]: A&S 4.4.46, sqrt(1 - |x|) sum_k a_k |x|^k (|error| <= 2e-8), and acos(-x) = pi - acos(x)."""
    a = abs(x)
    p = np.float32(-0.0012624911)
    p = p * a + np.float32(0.0066700901)
    p = p * a + np.float32(-0.0170881256)
    p = p * a + np.float32(0.0308918810)
    p = p * a + np.float32(-0.0501743046)
    p = p * a + np.float32(0.0889789874)
    p = p * a + np.float32(-0.2145988016)
    p = p * a + np.float32(1.5707963050)
    r = np.float32(math.sqrt(np.float32(1.0) - a)) * p
    return r if x >= 0 else _PI - r


@nb.njit(fastmath=_FM, inline="always", cache=True)
def _box3(buf, tmp, h, wb, seps):
    """Band rows 1..h <- 3x3 box sum of the (h+2, wb) band, separable; zero border rows and separator columns kept.

    Loops run over 1-D row views with non-negative indices: that is what lets LLVM vectorise them."""
    for a in range(h + 2):
        src, dst = buf[a * wb:(a + 1) * wb], tmp[a * wb:(a + 1) * wb]
        for i in range(1, wb - 1):
            dst[i] = src[i - 1] + src[i] + src[i + 1]
    for a in range(1, h + 1):
        up, mid, down = tmp[(a - 1) * wb:a * wb], tmp[a * wb:(a + 1) * wb], tmp[(a + 1) * wb:(a + 2) * wb]
        dst = buf[a * wb:(a + 1) * wb]
        for i in range(wb):
            dst[i] = up[i] + mid[i] + down[i]
        for c in seps:  # the row pass wrote the separators: zero them again
            dst[c] = 0.0


@nb.njit(fastmath=_FM, inline="always", cache=True)
def _relu_step(s, t, o, n):
    """V: rho = S/o, S' = o (rho (pi - theta) + sqrt(1 - rho^2)) / (9 pi), T' = T (pi - theta)/(9 pi) + S'."""
    one = np.float32(1.0)
    for i in range(n):
        oi = o[i]
        rho = s[i] / max(oi, _TINY)  # |S| <= o, so rho = 0 where o = 0: the defined limit (and the zero separators)
        rho = min(max(rho, -one), one)
        rho = one if rho > one - np.float32(RHO_SNAP32) else rho
        pt = _PI - _acos(rho)
        sn = oi * (rho * pt + np.float32(math.sqrt((one - rho) * (one + rho)))) * _INV_9PI
        s[i] = sn
        t[i] = t[i] * (pt * _INV_9PI) + sn


@nb.njit(fastmath=_FM, inline="always", cache=True)
def _fill_band(dst, u, v, h, r0, dr, ncol, wb, starts):
    """dst[a, slab dc, b] = sum_c u[c, p] v[c, p - D] with p = (r0 + a, c0 + b), D = (dr, dc), over the band's slabs."""
    ww = u.shape[2]
    for a in range(h):
        for j in range(2 * ncol + 1):
            dc = j - ncol
            c0 = max(0, dc)
            w = ww - abs(dc)
            base = (a + 1) * wb + starts[j]
            out = dst[base:base + w]
            for ch in range(u.shape[0]):
                ur = u[ch, r0 + a, c0:c0 + w]
                vr = v[ch, r0 + a - dr, c0 - dc:c0 - dc + w]
                if ch == 0:
                    for b in range(w):
                        out[b] = ur[b] * vr[b]
                else:
                    for b in range(w):
                        out[b] += ur[b] * vr[b]


@nb.njit(fastmath=_FM, cache=True)
def _band_layout(ww, ncol):
    """Column where slab dc = j - ncol starts in a band, the zero separator columns, and the band width."""
    starts = np.empty(2 * ncol + 1, np.int64)
    seps = np.empty(2 * ncol + 2, np.int64)
    col = 1
    seps[0] = 0
    for j in range(2 * ncol + 1):
        starts[j] = col
        col += ww - abs(j - ncol)
        seps[j + 1] = col
        col += 1
    return starts, seps, col


@nb.njit(fastmath=_FM, cache=True)
def _pair(x, z, lx, lz, depth, gap, fix, s, t, o, tmp, starts, seps, wb):
    """K(x, z) = sum over offsets D of the slab recursion's T, / (HW)^2 with gap, or at D = 0 only (vanilla trace)."""
    hh, ww = x.shape[1], x.shape[2]
    nrow = hh - 1 if gap else 0
    ncol = (len(starts) - 1) // 2
    total = 0.0
    for dr in range(-nrow, nrow + 1):
        r0 = max(0, dr)
        h = hh - abs(dr)
        n = (h + 2) * wb
        s[:n] = 0.0
        o[:n] = 0.0
        _fill_band(s, x, z, h, r0, dr, ncol, wb, starts)  # G
        _box3(s, tmp, h, wb, seps)
        if fix:
            t[:n] = 0.0
        else:
            t[:n] = s[:n]
        for layer in range(depth - 1):
            _fill_band(o, lx[layer:layer + 1], lz[layer:layer + 1], h, r0, dr, ncol, wb, starts)
            _relu_step(s, t, o, n)
            if layer < depth - 2:
                _box3(s, tmp, h, wb, seps)
                _box3(t, tmp, h, wb, seps)
        for a in range(1, h + 1):
            acc = np.float32(0.0)
            for i in range(a * wb, (a + 1) * wb):
                acc += t[i] - s[i] if fix else t[i]
            total += acc
    if gap:
        total /= float(hh * ww) ** 2
    return total


@nb.njit(parallel=True, cache=True)
def _pairs(x1, l1, x2, l2, ii, jj, depth, gap, fix, out, chunks):
    """out[k] = K(x1[ii[k]], x2[jj[k]]) for every listed pair, in parallel chunks that own their band buffers."""
    hh, ww = x1.shape[2], x1.shape[3]
    size = (hh + 2) * (ww * ww + 2 * ww + 2)
    n = ii.shape[0]
    for c in nb.prange(chunks):
        starts, seps, wb = _band_layout(ww, ww - 1 if gap else 0)
        s = np.empty(size, np.float32)
        t = np.empty(size, np.float32)
        o = np.empty(size, np.float32)
        tmp = np.zeros(size, np.float32)
        for k in range(c * n // chunks, (c + 1) * n // chunks):
            out[k] = _pair(x1[ii[k]], x2[jj[k]], l1[ii[k]], l2[jj[k]], depth, gap, fix, s, t, o, tmp, starts, seps,
                           wb)


def cntk_block_cpu(x1, l1, x2, l2, *, depth: int, gap: bool = True, fix: bool = False,
                   upper: bool = False) -> np.ndarray:
    """K[i, j] = K(x1_i, x2_j) as float64; upper=True (x1 is x2) computes i <= j only and mirrors it."""
    x1, l1, x2, l2 = (np.ascontiguousarray(a, dtype=np.float32) for a in (x1, l1, x2, l2))
    n1, n2 = len(x1), len(x2)
    ii, jj = np.triu_indices(n1, 0, n2) if upper else np.indices((n1, n2)).reshape(2, -1)
    vals = np.empty(len(ii), np.float64)
    chunks = min(len(ii), 8 * nb.get_num_threads())  # a few chunks per thread balance the load
    _pairs(x1, l1, x2, l2, ii.astype(np.int64), jj.astype(np.int64), depth, gap, fix, vals, max(chunks, 1))
    k = np.empty((n1, n2), np.float64)
    k[ii, jj] = vals
    if upper:
        k[jj, ii] = vals
    return k
