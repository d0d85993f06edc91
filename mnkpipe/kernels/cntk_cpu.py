"""Fast CPU CNTK: a fused numba kernel that runs all layers of LANES pairs at once, tile by tile.

A(.) never mixes offsets D = p - q, so the 4-D recursion of a pair splits into 2-D slabs, one per D, on each of
which A is a 3x3 box filter with zero boundary and V is elementwise. The (2H-1)(2W-1) slabs pack exactly into H*W
tiles of H x W entries (as in cntk_fused.cu): tile (b, a), indexed by q = (i, j), holds the entry (p, q) with
p = ((i + b) mod H, (j + a) mod W); it is made of up to four slabs, separated by cuts at row H - b and column W - a,
which the box filter does not cross. With the x-side inputs stored with rows and columns doubled, the p of a tile
row is a contiguous run, so every pass is a plain loop over a tile row: no padding, no gathers.
A batch of LANES pairs runs in lock step: each tile entry holds one float32 per pair, side by side, so a tile row
is W * LANES floats whatever the image size, and the loops vectorise without remainders. The per-image inputs of
a batch (images, maps a = l / sqrt(9 pi), reciprocals r = 1 / l) are interleaved once per batch, so V needs no
division, no 1/(9 pi) multiply and no l_x l_z rebuilt from short rows.
Arithmetic is float32; each tile row is summed in float32 per pair and added to the pair's float64 total.
"""

import math

import numba as nb
import numpy as np

LANES = 8  # pairs per batch: one per float32 lane of a 256-bit vector, LLVM's preferred width on this hardware
# Float32 rounding puts rho of identical patches (x = z, flat background) up to ~1e-6 below 1 after 20 layers, and
# arccos turns that into theta ~ 1e-3. Within this distance rho is indistinguishable from 1 in float32: snap to 1.
RHO_SNAP32 = 4e-6
# l below this is treated as 0 (r = 0, so rho = 0: the defined limit where o = 0); keeps r_x r_z <= 1e36, finite
# in float32. Images come normalised to max |x| in [1, 2) (scales.pow2_scale), so such l are negligible.
L_TINY = 1e-18
_PI = np.float32(math.pi)
_INV_9PI = np.float32(1.0 / (9.0 * math.pi))
# fastmath without "reassoc": LLVM may not reorder float sums. Elementwise loops vectorise without it, and the
# result no longer depends on how a particular process's compile happened to order the IR (bit-identical Grams).
# error_model="numpy": no ZeroDivisionError branches, which would keep the vectoriser away.
_FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
_JIT = dict(fastmath=_FM, error_model="numpy", cache=True)


@nb.njit(inline="always", **_JIT)
def _relu_row(s, t, ax, az, rx, rz, n):
    """V: rho = S r_x r_z, S' = a_x a_z (rho (pi - theta) + sin theta), T' = T (pi - theta)/(9 pi) + S'.

    theta = acos(rho) by A&S 4.4.46, acos(|rho|) = u P(|rho|) with u = sqrt(1 - |rho|) (|error| <= 2e-8), and
    sin theta = sqrt((1 - |rho|)(1 + |rho|)) = u sqrt(1 + |rho|)."""
    one = np.float32(1.0)
    for i in range(n):
        rho = s[i] * (rx[i] * rz[i])
        rho = min(max(rho, -one), one)
        rho = one if rho > one - np.float32(RHO_SNAP32) else rho
        a = abs(rho)
        u = np.float32(math.sqrt(one - a))
        p = np.float32(-0.0012624911)
        p = p * a + np.float32(0.0066700901)
        p = p * a + np.float32(-0.0170881256)
        p = p * a + np.float32(0.0308918810)
        p = p * a + np.float32(-0.0501743046)
        p = p * a + np.float32(0.0889789874)
        p = p * a + np.float32(-0.2145988016)
        p = p * a + np.float32(1.5707963050)
        acos_a = u * p
        pt = _PI - acos_a if rho >= 0 else acos_a  # pi - theta
        sn = (ax[i] * az[i]) * (rho * pt + u * np.float32(math.sqrt(one + a)))
        s[i] = sn
        t[i] = t[i] * (pt * _INV_9PI) + sn


@nb.njit(inline="always", **_JIT)
def _box3(buf, hb, zero, ml, mr, hh, rowlen, cut):
    """buf <- 3x3 box sum of the tile, not across the cut row / column: hb = row pass (ml, mr: 0 at the column
    edges and the cut), then the column pass. buf has LANES zero floats before and after the tile."""
    for i in range(hh):
        src = buf[i * rowlen:(i + 1) * rowlen + 2 * LANES]  # from the left neighbour of the row's first entry
        dst = hb[i * rowlen:(i + 1) * rowlen]
        for e in range(rowlen):
            dst[e] = (src[e + LANES] + ml[e] * src[e]) + mr[e] * src[e + 2 * LANES]
    for i in range(hh):
        up = hb[(i - 1) * rowlen:i * rowlen] if i > 0 and i != cut else zero
        down = hb[(i + 1) * rowlen:(i + 2) * rowlen] if i + 1 < hh and i + 1 != cut else zero
        mid = hb[i * rowlen:(i + 1) * rowlen]
        dst = buf[LANES + i * rowlen:LANES + (i + 1) * rowlen]
        for e in range(rowlen):
            dst[e] = (up[e] + mid[e]) + down[e]


@nb.njit(**_JIT)
def _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, fix, s, t, hb, zero, ml, mr, acc, tot):
    """tot[k] += sum over tile (b, a) of T (T - S if fix) after all layers, for the batch's LANES pairs.

    xb: (C, 2H, 2W, LANES) batch images, rows and columns doubled (p side); zb: (C, H, W, LANES) (q side);
    axb, rxb: (depth-1, 2H, 2W, LANES) maps a and r, doubled; azb, rzb: (depth-1, H, W, LANES); all flat."""
    rowlen = ww * LANES
    cut_r, cut_c = hh - b, ww - a  # first row / column of the second piece (none when b = 0 / a = 0)
    for j in range(ww):
        left = 0.0 if j == 0 or j == cut_c else 1.0
        right = 0.0 if j + 1 == ww or j + 1 == cut_c else 1.0
        for k in range(LANES):
            ml[j * LANES + k] = left
            mr[j * LANES + k] = right
    xrow, zrow = 2 * ww * LANES, rowlen
    xplane, zplane = 2 * hh * xrow, hh * zrow
    # G[p, q] = sum_c x_c[p] z_c[q]
    for i in range(hh):
        dst = s[LANES + i * rowlen:LANES + (i + 1) * rowlen]
        for ch in range(nch):
            xr = xb[ch * xplane + (i + b) * xrow + a * LANES:]
            zr = zb[ch * zplane + i * zrow:]
            if ch == 0:
                for e in range(rowlen):
                    dst[e] = xr[e] * zr[e]
            else:
                for e in range(rowlen):
                    dst[e] += xr[e] * zr[e]
    _box3(s, hb, zero, ml, mr, hh, rowlen, cut_r)
    n = hh * rowlen + 2 * LANES
    if fix:
        t[:n] = 0.0
    else:
        t[:n] = s[:n]
    for layer in range(nl):
        for i in range(hh):
            ox = layer * xplane + (i + b) * xrow + a * LANES
            oz = layer * zplane + i * zrow
            _relu_row(s[LANES + i * rowlen:], t[LANES + i * rowlen:], axb[ox:], azb[oz:], rxb[ox:], rzb[oz:], rowlen)
        if layer < nl - 1:
            _box3(s, hb, zero, ml, mr, hh, rowlen, cut_r)
            _box3(t, hb, zero, ml, mr, hh, rowlen, cut_r)
    for i in range(hh):
        sr, tr = s[LANES + i * rowlen:], t[LANES + i * rowlen:]
        for k in range(LANES):
            acc[k] = 0.0
        for j in range(ww):
            for k in range(LANES):
                acc[k] += tr[j * LANES + k] - sr[j * LANES + k] if fix else tr[j * LANES + k]
        for k in range(LANES):
            tot[k] += acc[k]


@nb.njit(**_JIT)
def _interleave(src, idx, out, double):
    """out[((c r) s) k] = src[idx[k], c, r mod H, s mod W] over rows and columns (doubled: 2H x 2W), pair innermost."""
    nc, hh, ww = src.shape[1], src.shape[2], src.shape[3]
    fr = 2 if double else 1
    for k in range(LANES):
        v = src[idx[k]]
        for c in range(nc):
            for r in range(fr * hh):
                for q in range(fr * ww):
                    out[((c * fr * hh + r) * fr * ww + q) * LANES + k] = v[c, r % hh, q % ww]


@nb.njit(parallel=True, **_JIT)
def _pairs(x1, a1, r1, x2, a2, r2, ii, jj, gap, fix, out, chunks):
    """out[k] = K(x1[ii[k]], x2[jj[k]]) for every listed pair: batches of LANES pairs, in parallel chunks of batches."""
    nch, hh, ww = x1.shape[1], x1.shape[2], x1.shape[3]
    nl = a1.shape[1]
    n = ii.shape[0]
    nbatch = (n + LANES - 1) // LANES
    size = hh * ww * LANES + 2 * LANES
    for c in nb.prange(chunks):
        s = np.zeros(size, np.float32)
        t = np.zeros(size, np.float32)
        hb = np.zeros(size, np.float32)
        zero = np.zeros(ww * LANES, np.float32)
        ml = np.empty(ww * LANES, np.float32)
        mr = np.empty(ww * LANES, np.float32)
        xb = np.empty(nch * 4 * hh * ww * LANES, np.float32)
        zb = np.empty(nch * hh * ww * LANES, np.float32)
        axb = np.empty(nl * 4 * hh * ww * LANES, np.float32)
        rxb = np.empty_like(axb)
        azb = np.empty(nl * hh * ww * LANES, np.float32)
        rzb = np.empty_like(azb)
        pi = np.empty(LANES, np.int64)
        pj = np.empty(LANES, np.int64)
        acc = np.empty(LANES, np.float32)
        tot = np.empty(LANES, np.float64)
        for bt in range(c * nbatch // chunks, (c + 1) * nbatch // chunks):
            for k in range(LANES):  # lanes past the last pair repeat the batch's first pair; their results are dropped
                m = bt * LANES + k if bt * LANES + k < n else bt * LANES
                pi[k], pj[k] = ii[m], jj[m]
            _interleave(x1, pi, xb, True)
            _interleave(a1, pi, axb, True)
            _interleave(r1, pi, rxb, True)
            _interleave(x2, pj, zb, False)
            _interleave(a2, pj, azb, False)
            _interleave(r2, pj, rzb, False)
            tot[:] = 0.0
            for b in range(hh if gap else 1):
                for a in range(ww if gap else 1):
                    _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, fix, s, t, hb, zero, ml, mr, acc, tot)
            for k in range(LANES):
                if bt * LANES + k < n:
                    out[bt * LANES + k] = tot[k] / float(hh * ww) ** 2 if gap else tot[k]


def lane_maps(l) -> tuple[np.ndarray, np.ndarray]:
    """(a, r): a = l / sqrt(9 pi) (so a_x a_z = l_x l_z / (9 pi)) and r = 1 / l (0 where l < L_TINY), float32."""
    l = np.asarray(l, dtype=np.float64)
    a = (l / math.sqrt(9.0 * math.pi)).astype(np.float32)
    with np.errstate(divide="ignore"):
        r = np.where(l >= L_TINY, 1.0 / l, 0.0).astype(np.float32)
    return a, r


def cntk_block_cpu(x1, l1, x2, l2, *, depth: int, gap: bool = True, fix: bool = False,
                   upper: bool = False) -> np.ndarray:
    """K[i, j] = K(x1_i, x2_j) as float64; upper=True (x1 is x2) computes i <= j only and mirrors it."""
    x1, x2 = (np.ascontiguousarray(a, dtype=np.float32) for a in (x1, x2))
    (a1, r1), (a2, r2) = lane_maps(np.asarray(l1)[:, :depth - 1]), lane_maps(np.asarray(l2)[:, :depth - 1])
    n1, n2 = len(x1), len(x2)
    ii, jj = np.triu_indices(n1, 0, n2) if upper else np.indices((n1, n2)).reshape(2, -1)
    vals = np.empty(len(ii), np.float64)
    if len(ii):
        nbatch = -(-len(ii) // LANES)
        chunks = min(nbatch, 4 * nb.get_num_threads())  # a few chunks per thread balance the load
        _pairs(x1, a1, r1, x2, a2, r2, ii.astype(np.int64), jj.astype(np.int64), gap, fix, vals, chunks)
    k = np.empty((n1, n2), np.float64)
    k[ii, jj] = vals
    if upper:
        k[jj, ii] = vals
    return k
