"""The exact CUDA source of the fused CNTK kernel run on the CPU: g++ compiles harness.cpp around cntk_fused.cu.

harness.cpp provides the CUDA surface the kernel uses (threads as fibers, warp shuffles as lockstep exchange points;
see its header). Emulator builds one shared library per tile size and context switch into a private folder, loads it
with ctypes and runs the kernel with the host planning of mnkpipe.kernels.cntk_cupy, so only the cupy calls
themselves are not exercised. Without g++ the tests marked needs_gxx are skipped.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mnkpipe.kernels import cntk_cupy as cc

HARNESS = Path(__file__).with_name("harness.cpp")
CXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(CXX is None, reason="g++ not found: the CUDA-source emulation cannot be built")
# "ucontext": POSIX swapcontext, any architecture glibc supports; "asm": a register-only switch, x86-64 only.
SWITCHES = {"ucontext": [], "asm": ["-DEMU_ASM_SWITCH"]}
ASM_SWITCH_HERE = platform.machine() in ("x86_64", "AMD64")
_ARGTYPES = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int] + [ctypes.c_void_p] * 4 + [
    ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p,
    ctypes.c_int]
_LOADED: dict[Path, ctypes.CDLL] = {}


def build_dir(config, tmp_path_factory) -> Path:
    """The folder for the built libraries: pytest's cache in the checkout (kept between runs), else a private
    per-session folder of pytest's per-user temporary root; never a shared, predictable system path."""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        return Path(cache.mkdir("cuda_emu"))
    return tmp_path_factory.mktemp("cuda_emu")


class Emulator:
    """Builds (once per content) and runs the emulated cntk_fused; libraries live in `folder`."""

    def __init__(self, folder: Path, switch: str = "ucontext"):
        if switch not in SWITCHES:
            raise ValueError(f"switch must be one of {sorted(SWITCHES)}, got {switch!r}")
        self.folder = Path(folder)
        self.switch = switch

    def library(self, h: int, w: int, switch: str | None = None) -> ctypes.CDLL:
        """The shared library of harness.cpp + cntk_fused.cu for an h x w tile, with NVRTC's -D macros."""
        switch = switch or self.switch
        defines = [o for o in cc.compile_options(h, w) if o.startswith("-D")]  # the same macros NVRTC gets
        flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas",
                 f'-DKERNEL_FILE="{cc.KERNEL_PATH}"', *defines, *SWITCHES[switch]]
        text = HARNESS.read_text() + cc.kernel_source() + " ".join(flags)
        lib = self.folder / f"emu_{hashlib.sha256(text.encode()).hexdigest()[:16]}.so"
        if lib not in _LOADED:
            if not lib.exists():
                tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.tmp.so")  # concurrent builders: last rename wins
                res = subprocess.run([CXX, *flags, str(HARNESS), "-o", str(tmp)], check=False,
                                     capture_output=True, text=True)
                assert res.returncode == 0, f"g++ failed on cntk_fused.cu:\n{res.stderr[-4000:]}"
                tmp.replace(lib)
            dll = ctypes.CDLL(str(lib))
            dll.emu_cntk_fused.restype = ctypes.c_int
            dll.emu_cntk_fused.argtypes = _ARGTYPES
            _LOADED[lib] = dll
        return _LOADED[lib]

    def launch(self, lib: ctypes.CDLL, grid: int, block: int, x2, l2, p, q, nitems: int, ntiles: int, c: int,
               depth: int, fix: int, out) -> None:
        """One launch of cntk_fused(x2, l2, p, q, nitems, ntiles, c, depth, fix, out) on `grid` blocks (numpy
        arrays, written in place); AssertionError with the emulator's message when it detects a fault."""
        err = ctypes.create_string_buffer(256)
        rc = lib.emu_cntk_fused(int(grid), int(block), os.cpu_count() or 1,
                                *(a.ctypes.data for a in (x2, l2, p, q)), int(nitems), int(ntiles), int(c),
                                int(depth), int(fix), out.ctypes.data, err, len(err))
        assert rc == 0, err.value.decode()

    def block(self, x, l, rows, cols, *, depth, gap=True, fix=False, upper=False, switch=None) -> np.ndarray:
        """K[rows, cols] computed by the CUDA source of cntk_fused (same host code as CupyCNTK).

        The inputs sit between NaN guards (a stray read poisons the result) and the output starts as NaN (an
        unwritten item shows)."""
        x32, l32, h, w, m = cc.prepare_images(x, l, depth)
        x2, l2 = cc.double_rows(np, x32), cc.double_rows(np, l32)
        p, q, ii, jj = cc.pair_lists(rows, cols, upper)
        ntiles, nitems = cc.plan_items(len(p), h, w, gap)
        lib = self.library(h, w, switch)
        bufs = [_guarded(x2, np.nan), _guarded(l2, np.nan), _guarded(p, -1), _guarded(q, -1),
                _guarded(np.full(nitems, np.nan), np.nan)]
        out_buf, out = bufs[-1]
        self.launch(lib, cc.grid_size(nitems, w), cc.BLOCK_THREADS, *(b[1] for b in bufs[:4]), nitems, ntiles,
                    x2.shape[1], depth, int(fix), out)
        g = len(out_buf) - nitems
        assert np.isnan(out_buf[: g // 2]).all() and np.isnan(out_buf[g // 2 + nitems:]).all(), "write outside out"
        assert np.isfinite(out).all(), f"{np.isnan(out).sum()} of {nitems} items unwritten or NaN"
        vals = cc.finish(out.reshape(len(p), ntiles).sum(axis=1), h, w, depth, gap, m[p] * m[q])
        return cc.assemble(vals, ii, jj, (len(np.ravel(rows)), len(np.ravel(cols))), upper)


def _guarded(a: np.ndarray, fill) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, view): a copy of a inside a buffer with `fill` guard zones of 4 KiB on both sides."""
    g = 4096 // a.itemsize
    buf = np.full(a.size + 2 * g, fill, dtype=a.dtype)
    view = buf[g:g + a.size].reshape(a.shape)
    view[...] = a
    return buf, view
