"""Fast CPU CNTK: a fused numba kernel that runs all layers of a batch of pairs at once, tile by tile.

A(.) never mixes offsets D = p - q, so the 4-D recursion of a pair splits into 2-D slabs, one per D, on each of
which A is a 3x3 box filter with zero boundary and V is elementwise. The (2H-1)(2W-1) slabs pack exactly into H*W
tiles of H x W entries (as in cntk_fused.cu): tile (b, a), indexed by q = (i, j), holds the entry (p, q) with
p = ((i + b) mod H, (j + a) mod W); it is made of up to four slabs, separated by cuts at row H - b and column W - a,
which the box filter does not cross. With the x-side inputs rotated by a columns (once per a), the p of a tile
row is the contiguous row (i + b) mod H, so every pass is a plain loop over a tile row: no padding, no gathers.
A batch of `lanes` pairs runs in lock step: each tile entry holds one float32 per pair, side by side, so a tile row
is W * lanes floats whatever the image size (lanes = 16 below W = 16, else 8), and the loops vectorise without
remainders. A pair's arithmetic does not depend on its batch or lane: any block of a Gram has the same bits.
The per-image inputs of a batch (images, maps a = l / sqrt(9 pi), reciprocals r = 1 / l) are interleaved once per
batch, so V needs no division, no 1/(9 pi) multiply and no l_x l_z rebuilt from short rows.
Arithmetic is float32; each tile column is summed in float32 per pair and added to the pair's float64 total.
"""

import math

import numba as nb
import numpy as np

ROW_GROUP = 2048  # floats per loop of the box filter's row pass: several short tile rows at once
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
_JIT = {"fastmath": _FM, "error_model": "numpy", "cache": True}


@nb.njit(inline="always", **_JIT)
def _relu_row(s, t, ax, az, rx, rz, n):
    """V: rho = S r_x r_z, S' = a_x a_z (rho (pi - theta) + sin theta), T' = T (pi - theta)/(9 pi) + S'.

    theta = acos(rho) by A&S 4.4.46, acos(|rho|) = u P(|rho|) with u = sqrt(1 - |rho|) (|error| <= 2e-8), and
    sin theta = sqrt((1 - |rho|)(1 + |rho|)) = u sqrt(1 + |rho|)."""
    one = np.float32(1.0)
    for i in range(n):
        rho = s[i] * (rx[i] * rz[i])
        rho = one if rho > one - np.float32(RHO_SNAP32) else max(rho, -one)  # clip to [-1, 1], snap near 1
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
def _box3(buf, hb, ml, mr, hh, rowlen, lanes, grp, cut):
    """buf <- 3x3 box sum of the tile, not across the cut row and column: the row pass into hb, grp rows per loop
    (ml, mr: 0 at the column edges and the cut, 1 elsewhere), then the column pass over the whole tile, whose two
    rows at the cut are redone without each other. buf has one zero entry (lanes floats) before and after the
    tile, hb a zero row before and after it."""
    for i0 in range(0, hh, grp):
        n = min(grp, hh - i0) * rowlen
        o = i0 * rowlen
        left, mid, right = buf[o:o + n], buf[o + lanes:o + lanes + n], buf[o + 2 * lanes:o + 2 * lanes + n]
        dst = hb[o + rowlen:o + rowlen + n]
        for e in range(n):
            dst[e] = (mid[e] + ml[e] * left[e]) + mr[e] * right[e]
    n = hh * rowlen
    dst, up, mid, down = buf[lanes:lanes + n], hb[:n], hb[rowlen:rowlen + n], hb[2 * rowlen:2 * rowlen + n]
    for e in range(n):
        dst[e] = (up[e] + mid[e]) + down[e]
    if 0 < cut < hh:
        up, mid = hb[(cut - 1) * rowlen:cut * rowlen], hb[cut * rowlen:(cut + 1) * rowlen]
        mid2, down = hb[(cut + 1) * rowlen:(cut + 2) * rowlen], hb[(cut + 2) * rowlen:(cut + 3) * rowlen]
        row1 = buf[lanes + (cut - 1) * rowlen:lanes + cut * rowlen]
        row2 = buf[lanes + cut * rowlen:lanes + (cut + 1) * rowlen]
        for e in range(rowlen):
            row1[e] = up[e] + mid[e]
            row2[e] = mid2[e] + down[e]


@nb.njit(**_JIT)
def _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, lanes, fix, s, t, hb, ml, mr, grp, acc, tot):
    """tot[k] += sum over tile (b, a) of T (T - S if fix) after all layers, for the batch's pairs k < lanes.

    xb: (C, H, W, lanes) batch images with columns rotated by a (p side, _rotate); zb: (C, H, W, lanes) (q side);
    axb, rxb: (depth-1, H, W, lanes) maps a and r, rotated by a; azb, rzb: (depth-1, H, W, lanes); all flat.
    ml, mr: the row pass's masks for column shift a (column_masks), grp rows of them."""
    rowlen = ww * lanes
    plane = hh * rowlen
    cut_r = hh - b  # first row of the second piece (none when b = 0)
    # G[p, q] = sum_c x_c[p] z_c[q]; tile row i reads the p row (i + b) mod H
    for i in range(hh):
        dst = s[lanes + i * rowlen:lanes + (i + 1) * rowlen]
        xi = i + b if i + b < hh else i + b - hh
        for ch in range(nch):
            xr = xb[ch * plane + xi * rowlen:]
            zr = zb[ch * plane + i * rowlen:]
            if ch == 0:
                for e in range(rowlen):
                    dst[e] = xr[e] * zr[e]
            else:
                for e in range(rowlen):
                    dst[e] += xr[e] * zr[e]
    _box3(s, hb, ml, mr, hh, rowlen, lanes, grp, cut_r)
    n = hh * rowlen + 2 * lanes
    if fix:
        t[:n] = 0.0
    else:
        t[:n] = s[:n]
    for layer in range(nl):
        for i in range(hh):
            xi = i + b if i + b < hh else i + b - hh
            ox, oz = layer * plane + xi * rowlen, layer * plane + i * rowlen
            _relu_row(s[lanes + i * rowlen:], t[lanes + i * rowlen:], axb[ox:], azb[oz:], rxb[ox:], rzb[oz:], rowlen)
        if layer < nl - 1:
            _box3(s, hb, ml, mr, hh, rowlen, lanes, grp, cut_r)
            _box3(t, hb, ml, mr, hh, rowlen, lanes, grp, cut_r)
    for i in range(hh):  # column sums over the tile rows in float32, then over the columns in float64
        sr, tr = s[lanes + i * rowlen:lanes + (i + 1) * rowlen], t[lanes + i * rowlen:lanes + (i + 1) * rowlen]
        if i == 0:
            for e in range(rowlen):
                acc[e] = tr[e] - sr[e] if fix else tr[e]
        else:
            for e in range(rowlen):
                acc[e] += tr[e] - sr[e] if fix else tr[e]
    for j in range(ww):
        for k in range(lanes):
            tot[k] += acc[j * lanes + k]


@nb.njit(**_JIT)
def _column_masks(ml, mr, a, ww, lanes, grp):
    """ml, mr = 0 where the left / right neighbour is outside the tile or across the cut at column W - a, else 1."""
    cut_c = ww - a
    for i in range(grp):
        for j in range(ww):
            left = 0.0 if j == 0 or j == cut_c else 1.0
            right = 0.0 if j + 1 == ww or j + 1 == cut_c else 1.0
            for k in range(lanes):
                ml[(i * ww + j) * lanes + k] = left
                mr[(i * ww + j) * lanes + k] = right


@nb.njit(**_JIT)
def _interleave(src, idx, out, lanes):
    """out[((c r) s) k] = src[idx[k], c, r, s]: per-image arrays of a batch, the pair innermost."""
    nc, hh, ww = src.shape[1], src.shape[2], src.shape[3]
    for k in range(lanes):
        v = src[idx[k]]
        for c in range(nc):
            for r in range(hh):
                for q in range(ww):
                    out[((c * hh + r) * ww + q) * lanes + k] = v[c, r, q]


@nb.njit(**_JIT)
def _rotate(src, dst, a, rowlen, lanes):
    """dst[row, j] = src[row, (j + a) mod W] for every row of W entries (rowlen = W * lanes floats)."""
    sh = a * lanes
    for o in range(0, len(src), rowlen):
        head, tail = src[o + sh:o + rowlen], src[o:o + sh]
        d1, d2 = dst[o:o + rowlen - sh], dst[o + rowlen - sh:o + rowlen]
        for e in range(rowlen - sh):
            d1[e] = head[e]
        for e in range(sh):
            d2[e] = tail[e]


@nb.njit(parallel=True, **_JIT)
def _pairs(x1, a1, r1, x2, a2, r2, ii, jj, gap, fix, lanes, out, chunks):
    """out[k] = K(x1[ii[k]], x2[jj[k]]) for every listed pair: batches of `lanes` pairs, parallel chunks of batches."""
    nch, hh, ww = x1.shape[1], x1.shape[2], x1.shape[3]
    nl = a1.shape[1]
    n = ii.shape[0]
    nbatch = (n + lanes - 1) // lanes
    size = hh * ww * lanes + 2 * lanes
    grp = min(hh, max(1, ROW_GROUP // (ww * lanes)))
    for c in nb.prange(chunks):
        s = np.zeros(size, np.float32)
        t = np.zeros(size, np.float32)
        hb = np.zeros((hh + 2) * ww * lanes, np.float32)
        ml = np.empty(grp * ww * lanes, np.float32)
        mr = np.empty(grp * ww * lanes, np.float32)
        xp = np.empty(nch * hh * ww * lanes, np.float32)
        xb, zb = np.empty_like(xp), np.empty_like(xp)
        axp = np.empty(nl * hh * ww * lanes, np.float32)
        rxp, axb, rxb = np.empty_like(axp), np.empty_like(axp), np.empty_like(axp)
        azb, rzb = np.empty_like(axp), np.empty_like(axp)
        pi = np.empty(lanes, np.int64)
        pj = np.empty(lanes, np.int64)
        acc = np.empty(ww * lanes, np.float32)
        tot = np.empty(lanes, np.float64)
        for bt in range(c * nbatch // chunks, (c + 1) * nbatch // chunks):
            for k in range(lanes):  # lanes past the last pair repeat the batch's first pair; their results are dropped
                m = bt * lanes + k if bt * lanes + k < n else bt * lanes
                pi[k], pj[k] = ii[m], jj[m]
            _interleave(x1, pi, xp, lanes)
            _interleave(a1, pi, axp, lanes)
            _interleave(r1, pi, rxp, lanes)
            _interleave(x2, pj, zb, lanes)
            _interleave(a2, pj, azb, lanes)
            _interleave(r2, pj, rzb, lanes)
            tot[:] = 0.0
            for a in range(ww if gap else 1):
                _column_masks(ml, mr, a, ww, lanes, grp)
                _rotate(xp, xb, a, ww * lanes, lanes)
                _rotate(axp, axb, a, ww * lanes, lanes)
                _rotate(rxp, rxb, a, ww * lanes, lanes)
                for b in range(hh if gap else 1):
                    _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, lanes, fix, s, t, hb, ml, mr, grp, acc,
                          tot)
            for k in range(lanes):
                if bt * lanes + k < n:
                    out[bt * lanes + k] = tot[k] / float(hh * ww) ** 2 if gap else tot[k]


def batch_lanes(w: int) -> int:
    """Pairs per batch: 8 (one per float32 lane of a 256-bit vector, LLVM's preferred width here), 16 for images
    narrower than 16, whose tile rows would otherwise be too short to hide the loop overhead (8x8: 2x faster)."""
    return 16 if w < 16 else 8


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
        lanes = batch_lanes(x1.shape[3])
        nbatch = -(-len(ii) // lanes)
        chunks = min(nbatch, 4 * nb.get_num_threads())  # a few chunks per thread balance the load
        _pairs(x1, a1, r1, x2, a2, r2, ii.astype(np.int64), jj.astype(np.int64), gap, fix, lanes, vals, chunks)
    k = np.empty((n1, n2), np.float64)
    k[ii, jj] = vals
    if upper:
        k[jj, ii] = vals
    return k
