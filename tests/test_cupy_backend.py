"""The cupy backend: its CPU-side behaviour, the CUDA source of the fused kernel run by a CPU emulation, and the
same source compiled by NVIDIA's compilers for Hopper.

No GPU is needed. The emulation (tests/support/cuda_emu) compiles mnkpipe/kernels/cntk_fused.cu unchanged with g++
inside a harness that provides the CUDA surface the kernel uses; the host-side planning of cntk_cupy (transpose,
doubled rows, pair lists, per-pair reduction) is shared with the real backend, so only the cupy calls themselves are
not exercised here. NVRTC and ptxas come from the nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 wheels of the
`test` extra; the emulated tests skip only where g++ is missing, the real-GPU tests where no CUDA device is visible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
from support.cuda_emu import ASM_SWITCH_HERE, Emulator, build_dir, needs_gxx
from support.numerics import golden_case, rel_err

from mnkpipe.kernels import cntk_cupy as cc
from mnkpipe.kernels.scales import scale_maps

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="session")
def emu(request, tmp_path_factory) -> Emulator:
    """The CPU emulator of cntk_fused, its libraries built in pytest's cache folder (portable context switch)."""
    return Emulator(build_dir(request.config, tmp_path_factory))


def _reference(x1, x2, *, depth, gap, fix):
    """The float64 oracle of the package."""
    from mnkpipe.kernels.cntk_reference import cntk_reference

    return cntk_reference(x1, x2, depth=depth, gap=gap, fix=fix)


def _images(rng, n, c, h, w, zero_patch=False):
    """Random images; zero_patch blanks a corner block wide enough that some scale maps are exactly 0."""
    x = rng.standard_normal((n, c, h, w))
    if zero_patch:
        x[0, :, : h // 2 + 2, : w // 2 + 2] = 0.0
        x[-1] = 0.0  # an all-zero image: K = 0 against everything
    return x


# --------------------------------------------------------------------------------------------------------------
# CPU-side behaviour of the backend
# --------------------------------------------------------------------------------------------------------------

def test_import_needs_no_cupy_and_errors_are_clear():
    """With `import cupy` made to fail: the module imports, available() is False, CupyCNTK raises RuntimeError."""
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cupy" or name.startswith("cupy."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from mnkpipe.kernels import cntk_cupy as cc
        assert "cupy" not in sys.modules
        assert cc.available() is False
        x = np.zeros((2, 1, 4, 4), np.float32); l = np.zeros((2, 1, 4, 4), np.float32)
        for call in (lambda: cc.CupyCNTK(x, l, depth=2), lambda: cc.cntk_block_cupy(x, l, depth=2, upper=True)):
            try:
                call()
            except RuntimeError as e:
                assert "cupy backend needs cupy" in str(e) and "mnkpipe[gpu]" in str(e), e
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.skipif(cc.available(), reason="a CUDA device is visible here")
def test_unavailable_here_raises_runtime_error():
    """On a machine without cupy or without a GPU, available() is False and asking for the backend says why."""
    assert cc.available() is False
    x = np.ones((2, 1, 4, 4), np.float32)
    with pytest.raises(RuntimeError, match="cupy backend needs"):
        cc.CupyCNTK(x, scale_maps(x, 3), depth=3)


def test_host_planning():
    """Doubled rows, the transpose of wide images, pair lists, and the argument checks."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 40))
    l = scale_maps(x, 4)
    x32, l32, h, w, m = cc.prepare_images(x, l, 4)
    assert ((h, w) == (40, 5) and np.all(m == 2.0 ** np.floor(np.log2(np.abs(x).max(axis=(1, 2, 3)))))
            and x32.shape == (3, 2, 40, 5) and l32.shape == (3, 3, 40, 5))
    assert x32.dtype == l32.dtype == np.float32 and x32.flags.c_contiguous and l32.flags.c_contiguous
    np.testing.assert_allclose(x32 * m[:, None, None, None], x.swapaxes(2, 3), rtol=1e-6)
    np.testing.assert_allclose(l32 * m[:, None, None, None], l.swapaxes(2, 3) * cc.map_scales(4)[None, :, None, None],
                               rtol=1e-6)
    x2 = cc.double_rows(np, x32)
    assert x2.shape == (3, 2, 80, 5) and np.array_equal(x2[:, :, :40], x2[:, :, 40:])
    _, l32_more, _, _, _ = cc.prepare_images(x, scale_maps(x, 6), 4)  # extra layers are ignored
    np.testing.assert_array_equal(l32_more, l32)
    p, q, _, _ = cc.pair_lists([4, 7, 9], [4, 7, 9], upper=True)
    assert list(zip(p, q)) == [(4, 4), (4, 7), (4, 9), (7, 7), (7, 9), (9, 9)]
    p, q, _, _ = cc.pair_lists([1, 2], [5, 6, 7], upper=False)
    assert len(p) == 6 and set(zip(p, q)) == {(a, b) for a in (1, 2) for b in (5, 6, 7)}
    assert cc.plan_items(10, 32, 32, True) == (1024, 10240) and cc.plan_items(10, 32, 32, False) == (1, 10)
    assert cc.grid_size(10240, 32) == 2560 and cc.grid_size(5, 8) == 1
    with pytest.raises(ValueError):
        cc.pair_lists([1, 2], [1, 3], upper=True)
    with pytest.raises(ValueError):
        cc.prepare_images(x, l, 1)
    with pytest.raises(ValueError):
        cc.prepare_images(x, l[:, :2], 5)
    with pytest.raises(ValueError):
        cc.prepare_images(np.zeros((1, 1, 40, 40)), np.zeros((1, 1, 40, 40)), 2)


def test_kernel_constants_match_numba_backend():
    """The kernel's rho snap is the numba backend's (both backends give the same function)."""
    import re

    from mnkpipe.kernels import cntk_cpu

    src = cc.kernel_source()
    def define(name):
        return float(re.search(rf"#define {name} ([0-9.e+-]+)f?\s", src).group(1))

    assert define("RHO_SNAP_F") == cntk_cpu.RHO_SNAP32
    assert define("BLOCK_THREADS") == cc.BLOCK_THREADS and define("RENORM") == cc.RENORM
    assert np.float32(define("INV_9PI_POW_RENORM")) == np.float32(cc.NINE_PI ** -cc.RENORM)


# --------------------------------------------------------------------------------------------------------------
# The CUDA source, emulated on the CPU, against the float64 oracle
# --------------------------------------------------------------------------------------------------------------

CASES = [  # (H, W, C, depth, gap, fix, zero_patch)
    (6, 7, 1, 2, True, False, False),
    (6, 7, 1, 3, True, True, False),
    (6, 7, 3, 5, True, False, False),
    (6, 7, 1, 5, False, False, False),
    (6, 7, 3, 3, False, True, False),
    (8, 8, 1, 3, True, False, True),
    (8, 8, 3, 5, True, True, True),
    (8, 8, 1, 2, False, False, True),
    (8, 8, 3, 5, False, True, False),
    (9, 4, 2, 4, True, False, False),   # tall: 8 tiles per warp
    (3, 32, 1, 3, True, False, False),  # one tile per warp, all 32 lanes
    (5, 40, 1, 2, True, False, False),  # wider than 32: transposed to 40 x 5
    (5, 17, 2, 3, False, False, False),  # 15 idle lanes
    (5, 6, 1, 10, True, True, True),    # the last V step right after a renormalisation of the running scale
    (4, 5, 2, 19, False, False, False),  # two renormalisations
]


@needs_gxx
@pytest.mark.parametrize("h,w,c,depth,gap,fix,zero", CASES, ids=lambda v: str(v))
def test_emulated_kernel_matches_reference(emu, h, w, c, depth, gap, fix, zero):
    """Symmetric Gram (upper triangle, identical images on the diagonal) and a rectangular block, rel err <= 1e-4."""
    rng = np.random.default_rng(hash((h, w, c, depth, gap, fix, zero)) % 2**32)
    x = _images(rng, 4, c, h, w, zero_patch=zero)
    l = scale_maps(x, depth)
    k = emu.block(x, l, np.arange(4), np.arange(4), depth=depth, gap=gap, fix=fix, upper=True)
    ref = _reference(x, None, depth=depth, gap=gap, fix=fix)
    assert np.array_equal(k, k.T)
    assert rel_err(k, ref) <= TOL, (rel_err(k, ref), k, ref)
    kb = emu.block(x, l, [2, 0], [1, 3, 0], depth=depth, gap=gap, fix=fix)
    assert rel_err(kb, ref[np.ix_([2, 0], [1, 3, 0])]) <= TOL
    if zero:
        assert np.all(k[-1] == 0.0)


@needs_gxx
def test_emulated_kernel_is_homogeneous_and_psd(emu):
    """K(a x, a z) = a^2 K(x, z); the Gram is positive semi-definite."""
    rng = np.random.default_rng(7)
    x = _images(rng, 5, 2, 7, 6)
    k1 = emu.block(x, scale_maps(x, 4), range(5), range(5), depth=4, upper=True)
    k3 = emu.block(3 * x, scale_maps(3 * x, 4), range(5), range(5), depth=4, upper=True)
    np.testing.assert_allclose(k3, 9 * k1, rtol=1e-5)
    assert np.linalg.eigvalsh(k1).min() > -1e-6 * np.abs(k1).max()


@needs_gxx
@pytest.mark.parametrize("a,b", [(1e-15, 1e-15), (1e-30, 1e-30), (5e18, 5e18), (1e150, 1e150), (1e-30, 5e18),
                                 (1e-200, 1e200)], ids=lambda v: f"{v:g}")
def test_emulated_kernel_homogeneous_for_any_finite_magnitude(emu, a, b):
    """K(a x, b z) = a b K(x, z) for any finite a, b > 0, the zero patch and zero image included."""
    rng = np.random.default_rng(8)
    x = _images(rng, 4, 2, 6, 5, zero_patch=True)
    s = np.array([a, a, b, b])[:, None, None, None]
    for gap, fix in [(True, False), (False, True)]:
        k = emu.block(x, scale_maps(x, 5), [0, 1], [2, 3], depth=5, gap=gap, fix=fix)
        kab = emu.block(s * x, scale_maps(s * x, 5), [0, 1], [2, 3], depth=5, gap=gap, fix=fix)
        assert np.isfinite(kab).all()
        assert rel_err(kab / (a * b), k) <= 1e-6, (gap, fix)


@needs_gxx
@pytest.mark.skipif(not ASM_SWITCH_HERE, reason="the assembly fiber switch is x86-64 only")
def test_emulated_kernel_same_with_assembly_switch(emu):
    """The x86-64 assembly fiber switch gives the same numbers as the portable ucontext one (the default)."""
    rng = np.random.default_rng(3)
    x = _images(rng, 3, 1, 5, 6)
    l = scale_maps(x, 3)
    a = emu.block(x, l, range(3), range(3), depth=3, upper=True)
    b = emu.block(x, l, range(3), range(3), depth=3, upper=True, switch="asm")
    np.testing.assert_array_equal(a, b)


@needs_gxx
@pytest.mark.parametrize("key", ["random12_d2_gap", "random12_d5_vanilla", "random12_d8_gap", "random10c2_d4_gap"])
def test_emulated_kernel_matches_neural_tangents(emu, golden, key):
    """Against neural-tangents' values (tests/data/README.md): channels counted without 1/C, so c2 is 2x the stored."""
    x, ref, depth, gap = golden_case(golden, key)
    n = len(x)
    k = emu.block(x, scale_maps(x, depth), range(n), range(n), depth=depth, gap=gap, upper=True)
    assert rel_err(k, ref) <= TOL, rel_err(k, ref)


# --------------------------------------------------------------------------------------------------------------
# CupyCNTK itself on an emulated device: a stand-in `cupy` whose RawKernel runs the emulated CUDA source
# --------------------------------------------------------------------------------------------------------------

class _FakeArray(np.ndarray):
    """A numpy array that answers .get() like a cupy array."""

    def get(self):
        return np.asarray(self).copy()


def make_fake_cupy(emu: Emulator):
    """A module with the slice of cupy that CupyCNTK and bench/gpu_check.py use; kernels run under `emu`."""
    import time
    import types

    cp = types.ModuleType("cupy")
    cp.__version__ = "emulated"
    cp.float32, cp.float64, cp.int32 = np.float32, np.float64, np.int32
    cp.is_available = lambda: True
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(_FakeArray)
    cp.empty = lambda n, dtype=np.float64: np.empty(n, dtype=dtype).view(_FakeArray)
    cp.zeros = lambda n, dtype=np.float64: np.zeros(n, dtype=dtype).view(_FakeArray)
    cp.full = lambda n, v, dtype=np.float64: np.full(n, v, dtype=dtype).view(_FakeArray)
    cp.isfinite = np.isfinite
    cp.concatenate = lambda arrs, axis=0: np.concatenate(arrs, axis=axis).view(_FakeArray)
    cp.ascontiguousarray = lambda a: np.ascontiguousarray(a).view(_FakeArray)

    class Device:
        def __init__(self, i=None):
            self.id = 0 if i is None else int(i)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    class Event:
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    class RawKernel:
        def __init__(self, code, name, options=()):
            assert code == cc.kernel_source() and name == cc.KERNEL_NAME
            d = dict(o[2:].split("=") for o in options if o.startswith("-D"))
            self.lib = emu.library(int(d["HH"]), int(d["WW"]))
            self.attributes = {"num_regs": -1, "local_size_bytes": 0}

        def __call__(self, grid, block, args):
            x2, l2, p, q, nitems, ntiles, c, depth, fix, out = args
            for a, dt in ((x2, np.float32), (l2, np.float32), (p, np.int32), (q, np.int32), (out, np.float64)):
                assert isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous, (a.dtype, dt)
            for v, dt in ((nitems, np.int64), (ntiles, np.int32), (c, np.int32), (depth, np.int32), (fix, np.int32)):
                assert type(v) is dt, (type(v), dt)
            emu.launch(self.lib, grid[0], block[0], *args)

    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"emulated", "multiProcessorCount": 1, "clockRate": 0,
                                       "l2CacheSize": 0, "major": 9, "minor": 0},
        runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0)
    cp.cuda = types.SimpleNamespace(Device=Device, Event=Event, runtime=runtime,
                                    get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)
    cp.RawKernel = RawKernel
    return cp


@pytest.fixture
def fake_cupy(emu, monkeypatch):
    """`import cupy` gives the emulated stand-in for the duration of a test."""
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy(emu))
    monkeypatch.setattr(cc, "_MODULES", {})
    return sys.modules["cupy"]


@needs_gxx
def test_cupy_cntk_class_on_emulated_device(fake_cupy, monkeypatch):
    """CupyCNTK.block / pairs / launch and cntk_block_cupy: argument order and types, chunking, mirroring."""
    monkeypatch.setattr(cc, "MAX_ITEMS_PER_LAUNCH", 3 * 42)  # 3 pairs of 6x7 per launch: several chunks
    assert cc.available()
    rng = np.random.default_rng(11)
    x = _images(rng, 5, 2, 6, 7, zero_patch=True)
    depth = 4
    l = scale_maps(x, depth)
    ref = _reference(x, None, depth=depth, gap=True, fix=False)
    eng = cc.CupyCNTK(x, l, depth=depth)
    k = eng.block(np.arange(5), np.arange(5), upper=True)
    assert np.array_equal(k, k.T) and rel_err(k, ref) <= TOL
    kb = eng.block([4, 1], [0, 2, 3])
    assert rel_err(kb, ref[np.ix_([4, 1], [0, 2, 3])]) <= TOL
    part = fake_cupy.full(2 * 42, np.nan)
    eng.launch(fake_cupy.asarray(np.array([1, 2], np.int32)), fake_cupy.asarray(np.array([3, 3], np.int32)), part)
    assert np.isfinite(part).all()
    with pytest.raises(IndexError):
        eng.pairs([0, 5], [1, 1])
    k2 = cc.cntk_block_cupy(x[:2], l[:2], x[2:], l[2:], depth=depth)
    assert rel_err(k2, ref[:2, 2:]) <= TOL
    kv = cc.cntk_block_cupy(x, l, depth=depth, gap=False, fix=True, upper=True)
    assert rel_err(kv, _reference(x, None, depth=depth, gap=False, fix=True)) <= TOL


# --------------------------------------------------------------------------------------------------------------
# NVIDIA's compilers on the exact source: NVRTC to PTX, ptxas to Hopper machine code (wheels; no GPU needed)
# --------------------------------------------------------------------------------------------------------------

HOPPER = "sm_90"
nvidia_linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                  reason="the test extra installs NVIDIA's compiler wheels on Linux only")


def config_sizes() -> set[tuple[int, int]]:
    """(h, w) of the images each configs/*.toml feeds the kernel: pad x pad, or image_size x image_size unpadded."""
    sizes = set()
    for path in sorted((REPO / "configs").glob("*.toml")):
        data = tomllib.loads(path.read_text()).get("data", {})
        side = data.get("pad") or data.get("image_size")
        if side:
            sizes.add((int(side), int(side)))
    return sizes


# The configs' sizes, unpadded Omniglot (28), a small tile, a wide image run transposed (40 x 5), and the largest
# tile the backend accepts (MAX_H x MAX_W).
SIZES = sorted(config_sizes() | {(28, 28), (12, 12), (40, 5), (cc.MAX_H, cc.MAX_W)})


def _wheel_dir(module: str) -> Path | None:
    """The folder of an nvidia.* wheel package, or None when it is not installed."""
    try:
        return Path(next(iter(importlib.import_module(module).__path__)))
    except ImportError:
        return None


def _nvrtc() -> ctypes.CDLL:
    """libnvrtc from $MNKPIPE_NVRTC, else the nvidia-cuda-nvrtc-cu12 wheel, else the loader path; fails if none."""
    wheel = _wheel_dir("nvidia.cuda_nvrtc")
    cands = [os.environ.get("MNKPIPE_NVRTC", "")]
    cands += [str(p) for p in sorted(wheel.joinpath("lib").glob("libnvrtc.so*"))] if wheel else []
    cands.append(ctypes.util.find_library("nvrtc") or "")
    for c in cands:
        if c and ".alt." not in Path(c).name:  # libnvrtc.alt: the variant with a static libstdc++, same compiler
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    pytest.fail("no NVRTC library: install the test extra (nvidia-cuda-nvrtc-cu12) or set MNKPIPE_NVRTC")


def _ptxas() -> str:
    """ptxas of the nvidia-cuda-nvcc-cu12 wheel, else the one on PATH; fails if none."""
    wheel = _wheel_dir("nvidia.cuda_nvcc")
    exe = wheel / "bin" / "ptxas" if wheel else None
    found = str(exe) if exe and exe.is_file() else shutil.which("ptxas")
    if found is None:
        pytest.fail("no ptxas: install the test extra (nvidia-cuda-nvcc-cu12)")
    return found


def nvrtc_compile(h: int, w: int, arch: str, extra: tuple[str, ...] = (), min_blocks: int | None = None
                  ) -> tuple[bytes, str]:
    """(PTX, log) of cntk_fused.cu for an h x w tile, compiled by NVRTC with the options cupy.RawKernel passes.

    Those are cc.compile_options(h, w, min_blocks) plus the -ftz=true that cupy appends (--use_fast_math implies it
    already); arch compute_90 gives PTX, sm_90 also runs NVRTC's built-in ptxas. Fails with NVRTC's log on an error."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cc.kernel_source().encode(), b"cntk_fused.cu", 0, None,
                                  None) == 0
    try:
        opts = [o.encode()
                for o in (*cc.compile_options(h, w, min_blocks), "-ftz=true", f"--gpu-architecture={arch}", *extra)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed for HH={h} WW={w}:\n{log.value.decode(errors='replace')}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas_log(ptx: bytes, folder: Path, arch: str = HOPPER, extra: tuple[str, ...] = ()) -> str:
    """ptxas -v's report of assembling `ptx` for `arch` (the PTX and cubin are written to `folder`)."""
    src = folder / "cntk_fused.ptx"
    src.write_bytes(ptx)
    res = subprocess.run([_ptxas(), f"-arch={arch}", "-v", *extra, str(src), "-o", str(folder / "cntk_fused.cubin")],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 0, f"ptxas failed:\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def resource_report(log: str, kernel: str = cc.KERNEL_NAME) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack_frame and smem (bytes) of `kernel` in a ptxas -v log."""
    part = log[log.index(f"Function properties for {kernel}"):]
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", part)
    used = re.search(r"Used (\d+) registers[^\n]*", part)
    smem = re.search(r"(\d+) bytes smem", used.group(0))  # printed only when the kernel uses shared memory
    return {"registers": int(used.group(1)), "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)),
            "stack_frame": int(frame.group(1)), "smem": int(smem.group(1)) if smem else 0}


def check_no_spill(report: dict[str, int], what: str) -> None:
    """AssertionError naming `what` when ptxas spilled registers to local memory (any byte stored or loaded)."""
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what} spills: {report}"


@nvidia_linux
@pytest.mark.parametrize("h,w", SIZES, ids=lambda v: str(v))
def test_hopper_build_does_not_spill(h, w, tmp_path):
    """NVRTC compiles the exact source to PTX; ptxas for sm_90 reports no spill, no stack frame, no shared memory,
    and at most the registers __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS) leaves per thread."""
    ptx, _ = nvrtc_compile(h, w, "compute_90")
    report = resource_report(ptxas_log(ptx, tmp_path))
    check_no_spill(report, f"cntk_fused at HH={h} WW={w} for {HOPPER}")
    min_blocks = int(dict(o[2:].split("=") for o in cc.compile_options(h, w) if o.startswith("-D"))["MIN_BLOCKS"])
    assert report["stack_frame"] == 0 and report["smem"] == 0, report
    assert report["registers"] <= min(255, 65536 // (cc.BLOCK_THREADS * min_blocks)), report


@nvidia_linux
def test_nvrtc_cubin_reports_as_ptxas(tmp_path):
    """cupy compiles straight to an sm_90 cubin (NVRTC's built-in ptxas): the same resources as the wheel's ptxas."""
    ptx, _ = nvrtc_compile(32, 32, "compute_90")
    _, log = nvrtc_compile(32, 32, HOPPER, ("--ptxas-options=-v",))
    assert resource_report(log) == resource_report(ptxas_log(ptx, tmp_path))


@nvidia_linux
def test_spill_check_catches_a_spill(tmp_path):
    """Asked for 16 resident blocks per SM (32 registers a thread), ptxas spills at 32x32: check_no_spill fails."""
    ptx, _ = nvrtc_compile(32, 32, "compute_90", min_blocks=16)
    report = resource_report(ptxas_log(ptx, tmp_path))
    assert report["spill_stores"] > 0 and report["registers"] <= 32, report
    with pytest.raises(AssertionError, match="spills"):
        check_no_spill(report, "capped build")


# --------------------------------------------------------------------------------------------------------------
# On a machine with a GPU (skipped here): the real backend against the oracle
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not cc.available(), reason="needs cupy and a CUDA device")
@pytest.mark.parametrize("gap,fix", [(True, False), (False, True)])
def test_real_gpu_matches_reference(gap, fix):
    """CupyCNTK on the device vs the float64 oracle, a zero patch and an all-zero image included."""
    rng = np.random.default_rng()
    x = _images(rng, 5, 2, 9, 11, zero_patch=True)
    k = cc.cntk_block_cupy(x, scale_maps(x, 6), depth=6, gap=gap, fix=fix, upper=True)
    assert rel_err(k, _reference(x, None, depth=6, gap=gap, fix=fix)) <= TOL
