"""Fast CPU CNTK: a fused numba kernel that runs all layers of a batch of pairs at once, tile by tile.

The slabs and tiles below are those of docs/math.md eqs. (20) and (21).

A(.) never mixes offsets D = p - q, so the 4-D recursion of a pair splits into 2-D slabs, one per D, on each of
which A is a 3x3 box filter with zero boundary and V is elementwise. The (2H-1)(2W-1) slabs pack exactly into H*W
tiles of H x W entries (as in cntk_fused.cu): tile (b, a), indexed by q = (i, j), holds the entry (p, q) with
p = ((i + b) mod H, (j + a) mod W); it is made of up to four slabs, separated by cuts at row H - b and column W - a,
which the box filter does not cross.
Layout: a batch of `lanes` pairs runs in lock step, each tile entry holding one float32 per pair side by side
(16 lanes; 32 below W = 16 and 64 below W = 12, whose rows are short). A row is W + 1 entries, a zero entry first,
so the box filter's row pass is one loop over a whole row (the zero entries are the edges; the two entries beside
the column cut are redone). The tile's two row pieces (rows i < H - b, whose p rows are i + b, and the rest) lie
between zero rows.
Order: a wavefront over the rows (_tiles). Level 0 of row r is the row-passed G, level l the row-passed S and T
after layer l; level l of row r needs level l - 1 of rows r - 1, r, r + 1, so one step computes, level by level,
row k - l of each level l. Each level keeps its last three rows, so a tile's state is a few KB per layer instead
of four whole planes that go through the L2 cache every layer; up to four tiles run side by side and share the map
rows.
The x-side inputs are rotated by a columns once per a, so the p rows of a piece are contiguous rows of them.
The per-image inputs of a batch (images, maps a = l / sqrt(9 pi), reciprocals r = 1 / l) are interleaved once per
batch, so V needs no division, no 1/(9 pi) multiply and no l_x l_z rebuilt from short rows.
Arithmetic is float32; each tile column is summed in float32 per pair and added to the pair's float64 total. A
pair's arithmetic does not depend on its batch, lane, layout or order: any block of a Gram has the same bits.
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
# V's constants: 1, the snap distance, the acos polynomial's coefficients (A&S 4.4.46, highest power first), pi and
# 1/(9 pi). The kernel gets them as an argument, not as literals: LLVM then holds them in vector registers through
# the V loop instead of reloading each from memory every iteration (fewer instructions per entry; the same bits).
V_CONSTS = tuple(np.float32(c) for c in (
    1.0, RHO_SNAP32, -0.0012624911, 0.0066700901, -0.0170881256, 0.0308918810, -0.0501743046, 0.0889789874,
    -0.2145988016, 1.5707963050, math.pi, 1.0 / (9.0 * math.pi)))
# Tiles (b, a) of one a computed side by side share the map rows they read while those are cached: at most 4, and
# only as many as keep the group's rings within RING_BYTES, half of a 1 MB L2 cache (rings that spill the L2 cost
# more than the shared reads save).
TILE_GROUP = 4
RING_BYTES = 512 * 1024
# fastmath without "reassoc": LLVM may not reorder float sums. Elementwise loops vectorise without it, and the
# result no longer depends on how a particular process's compile happened to order the IR (bit-identical Grams).
# error_model="numpy": no ZeroDivisionError branches, which would keep the vectoriser away.
_FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
_JIT = {"fastmath": _FM, "error_model": "numpy", "cache": True}


@nb.njit(inline="always", **_JIT)
def _v(s, t, ax, az, rx, rz, vc):
    """V: rho = S r_x r_z, S' = a_x a_z (rho (pi - theta) + sin theta), T' = T (pi - theta)/(9 pi) + S'.

    docs/math.md eq. (4) with a = l / sqrt(9 pi), r = 1 / l (lane_maps). theta = acos(rho) by A&S 4.4.46,
    acos(|rho|) = u P(|rho|) with u = sqrt(1 - |rho|) (|error| <= 2e-8), and
    sin theta = sqrt((1 - |rho|)(1 + |rho|)) = u sqrt(1 + |rho|). vc: V_CONSTS."""
    one, snap, c7, c6, c5, c4, c3, c2, c1, c0, pi, inv_9pi = vc
    rho = s * (rx * rz)
    rho = one if rho > one - snap else max(rho, -one)  # clip to [-1, 1], snap near 1
    a = abs(rho)
    u = np.float32(math.sqrt(one - a))
    p = c7
    p = p * a + c6
    p = p * a + c5
    p = p * a + c4
    p = p * a + c3
    p = p * a + c2
    p = p * a + c1
    p = p * a + c0
    acos_a = u * p
    pt = pi - acos_a if rho >= 0 else acos_a  # pi - theta
    sn = (ax * az) * (rho * pt + u * np.float32(math.sqrt(one + a)))
    return sn, t * (pt * inv_9pi) + sn


@nb.njit(inline="always", **_JIT)
def _row_pass(v, dst, do, ww, lanes, stride, cut_c):
    """dst[do + e] = (v[e + lanes] + v[e]) + v[e + 2 lanes], 0 <= e < stride: the row pass of the row held in
    v[lanes:lanes + stride] (its zero entry first, a zero entry after it), not across the cut between columns
    cut_c - 1 and cut_c. Offsets are uint64: numba then indexes without negative-index tests, and the loop
    vectorises."""
    l2 = lanes + lanes
    for e in range(stride):
        dst[do + e] = (v[lanes + e] + v[e]) + v[l2 + e]
    if 0 < cut_c < ww:
        o1 = np.uint64(cut_c) * lanes  # entry cut_c - 1
        o2 = o1 + lanes
        for k in range(lanes):
            dst[do + o1 + k] = v[lanes + o1 + k] + v[o1 + k]
            dst[do + o2 + k] = v[lanes + o2 + k] + v[l2 + o2 + k]


@nb.njit(inline="always", **_JIT)
def _v_row(ring, su, sm, sd, tu, tm, td, vs, vt, vo, axb, azb, rxb, rzb, xo, zo, nw, first, fix, vc):
    """One row of a layer: S = (up + mid) + down of ring rows su, sm, sd (T likewise from tu, tm, td; at the first
    layer T = S, or 0 with fix), then V into vs[vo:], vt[vo:]; uint64 offsets."""
    if first and fix:
        for e in range(nw):
            sv = (ring[su + e] + ring[sm + e]) + ring[sd + e]
            vs[vo + e], vt[vo + e] = _v(sv, np.float32(0.0), axb[xo + e], azb[zo + e], rxb[xo + e], rzb[zo + e], vc)
    elif first:
        for e in range(nw):
            sv = (ring[su + e] + ring[sm + e]) + ring[sd + e]
            vs[vo + e], vt[vo + e] = _v(sv, sv, axb[xo + e], azb[zo + e], rxb[xo + e], rzb[zo + e], vc)
    else:
        for e in range(nw):
            sv = (ring[su + e] + ring[sm + e]) + ring[sd + e]
            tv = (ring[tu + e] + ring[tm + e]) + ring[td + e]
            vs[vo + e], vt[vo + e] = _v(sv, tv, axb[xo + e], azb[zo + e], rxb[xo + e], rzb[zo + e], vc)


@nb.njit(**_JIT)
def _tiles(xb, zb, axb, azb, rxb, rzb, b0, ntile, a, hh, ww, nch, nl, lanes, fix, ring, vs, vt, acc, tot, vc):
    """tot[k] += sum over the tiles (b, a), b0 <= b < b0 + ntile, of T (T - S if fix) after all layers.

    A wavefront over the layout rows r (row 0 zero, piece one, a zero row, piece two, a zero row; H + 3 rows of
    W + 1 entries of `lanes` floats, a zero entry first): level 0 is the row-passed G, level l the row-passed S and T
    of layer l. Level l's row r needs level l - 1's rows r - 1, r, r + 1, so step k computes row k - l of every
    level l in turn, and a level keeps three rows (ring slots r mod 3): the state of a tile is 6 (depth - 1) rows,
    not 4 planes. The tiles of a group run side by side, so the map rows one reads are read again by the next while
    cached. The per-image stacks are (plane, H, W + 1, lanes) plus one zero entry after each plane: xb (C planes)
    batch images with columns rotated by a (p side, _rotate), zb (q side); axb, rxb (depth - 1 planes) maps a and
    r, rotated by a; azb, rzb. vs, vt hold the row a step works on between zero entries; acc the column sums of T
    of each tile (float32), added to the pairs' float64 totals tile by tile."""
    u = np.uint64
    stride = (ww + 1) * lanes
    plane = hh * stride + lanes
    nw = ww * lanes
    cut_c = ww - a  # first column of the second column piece (none when a = 0)
    nrow = hh + 3
    per_tile = nl * 6 * stride
    for k in range(nrow + nl):
        for lev in range(min(k, nl) + 1):
            r = k - lev
            if r >= nrow:
                continue
            for tt in range(ntile):
                b = b0 + tt
                cut_r = hh - b  # first row of the second piece, whose p rows are i + b - H
                rb = lanes + tt * per_tile
                o = rb + (lev * 3 + r % 3) * 2 * stride  # this row's S slot in level lev's ring (T follows it)
                if r == 0 or r == cut_r + 1 or r == hh + 2:  # a zero row
                    if lev < nl:
                        ring[o:o + 2 * stride] = 0.0
                    continue
                if r <= cut_r:  # offsets of the row's p and q rows in the per-image planes
                    px, qz = (b + r - 1) * stride, (r - 1) * stride
                else:
                    px, qz = (r - cut_r - 2) * stride, (r - 2) * stride
                if lev == 0:  # G[p, q] = sum_c x_c[p] z_c[q], then the row pass
                    for ch in range(nch):
                        xo, zo, vo = u(ch * plane + px), u(ch * plane + qz), u(lanes)
                        for e in range(u(stride)):
                            vs[vo + e] = xb[xo + e] * zb[zo + e] if ch == 0 else vs[vo + e] + xb[xo + e] * zb[zo + e]
                    _row_pass(vs, ring, u(o), ww, u(lanes), u(stride), cut_c)
                    continue
                m = (lev - 1) * plane + lanes
                pb = rb + (lev - 1) * 6 * stride + lanes  # level lev - 1, first entry (not the zero one) of a row
                su, sm, sd = pb + ((r - 1) % 3) * 2 * stride, pb + (r % 3) * 2 * stride, pb + ((r + 1) % 3) * 2 * stride
                _v_row(ring, u(su), u(sm), u(sd), u(su + stride), u(sm + stride), u(sd + stride), vs, vt, u(2 * lanes),
                       axb, azb, rxb, rzb, u(m + px), u(m + qz), u(nw), lev == 1, fix, vc)
                if lev < nl:
                    _row_pass(vs, ring, u(o), ww, u(lanes), u(stride), cut_c)
                    _row_pass(vt, ring, u(o + stride), ww, u(lanes), u(stride), cut_c)
                else:  # the last layer: column sums over the tile rows in float32
                    vo, ao = u(2 * lanes), u(tt * nw)
                    for e in range(u(nw)):
                        x = vt[vo + e] - vs[vo + e] if fix else vt[vo + e]
                        acc[ao + e] = x if r == 1 else acc[ao + e] + x
    for tt in range(ntile):  # then over the columns in float64, tile by tile
        for j in range(ww):
            for k in range(lanes):
                tot[k] += acc[tt * nw + j * lanes + k]


@nb.njit(**_JIT)
def _interleave(src, idx, out, lanes, pad):
    """out[c, r, pad + s, k] = src[idx[k], c, r, s]: per-image arrays of a batch, the pair innermost, rows of
    W + pad entries (a zero entry before each row and after the last when pad = 1)."""
    nc, hh, ww = src.shape[1], src.shape[2], src.shape[3]
    stride = (ww + pad) * lanes
    plane = hh * stride + pad * lanes
    for c in range(nc):  # the lanes innermost: contiguous writes
        for r in range(hh):
            for q in range(ww):
                o = c * plane + r * stride + (pad + q) * lanes
                for k in range(lanes):
                    out[o + k] = src[idx[k], c, r, q]


@nb.njit(**_JIT)
def _rotate(src, dst, a, hh, ww, lanes):
    """dst[., r, 1 + j] = src[., r, (j + a) mod W]: rows of W entries (src) into the padded layout of _tiles."""
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


@nb.njit(**_JIT)
def _zeros64(n):
    """np.zeros(n, float32) starting on a 64-byte boundary, so that a 16-lane entry is one cache line: numba's arrays
    are only 32-byte aligned, and loads across two cache lines slow the kernel down."""
    buf = np.zeros(n + 16, np.float32)
    s = (-(buf.ctypes.data >> 2)) & 15
    return buf[s:s + n]


@nb.njit(parallel=True, **_JIT)
def _pairs(x1, a1, r1, x2, a2, r2, ii, jj, gap, fix, lanes, group, out, chunks, vc):
    """out[k] = K(x1[ii[k]], x2[jj[k]]) for every listed pair: batches of `lanes` pairs, parallel chunks of batches,
    `group` tiles side by side."""
    nch, hh, ww = x1.shape[1], x1.shape[2], x1.shape[3]
    nl = a1.shape[1]
    n = ii.shape[0]
    nbatch = (n + lanes - 1) // lanes
    n_b = hh if gap else 1  # tiles (b, a) per column shift a
    size = hh * (ww + 1) * lanes + lanes  # a plane of the per-image stacks
    for c in nb.prange(chunks):
        ring = _zeros64(group * nl * 6 * (ww + 1) * lanes + lanes)
        vs, vt = _zeros64((ww + 3) * lanes), _zeros64((ww + 3) * lanes)
        xp = _zeros64(nch * hh * ww * lanes)
        xb, zb = _zeros64(nch * size), _zeros64(nch * size)
        axp, rxp = _zeros64(nl * hh * ww * lanes), _zeros64(nl * hh * ww * lanes)
        axb, rxb, azb, rzb = _zeros64(nl * size), _zeros64(nl * size), _zeros64(nl * size), _zeros64(nl * size)
        pi = np.empty(lanes, np.int64)
        pj = np.empty(lanes, np.int64)
        acc = _zeros64(group * ww * lanes)
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
                for b0 in range(0, n_b, group):
                    _tiles(xb, zb, axb, azb, rxb, rzb, b0, min(group, n_b - b0), a, hh, ww, nch, nl, lanes, fix,
                           ring, vs, vt, acc, tot, vc)
            for k in range(lanes):
                if bt * lanes + k < n:
                    out[bt * lanes + k] = tot[k] / float(hh * ww) ** 2 if gap else tot[k]


def batch_lanes(w: int) -> int:
    """Pairs per batch: 16 (64-byte entries, one cache line), more for narrow images, whose rows would otherwise be
    too short to hide the loop overhead: 32 below W = 16, 64 below W = 12 (docs/benchmarks.md has the timings)."""
    return 64 if w < 12 else 32 if w < 16 else 16


def tile_group(w: int, depth: int) -> int:
    """Tiles side by side: up to TILE_GROUP, as many as keep their rings (6 (depth - 1) rows each) within RING_BYTES."""
    ring = 6 * max(depth - 1, 1) * (w + 1) * batch_lanes(w) * 4
    return max(1, min(TILE_GROUP, RING_BYTES // ring))


@nb.njit(cache=True)
def _lane_maps(l, c, a, r):
    """a = l / c, r = 1 / l (0 where l < L_TINY), each rounded once from float64 to float32. No fastmath: IEEE
    division, the bits of the same formula in numpy."""
    for i in range(l.shape[0]):
        for k in range(l.shape[1]):
            for h in range(l.shape[2]):
                for w in range(l.shape[3]):
                    v = l[i, k, h, w]
                    a[i, k, h, w] = v / c
                    r[i, k, h, w] = 1.0 / v if v >= L_TINY else 0.0


def lane_maps(l) -> tuple[np.ndarray, np.ndarray]:
    """(a, r): a = l / sqrt(9 pi) (so a_x a_z = l_x l_z / (9 pi)) and r = 1 / l (0 where l < L_TINY), float32,
    for l of shape (n, layers, H, W). One compiled pass, without numpy's float64 temporaries."""
    l = np.asarray(l, dtype=np.float64)
    a, r = np.empty(l.shape, np.float32), np.empty(l.shape, np.float32)
    _lane_maps(l, math.sqrt(9.0 * math.pi), a, r)
    return a, r


def cntk_block_cpu(x1, l1, x2, l2, *, depth: int, gap: bool = True, fix: bool = False,
                   upper: bool = False) -> np.ndarray:
    """K[i, j] = K(x1_i, x2_j) (docs/math.md eqs. (1)-(6)) as float64; upper=True (x1 is x2) computes i <= j only and
    mirrors it."""
    x1, x2 = (np.ascontiguousarray(a, dtype=np.float32) for a in (x1, x2))
    (a1, r1), (a2, r2) = lane_maps(np.asarray(l1)[:, :depth - 1]), lane_maps(np.asarray(l2)[:, :depth - 1])
    n1, n2 = len(x1), len(x2)
    ii, jj = np.triu_indices(n1, 0, n2) if upper else np.indices((n1, n2)).reshape(2, -1)
    vals = np.empty(len(ii), np.float64)
    if len(ii):
        lanes = batch_lanes(x1.shape[3])
        nbatch = -(-len(ii) // lanes)
        chunks = min(nbatch, 4 * nb.get_num_threads())  # a few chunks per thread balance the load
        _pairs(x1, a1, r1, x2, a2, r2, ii.astype(np.int64), jj.astype(np.int64), gap, fix, lanes,
               tile_group(x1.shape[3], depth), vals, chunks, V_CONSTS)
    k = np.empty((n1, n2), np.float64)
    k[ii, jj] = vals
    if upper:
        k[jj, ii] = vals
    return k
