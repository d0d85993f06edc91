"""Fast CPU CNTK: a fused numba kernel that runs all layers of a batch of pairs at once, tile by tile.

A(.) never mixes offsets D = p - q, so the 4-D recursion of a pair splits into 2-D slabs, one per D, on each of
which A is a 3x3 box filter with zero boundary and V is elementwise. The (2H-1)(2W-1) slabs pack exactly into H*W
tiles of H x W entries (as in cntk_fused.cu): tile (b, a), indexed by q = (i, j), holds the entry (p, q) with
p = ((i + b) mod H, (j + a) mod W); it is made of up to four slabs, separated by cuts at row H - b and column W - a,
which the box filter does not cross.
Layout: a batch of `lanes` pairs runs in lock step, each tile entry holding one float32 per pair side by side
(16 lanes: one 512-bit vector; 32 below W = 16, whose rows are short). A row is W + 1 entries, a zero entry first,
so the box filter's row pass is one loop over whole rows (the zero entries are the edges; the two entries beside
the column cut are redone). The tile's two row pieces (rows i < H - b, whose p rows are i + b, and the rest) lie
between zero rows, so the column pass reads the rows above and below without tests, and it runs fused with V: one
loop per piece and layer reads the row-passed S and T, sums three rows and applies V. The x-side inputs are
rotated by a columns once per a, so the p rows of a piece are contiguous rows of them.
The per-image inputs of a batch (images, maps a = l / sqrt(9 pi), reciprocals r = 1 / l) are interleaved once per
batch, so V needs no division, no 1/(9 pi) multiply and no l_x l_z rebuilt from short rows.
Arithmetic is float32; each tile column is summed in float32 per pair and added to the pair's float64 total. A
pair's arithmetic does not depend on its batch, lane or the layout: any block of a Gram has the same bits (and
the same bits as the earlier row-grouped layout of this kernel).
"""

import math

import numba as nb
import numpy as np

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
def _v(s, t, ax, az, rx, rz):
    """V: rho = S r_x r_z, S' = a_x a_z (rho (pi - theta) + sin theta), T' = T (pi - theta)/(9 pi) + S'.

    theta = acos(rho) by A&S 4.4.46, acos(|rho|) = u P(|rho|) with u = sqrt(1 - |rho|) (|error| <= 2e-8), and
    sin theta = sqrt((1 - |rho|)(1 + |rho|)) = u sqrt(1 + |rho|)."""
    one = np.float32(1.0)
    rho = s * (rx * rz)
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
    sn = (ax * az) * (rho * pt + u * np.float32(math.sqrt(one + a)))
    return sn, t * (pt * _INV_9PI) + sn


@nb.njit(inline="always", **_JIT)
def _row_pass(src, dst, o, n, ww, lanes, stride, cut_c):
    """dst[r, j] = (src[r, j] + src[r, j-1]) + src[r, j+1] on the rows of entries o <= e < o + n, not across the
    cut between columns cut_c - 1 and cut_c. Entry (r, j) lies at r stride + (j + 1) lanes: a zero entry starts
    every row (and follows the last)."""
    left, mid, right, out = src[o - lanes:o - lanes + n], src[o:o + n], src[o + lanes:o + lanes + n], dst[o:o + n]
    for e in range(n):
        out[e] = (mid[e] + left[e]) + right[e]
    if 0 < cut_c < ww:
        for r in range(n // stride):
            o1 = r * stride + cut_c * lanes  # entry (r, cut_c - 1)
            o2 = o1 + lanes
            for k0 in range(0, lanes, 8):  # 8 at a time: a constant trip count, unrolled
                for k in range(8):
                    out[o1 + k0 + k] = mid[o1 + k0 + k] + left[o1 + k0 + k]
                    out[o2 + k0 + k] = mid[o2 + k0 + k] + right[o2 + k0 + k]


@nb.njit(**_JIT)
def _layer_rows(hs, ht, s, t, ax, az, rx, rz, o, n, stride, first, fix):
    """Entries o <= e < o + n of a layer: S = (up + mid) + down of the row-passed S (T likewise; at the first layer
    T = S, or 0 with fix), then V into s, t; ax, az, rx, rz start at entry o."""
    us, ms, ds, so = hs[o - stride:], hs[o:], hs[o + stride:], s[o:]
    ut, mt, dt, to = ht[o - stride:], ht[o:], ht[o + stride:], t[o:]
    if first and fix:
        for e in range(n):
            sv = (us[e] + ms[e]) + ds[e]
            so[e], to[e] = _v(sv, np.float32(0.0), ax[e], az[e], rx[e], rz[e])
    elif first:
        for e in range(n):
            sv = (us[e] + ms[e]) + ds[e]
            so[e], to[e] = _v(sv, sv, ax[e], az[e], rx[e], rz[e])
    else:
        for e in range(n):
            sv = (us[e] + ms[e]) + ds[e]
            tv = (ut[e] + mt[e]) + dt[e]
            so[e], to[e] = _v(sv, tv, ax[e], az[e], rx[e], rz[e])


@nb.njit(**_JIT)
def _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, lanes, fix, s, t, hs, ht, acc, tot):
    """tot[k] += sum over tile (b, a) of T (T - S if fix) after all layers, for the batch's pairs k < lanes.

    Rows of W + 1 entries of `lanes` floats, a zero entry first. The per-image stacks are (plane, H, W + 1, lanes)
    plus one zero entry after each plane: xb (C planes) batch images with columns rotated by a (p side, _rotate),
    zb (q side); axb, rxb (depth - 1 planes) maps a and r, rotated by a; azb, rzb. s, t (S and T) and hs, ht
    (their row passes) hold the tile's two pieces, rows 0 <= i < H - b (p rows i + b) and H - b <= i < H
    (p rows i + b - H), between zero rows: layout row 0 zero, piece one, a zero row, piece two, a zero row."""
    stride = (ww + 1) * lanes
    plane = hh * stride + lanes
    cut_r, cut_c = hh - b, ww - a  # first row and column of the second piece (none when b = 0 / a = 0)
    # the pieces: (first layout entry, entries, offset of the p side's rows, of the q side's rows)
    o1, n1, px1, qz1 = stride, cut_r * stride, b * stride, 0
    o2, n2, px2, qz2 = (cut_r + 2) * stride, b * stride, 0, cut_r * stride
    for buf in (s, t, hs, ht):  # the zero row between the pieces: a row of the previous tile's pieces
        buf[o1 + n1:o2] = 0.0
    for ch in range(nch):  # G[p, q] = sum_c x_c[p] z_c[q]
        x, z = xb[ch * plane:], zb[ch * plane:]
        for o, n, px, qz in ((o1, n1, px1, qz1), (o2, n2, px2, qz2)):
            xs, zs, g = x[px:], z[qz:], s[o:]
            for e in range(n):
                g[e] = xs[e] * zs[e] if ch == 0 else g[e] + xs[e] * zs[e]
    for o, n in ((o1, n1), (o2, n2)):
        _row_pass(s, hs, o, n, ww, lanes, stride, cut_c)
    for layer in range(nl):
        m = layer * plane
        _layer_rows(hs, ht, s, t, axb[m + px1:], azb[m + qz1:], rxb[m + px1:], rzb[m + qz1:], o1, n1, stride,
                    layer == 0, fix)
        if n2:
            _layer_rows(hs, ht, s, t, axb[m + px2:], azb[m + qz2:], rxb[m + px2:], rzb[m + qz2:], o2, n2, stride,
                        layer == 0, fix)
        if layer < nl - 1:
            for r in range(1, hh + 2):  # V wrote the zero entries that start the rows: restore them
                s[r * stride:r * stride + lanes] = 0.0
                t[r * stride:r * stride + lanes] = 0.0
            for o, n in ((o1, n1), (o2, n2)):
                _row_pass(s, hs, o, n, ww, lanes, stride, cut_c)
                _row_pass(t, ht, o, n, ww, lanes, stride, cut_c)
    n = ww * lanes
    for i in range(hh):  # column sums over the tile rows in float32, then over the columns in float64
        o = (i + 1 if i < cut_r else i + 2) * stride + lanes
        sr, tr = s[o:], t[o:]
        if i == 0:
            for e in range(n):
                acc[e] = tr[e] - sr[e] if fix else tr[e]
        else:
            for e in range(n):
                acc[e] += tr[e] - sr[e] if fix else tr[e]
    for j in range(ww):
        for k in range(lanes):
            tot[k] += acc[j * lanes + k]


@nb.njit(**_JIT)
def _interleave(src, idx, out, lanes, pad):
    """out[c, r, pad + s, k] = src[idx[k], c, r, s]: per-image arrays of a batch, the pair innermost, rows of
    W + pad entries (a zero entry before each row and after the last when pad = 1)."""
    nc, hh, ww = src.shape[1], src.shape[2], src.shape[3]
    stride = (ww + pad) * lanes
    plane = hh * stride + pad * lanes
    for k in range(lanes):
        v = src[idx[k]]
        for c in range(nc):
            for r in range(hh):
                for q in range(ww):
                    out[c * plane + r * stride + (pad + q) * lanes + k] = v[c, r, q]


@nb.njit(**_JIT)
def _rotate(src, dst, a, hh, ww, lanes):
    """dst[., r, 1 + j] = src[., r, (j + a) mod W]: rows of W entries (src) into the padded layout of _tile."""
    rowlen, stride = ww * lanes, (ww + 1) * lanes
    plane = hh * stride + lanes
    sh = a * lanes
    for o in range(len(src) // rowlen):
        os, od = o * rowlen, (o // hh) * plane + (o % hh) * stride + lanes
        head, tail = src[os + sh:os + rowlen], src[os:os + sh]
        d1, d2 = dst[od:od + rowlen - sh], dst[od + rowlen - sh:od + rowlen]
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
    for c in nb.prange(chunks):
        size = hh * (ww + 1) * lanes + lanes  # a plane of the per-image stacks
        s = np.zeros((hh + 3) * (ww + 1) * lanes + lanes, np.float32)
        t, hs, ht = np.zeros_like(s), np.zeros_like(s), np.zeros_like(s)
        xp = np.empty(nch * hh * ww * lanes, np.float32)
        xb, zb = np.zeros(nch * size, np.float32), np.zeros(nch * size, np.float32)
        axp, rxp = np.empty(nl * hh * ww * lanes, np.float32), np.empty(nl * hh * ww * lanes, np.float32)
        axb = np.zeros(nl * size, np.float32)
        rxb, azb, rzb = np.zeros_like(axb), np.zeros_like(axb), np.zeros_like(axb)
        pi = np.empty(lanes, np.int64)
        pj = np.empty(lanes, np.int64)
        acc = np.empty(ww * lanes, np.float32)
        tot = np.empty(lanes, np.float64)
        for bt in range(c * nbatch // chunks, (c + 1) * nbatch // chunks):
            for k in range(lanes):  # lanes past the last pair repeat the batch's first pair; their results are dropped
                m = bt * lanes + k if bt * lanes + k < n else bt * lanes
                pi[k], pj[k] = ii[m], jj[m]
            _interleave(x1, pi, xp, lanes, 0)
            _interleave(a1, pi, axp, lanes, 0)
            _interleave(r1, pi, rxp, lanes, 0)
            _interleave(x2, pj, zb, lanes, 1)
            _interleave(a2, pj, azb, lanes, 1)
            _interleave(r2, pj, rzb, lanes, 1)
            tot[:] = 0.0
            for a in range(ww if gap else 1):
                _rotate(xp, xb, a, hh, ww, lanes)
                _rotate(axp, axb, a, hh, ww, lanes)
                _rotate(rxp, rxb, a, hh, ww, lanes)
                for b in range(hh if gap else 1):
                    _tile(xb, zb, axb, azb, rxb, rzb, b, a, hh, ww, nch, nl, lanes, fix, s, t, hs, ht, acc, tot)
            for k in range(lanes):
                if bt * lanes + k < n:
                    out[bt * lanes + k] = tot[k] / float(hh * ww) ** 2 if gap else tot[k]


def batch_lanes(w: int) -> int:
    """Pairs per batch: 16 (one 512-bit vector of float32, aligned neighbours in the row pass; 8 lanes were 10%
    slower at 28x28 here), 32 for images narrower than 16, whose rows would otherwise be too short to hide the
    loop overhead."""
    return 32 if w < 16 else 16


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
