"""CNTK on an NVIDIA GPU through cupy: one fused kernel (cntk_fused.cu) runs all layers of many pairs per launch.

The kernel splits each pair into H*W tiles of H x W slab entries (docs/math.md eq. (21); the header of
cntk_fused.cu); a work item is
(pair, tile). Images and scale maps stay resident on the device; a Gram block is one launch per chunk of pairs, and
the per-item float64 sums are reduced per pair on the device. cupy is imported lazily: importing this module never
needs it. The host-side planning below (prepare_images, plan_items, pair_lists, finish) is plain numpy, shared with
the CPU emulation of the kernel (tests/support/cuda_emu/, used by tests/test_cupy_backend.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scales import normalise, pow2_scale

KERNEL_PATH = Path(__file__).with_name("cntk_fused.cu")
KERNEL_NAME = "cntk_fused"
BLOCK_THREADS = 128  # = BLOCK_THREADS in cntk_fused.cu
MAX_W = 32  # tile columns map to warp lanes
MAX_H = 64  # tile rows live in registers
MAX_ITEMS_PER_LAUNCH = 1 << 24  # per-item float64 partials: 128 MiB at most
RENORM = 8  # = RENORM in cntk_fused.cu: the running scale (9 pi)^k is reset every RENORM V steps
NINE_PI = 9.0 * np.pi


def available() -> bool:
    """True when cupy imports and a CUDA device is usable; never raises."""
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # ImportError, CUDA driver errors, anything: not available
        return False


def _require_cupy():
    """The cupy module, or RuntimeError saying what is missing."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise RuntimeError(
            "cupy backend needs cupy, which did not import "
            f"({type(exc).__name__}: {exc}); install mnkpipe[gpu] (cupy-cuda12x) on a machine with CUDA"
        ) from exc
    try:
        ok = bool(cupy.is_available())
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError("cupy backend needs a CUDA GPU: cupy imports but no CUDA device is visible")
    return cupy


def kernel_source() -> str:
    """The CUDA C++ text of the fused kernel."""
    return KERNEL_PATH.read_text()


def compile_options(h: int, w: int, min_blocks: int | None = None) -> tuple[str, ...]:
    """NVRTC options for an h x w tile (after prepare_images' transpose).

    min_blocks (resident blocks per SM asked of the compiler): 4 by default for h <= 32, which caps the kernel at
    128 registers (16 warps per SM; no spills at 32x32 on sm_90), 1 for taller tiles.
    """
    if min_blocks is None:
        min_blocks = 4 if h <= 32 else 1
    return ("--use_fast_math", "--std=c++17", f"-DHH={h}", f"-DWW={w}", f"-DMIN_BLOCKS={int(min_blocks)}")


def map_scales(depth: int) -> np.ndarray:
    """sqrt(kappa_h), kappa_h = (9 pi)^((h-1) mod RENORM): the kernel's running scale before V step h = 1..depth-1."""
    return NINE_PI ** ((np.arange(depth - 1) % RENORM) / 2.0)


def final_scale(depth: int) -> float:
    """(9 pi)^((depth-2) mod RENORM + 1): the scale of the kernel's sums after the last V step."""
    return NINE_PI ** ((depth - 2) % RENORM + 1)


def prepare_images(x, l, depth: int):
    """(x32, l32, h, w, m): float32 images x/m (N,C,h,w), maps l(h) sqrt(kappa_h)/m (N,depth-1,h,w), C-contiguous.

    m = pow2_scale(x), one power of two per image: K(x, z) = m_x m_z K(x/m_x, z/m_z) exactly, and the float32
    kernel stays in range for any finite input (finish multiplies back). Images wider than 32 are transposed (K is
    invariant when both images are transposed) so that w <= 32.
    """
    x = np.asarray(x)
    l = np.asarray(l)
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {x.shape}")
    n, _, h, w = x.shape
    if l.ndim != 4 or l.shape[0] != n or l.shape[2:] != (h, w) or l.shape[1] < depth - 1:
        raise ValueError(f"l must be (N, depth-1, H, W) = ({n}, {depth - 1}, {h}, {w}), got {l.shape}")
    m = pow2_scale(x)
    l32 = np.empty((n, depth - 1, h, w), dtype=np.float32)
    np.multiply(l[:, : depth - 1], map_scales(depth)[None, :, None, None] / m[:, None, None, None], out=l32,
                casting="same_kind")
    x32 = normalise(x, m, np.float32)
    if w > MAX_W:
        x32, l32, h, w = x32.swapaxes(2, 3), l32.swapaxes(2, 3), w, h
    if w > MAX_W or h > MAX_H:
        raise ValueError(f"cupy backend supports min(H, W) <= {MAX_W} and max(H, W) <= {MAX_H}, got {x.shape[2:]}")
    return np.ascontiguousarray(x32), np.ascontiguousarray(l32), h, w, m


def double_rows(xp, a):
    """a with its rows stored twice, (N, K, 2h, w): the kernel reads the cyclic row shift of x as a plain offset."""
    return xp.ascontiguousarray(xp.concatenate([a, a], axis=2))


def plan_items(npairs: int, h: int, w: int, gap: bool) -> tuple[int, int]:
    """(ntiles, nitems): tiles per pair (h*w for gap, 1 for vanilla: the D = 0 slab) and npairs * ntiles."""
    ntiles = h * w if gap else 1
    return ntiles, npairs * ntiles


def grid_size(nitems: int, w: int) -> int:
    """Blocks of BLOCK_THREADS threads for nitems items, 32 // w items per warp."""
    warps = -(-nitems // (32 // w))
    return -(-warps // (BLOCK_THREADS // 32))


def pair_lists(rows, cols, upper: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(p, q, ii, jj): image indices of each pair and its place (ii, jj) in the block; upper: i <= j only."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    if upper:
        if rows.shape != cols.shape or np.any(rows != cols):
            raise ValueError("upper=True needs rows == cols")
        ii, jj = np.triu_indices(len(rows))
    else:
        ii, jj = (a.ravel() for a in np.indices((len(rows), len(cols))))
    return rows[ii].astype(np.int32), cols[jj].astype(np.int32), ii, jj


def finish(sums: np.ndarray, h: int, w: int, depth: int, gap: bool, scale) -> np.ndarray:
    """K = m_p m_q (sum of T over all slabs / (HW)^2 (gap), or the D = 0 slab's sum (vanilla trace)) / final_scale
    (docs/math.md eq. (6)).

    scale: m_p m_q per pair (prepare_images' powers of two)."""
    sums = np.asarray(sums, dtype=np.float64) / final_scale(depth)
    return (sums / float(h * w) ** 2 if gap else sums) * np.asarray(scale, dtype=np.float64)


def assemble(vals: np.ndarray, ii, jj, shape, upper: bool) -> np.ndarray:
    """Scatter pair values into a (len(rows), len(cols)) float64 block, mirrored when upper."""
    k = np.empty(shape, dtype=np.float64)
    k[ii, jj] = vals
    if upper:
        k[jj, ii] = vals
    return k


_MODULES: dict = {}


def _kernel(cp, h: int, w: int, min_blocks: int | None = None):
    """The cntk_fused RawKernel for an h x w tile on the current device (cached; NVRTC compiles it on first use)."""
    key = (h, w, min_blocks, cp.cuda.Device().id)
    if key not in _MODULES:
        _MODULES[key] = cp.RawKernel(kernel_source(), KERNEL_NAME, options=compile_options(h, w, min_blocks))
    return _MODULES[key]


class CupyCNTK:
    """Images and scale maps resident on one GPU; block(rows, cols) computes K[rows, cols] with the fused kernel."""

    def __init__(self, x, l, *, depth: int, gap: bool = True, fix: bool = False, device=None,
                 min_blocks: int | None = None):
        """x: (N, C, H, W) images, l: (N, depth-1, H, W) scale maps l(h) = sqrt(e(h)) of scales.scale_maps."""
        cp = _require_cupy()
        self._cp = cp
        x32, l32, self.h, self.w, self.m = prepare_images(x, l, depth)
        self.n, self.c = x32.shape[0], x32.shape[1]
        self.depth, self.gap, self.fix = int(depth), bool(gap), bool(fix)
        self.device = cp.cuda.Device(device if device is not None else cp.cuda.Device().id)
        with self.device:
            self._x2 = double_rows(cp, cp.asarray(x32))
            self._l2 = double_rows(cp, cp.asarray(l32))
            self._fn = _kernel(cp, self.h, self.w, min_blocks)

    def pair_sums(self, p, q):
        """Device float64 per-pair sums of T times final_scale (over all slabs for gap, the D = 0 slab for vanilla)."""
        cp = self._cp
        ntiles, _ = plan_items(1, self.h, self.w, self.gap)
        chunk = max(1, MAX_ITEMS_PER_LAUNCH // ntiles)
        p, q = np.asarray(p, dtype=np.int64).ravel(), np.asarray(q, dtype=np.int64).ravel()
        if p.shape != q.shape:
            raise ValueError("p and q must have the same length")
        if len(p) and (min(p.min(), q.min()) < 0 or max(p.max(), q.max()) >= self.n):
            raise IndexError(f"image index out of range 0..{self.n - 1}")
        with self.device:
            p_d = cp.asarray(p.astype(np.int32))
            q_d = cp.asarray(q.astype(np.int32))
            sums = cp.empty(len(p_d), dtype=cp.float64)
            for s in range(0, len(p_d), chunk):
                pp, qq = p_d[s:s + chunk], q_d[s:s + chunk]
                part = cp.empty(plan_items(len(pp), self.h, self.w, self.gap)[1], dtype=cp.float64)
                self.launch(pp, qq, part)
                sums[s:s + len(pp)] = part.reshape(len(pp), ntiles).sum(axis=1)
        return sums

    def launch(self, p_d, q_d, part) -> None:
        """One kernel launch: part[k] = sum of tile k's T for the pairs (p_d, q_d) (device int32 arrays)."""
        ntiles, nitems = plan_items(len(p_d), self.h, self.w, self.gap)
        if part.size != nitems or part.dtype != self._cp.float64:
            raise ValueError(f"part must be float64 of size {nitems}")
        self._fn((grid_size(nitems, self.w),), (BLOCK_THREADS,),
                 (self._x2, self._l2, p_d, q_d, np.int64(nitems), np.int32(ntiles), np.int32(self.c),
                  np.int32(self.depth), np.int32(self.fix), part))

    def pairs(self, p, q) -> np.ndarray:
        """K(x_p[k], x_q[k]) for each listed pair, float64 on the host."""
        if len(p) == 0:
            return np.empty(0, dtype=np.float64)
        scale = self.m[np.asarray(p, dtype=np.int64)] * self.m[np.asarray(q, dtype=np.int64)]
        return finish(self.pair_sums(p, q).get(), self.h, self.w, self.depth, self.gap, scale)

    def block(self, rows, cols, *, upper: bool = False) -> np.ndarray:
        """K[i, j] = K(x_rows[i], x_cols[j]) float64; upper=True (rows == cols) computes i <= j and mirrors it."""
        p, q, ii, jj = pair_lists(rows, cols, upper)
        vals = self.pairs(p, q)
        return assemble(vals, ii, jj, (len(np.ravel(rows)), len(np.ravel(cols))), upper)


def cntk_block_cupy(x1, l1, x2=None, l2=None, *, depth: int, gap: bool = True, fix: bool = False,
                    upper: bool = False) -> np.ndarray:
    """K[i, j] = K(x1_i, x2_j) as float64 on the GPU; upper=True (x2 is x1 or None) computes i <= j only."""
    if upper or x2 is None:
        n = len(x1)
        return CupyCNTK(x1, l1, depth=depth, gap=gap, fix=fix).block(np.arange(n), np.arange(n), upper=True)
    n1, n2 = len(x1), len(x2)
    eng = CupyCNTK(np.concatenate([np.asarray(x1), np.asarray(x2)]), np.concatenate([np.asarray(l1), np.asarray(l2)]),
                   depth=depth, gap=gap, fix=fix)
    return eng.block(np.arange(n1), np.arange(n1, n1 + n2))
