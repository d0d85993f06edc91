"""Where the CPU kernel's time goes on this machine: the vector pipes alone, the V row loop alone in L1, and variants
of the kernel side by side, each changing one thing (some give wrong numbers: only their time counts).

    .venv/bin/python bench/cntk_cpu_ceiling.py [--depths 10,20] [--rounds 5] [--rows 4] [--threads 1]

Loops run on 16-lane float32 entries (one 512-bit vector, as the kernel's rows at 28x28) in buffers that stay in
L1; they print cycles per entry at the clock of bench/cntk_cpu.clock_ghz. The kernel variants print ns per entry
per layer (x threads) and their speed over the kernel as it is (> 1: the variant is faster), medians of --rounds
calls made in turn. Variants replace text of mnkpipe/kernels/cntk_cpu.py; a replacement that no longer matches
stops the run, naming the variant.
"""

import argparse
import inspect
import math
import statistics
import time

import numba as nb
import numpy as np

from cntk_cpu import clock_ghz, omniglot_images
from mnkpipe.kernels import cntk_cpu, scale_maps

_JIT = {**cntk_cpu._JIT, "cache": False}  # the kernel's compile flags; variants have no source file to cache
LANES = 16  # the loops' entries: one 512-bit vector of float32
ENTRIES = 28  # entries per row: one tile row at 28x28
# the kernel's acos polynomial, verbatim: the text the variants replace (tests/test_bench.py checks it is there)
_HORNER = """    p = c7
    p = p * a + c6
    p = p * a + c5
    p = p * a + c4
    p = p * a + c3
    p = p * a + c2
    p = p * a + c1
    p = p * a + c0
"""
_ESTRIN = """    a2 = a * a
    p01 = a * c1 + c0
    p23 = a * c3 + c2
    p45 = a * c5 + c4
    p67 = a * c7 + c6
    p = (a2 * a2) * (a2 * p67 + p45) + (a2 * p23 + p01)
"""
# V_CONSTS as a global: numba freezes it, so LLVM sees literals (as before V_CONSTS) and reloads them every iteration
_LITERALS = [("    one, snap, c7, c6, c5, c4, c3, c2, c1, c0, pi, inv_9pi = vc\n",
              "    one, snap, c7, c6, c5, c4, c3, c2, c1, c0, pi, inv_9pi = V_CONSTS\n")]
_NO_SQRT = [("np.float32(math.sqrt(one - a))", "(one - a)"), ("np.float32(math.sqrt(one + a))", "(one + a)")]
# V's variants (the V loop alone, and in the kernel)
V_VARIANTS = {
    "V as it is": [],
    "constants as literals (reloaded every iteration; the same bits)": _LITERALS,
    "no square roots (a multiply each; wrong numbers)": _NO_SQRT,
    "no acos polynomial (one FMA; wrong numbers)": [(_HORNER, "    p = a * c1 + c0\n")],
    "acos polynomial by Estrin's scheme (other bits)": [(_HORNER, _ESTRIN)],
}
# the kernel's variants: replacements in the module's source
_RING_L1 = [("o = rb + (lev * 3 + r % 3) * 2 * stride", "o = rb + (r % 3) * 2 * stride"),
            ("pb = rb + (lev - 1) * 6 * stride + lanes", "pb = rb + lanes")]
_PMAP_L1 = [("u(m + px), u(m + qz)", "u(lanes), u(m + qz)")]
_QMAP_L1 = [("u(m + qz), u(nw)", "u(lanes), u(nw)")]
KERNEL_VARIANTS = {
    "acos polynomial by Estrin's scheme (other bits)": [(_HORNER, _ESTRIN)],
    "no square roots (wrong numbers)": _NO_SQRT,
    "rho = S / (9 pi a_x a_z): the r maps not read (other bits)": [
        ("    rho = s * (rx * rz)\n", "    rho = s / max((ax * az) * np.float32(9 * math.pi), np.float32(1e-30))\n")],
    "ring rows and maps of all levels in one level's rows: in L1 (wrong numbers)": _RING_L1 + _PMAP_L1 + _QMAP_L1,
    "ring rows of all levels in one level's rows (wrong numbers)": _RING_L1,
    "maps: one row of each, so in L1 (wrong numbers)": _PMAP_L1 + _QMAP_L1,
    "p-side maps (a_x, r_x): one row, in L1 (wrong numbers)": _PMAP_L1,
    "q-side maps (a_z, r_z): one row, in L1 (wrong numbers)": _QMAP_L1,
    "constants as literals, reloaded every iteration (the kernel before V_CONSTS)": _LITERALS,
}


def replaced(src: str, changes: list[tuple[str, str]], name: str) -> str:
    for old, new in changes:
        if old not in src:
            raise SystemExit(f"variant {name!r}: {old.strip()[:60]!r} is no longer in mnkpipe/kernels/cntk_cpu.py")
        src = src.replace(old, new)
    return src


def kernel_variant(changes: list[tuple[str, str]], name: str):
    """cntk_block_cpu of the kernel module with its text replaced (compiled here, not cached: no source file)."""
    src = replaced(inspect.getsource(cntk_cpu), changes + [('"cache": True', '"cache": False')], name)
    ns = {"__name__": "cntk_cpu_variant"}
    exec(compile(src, f"<{name}>", "exec"), ns)
    return ns["cntk_block_cpu"]


def v_variant(changes: list[tuple[str, str]], name: str):
    """_v with its text replaced, in the kernel module's namespace."""
    ns = dict(vars(cntk_cpu), _JIT=_JIT)
    exec(compile(replaced(inspect.getsource(cntk_cpu._v), changes, name), f"<{name}>", "exec"), ns)
    return ns["_v"]


def v_loop(v):
    """vs, vt = V(column sums of six ring rows, four map rows), entry by entry: the V loop of _v_row."""
    @nb.njit(**_JIT)
    def run(ring, maps, vs, vt, vc, reps):
        n = np.uint64(len(vs))
        o1, o2, o3, o4, o5 = n, 2 * n, 3 * n, 4 * n, 5 * n  # uint64 offsets of the rows after the first
        for _ in range(reps):
            for e in range(n):
                sv = (ring[e] + ring[o1 + e]) + ring[o2 + e]
                tv = (ring[o3 + e] + ring[o4 + e]) + ring[o5 + e]
                vs[e], vt[e] = v(sv, tv, maps[e], maps[o1 + e], maps[o2 + e], maps[o3 + e], vc)
    return run


def row_pass_loops(v):
    """The V row loop and the row passes of its output, apart (as the kernel runs them) and fused: the fused loop
    makes the row pass of the level below's row (ps, pt: W entries between zero entries) on the way, stores it (rs,
    rt) and uses it as the down row of the column sum. Rows of len(rs) floats; the numbers differ, only times count.
    Both take the same arguments (apart does not read ps, pt), so one call times either."""
    @nb.njit(**_JIT)
    def apart(ring, maps, ps, pt, vs, vt, rs, rt, vc, reps):
        n, lanes = np.uint64(len(rs)), np.uint64(LANES)
        o1, o2, o3, o4, o5 = n, 2 * n, 3 * n, 4 * n, 5 * n
        for _ in range(reps):
            for e in range(n):
                sv = (ring[e] + ring[o1 + e]) + ring[o2 + e]
                tv = (ring[o3 + e] + ring[o4 + e]) + ring[o5 + e]
                vs[lanes + e], vt[lanes + e] = v(sv, tv, maps[e], maps[o1 + e], maps[o2 + e], maps[o3 + e], vc)
            for e in range(n):
                rs[e] = (vs[lanes + e] + vs[e]) + vs[lanes + lanes + e]
            for e in range(n):
                rt[e] = (vt[lanes + e] + vt[e]) + vt[lanes + lanes + e]

    @nb.njit(**_JIT)
    def fused(ring, maps, ps, pt, vs, vt, rs, rt, vc, reps):
        n, lanes = np.uint64(len(rs)), np.uint64(LANES)
        o1, o2, o3, o4 = n, 2 * n, 3 * n, 4 * n
        for _ in range(reps):
            for e in range(n):
                d = (ps[lanes + e] + ps[e]) + ps[lanes + lanes + e]
                dt = (pt[lanes + e] + pt[e]) + pt[lanes + lanes + e]
                rs[e], rt[e] = d, dt
                sv = (ring[e] + ring[o1 + e]) + d
                tv = (ring[o3 + e] + ring[o4 + e]) + dt
                vs[lanes + e], vt[lanes + e] = v(sv, tv, maps[e], maps[o1 + e], maps[o2 + e], maps[o3 + e], vc)
    return apart, fused


_C = tuple(np.float32(0.5 + 0.01 * i) for i in range(8))


@nb.njit(**_JIT)
def fma_pipes(x, y, reps):
    """12 FMA and 3 multiplies per element, in four independent chains."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _C
    for _ in range(reps):
        for e in range(np.uint64(len(x))):
            a = x[e]
            p = ((a * c0 + c1) * a + c2) * a + c3
            q = ((a * c4 + c5) * a + c6) * a + c7
            r = ((a * c1 + c2) * a + c3) * a + c4
            s = ((a * c5 + c6) * a + c7) * a + c0
            y[e] = (p * q) * (r * s)


@nb.njit(**_JIT)
def add_pipes(x, y, reps):
    """15 adds per element, in four independent chains."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _C
    for _ in range(reps):
        for e in range(np.uint64(len(x))):
            a = x[e]
            y[e] = ((((a + c0) + c1) + c2) + (((a + c4) + c5) + c6)) + ((((a + c1) + c2) + c3) + (((a + c5) + c6) + c7))


@nb.njit(**_JIT)
def sqrt_unit(x, y, reps):
    for _ in range(reps):
        for e in range(np.uint64(len(x))):
            y[e] = math.sqrt(x[e])


def cycles_per_entry(f, args, ghz: float, rounds: int, reps: int = 20_000) -> float:
    """Median cycles per 16-lane entry of f(*args, reps) over rows of ENTRIES entries."""
    f(*args, 10)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        f(*args, reps)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / (reps * ENTRIES) * ghz * 1e9


def loops(ghz: float, rounds: int) -> None:
    n = ENTRIES * LANES
    rng = np.random.default_rng(0)
    ring, maps, vs, vt, x, y = (cntk_cpu._zeros64(k * n) for k in (6, 4, 1, 1, 1, 1))
    ring[:] = 0.3 * rng.random(6 * n)
    maps[:] = 0.5 + rng.random(4 * n)
    x[:] = rng.random(n)
    print(f"\nLoops alone, buffers in L1 (64-byte aligned), rows of {ENTRIES} entries; clock {ghz:.2f} GHz\n")
    print("| loop | cycles per 16-lane entry | vector ops per cycle |")
    print("|---|---|---|")
    for name, f, ops in [("12 FMA + 3 multiplies", fma_pipes, 15), ("15 adds", add_pipes, 15),
                         ("a square root", sqrt_unit, 1)]:
        c = cycles_per_entry(f, (x, y), ghz, rounds)
        print(f"| {name} | {c:.2f} | {ops / c:.2f} |", flush=True)
    for name, changes in V_VARIANTS.items():
        c = cycles_per_entry(v_loop(v_variant(changes, name)), (ring, maps, vs, vt, cntk_cpu.V_CONSTS), ghz, rounds)
        print(f"| V row loop: {name} | {c:.2f} | |", flush=True)
    ps, pt, vb, wb = (cntk_cpu._zeros64(n + 2 * LANES) for _ in range(4))
    ps[LANES:LANES + n], pt[LANES:LANES + n] = 0.1 * rng.random(n), 0.1 * rng.random(n)
    rs, rt = cntk_cpu._zeros64(n), cntk_cpu._zeros64(n)
    apart, fused = row_pass_loops(cntk_cpu._v)
    for name, f in [("V row loop, then the row passes of S and T (the kernel's order)", apart),
                    ("V row loop with the row passes of the level below fused in", fused)]:
        c = cycles_per_entry(f, (ring, maps, ps, pt, vb, wb, rs, rt, cntk_cpu.V_CONSTS), ghz, rounds)
        print(f"| {name} | {c:.2f} | |", flush=True)


def kernels(a) -> None:
    variants = [("the kernel as it is", cntk_cpu.cntk_block_cpu)]
    variants += [(name, kernel_variant(changes, name)) for name, changes in KERNEL_VARIANTS.items()]
    lanes = cntk_cpu.batch_lanes(28)
    n = 2 * lanes * nb.get_num_threads()
    x = omniglot_images(a.rows + n, 28)
    print(f"\nThe kernel and its variants, 28x28, {a.rows} x {n} pairs a call, {nb.get_num_threads()} threads; ns per "
          f"entry per layer (x threads), medians of {a.rounds} rounds\n")
    print("| variant | " + " | ".join(f"depth {d}" for d in a.depths) + " |")
    print("|---|" + "---|" * len(a.depths))
    cells = {name: [] for name, _ in variants}
    for d in a.depths:
        l = scale_maps(x, d)
        times = {name: [] for name, _ in variants}
        for _, f in variants:
            f(x[:1], l[:1], x[1:1 + lanes], l[1:1 + lanes], depth=d)  # compile outside the timing
        for _ in range(a.rounds):
            for name, f in variants:
                t = time.perf_counter()
                f(x[:a.rows], l[:a.rows], x[a.rows:], l[a.rows:], depth=d)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times[variants[0][0]])
        for name, ts in times.items():
            t = statistics.median(ts)
            ns = 1e9 * t * nb.get_num_threads() / (a.rows * n * 28 ** 4 * (d - 1))
            cells[name].append(f"{ns:.3f} ({base / t:.2f}x)")
    for name, row in cells.items():
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="10,20", type=lambda s: [int(d) for d in s.split(",")])
    ap.add_argument("--rounds", type=int, default=5, help="timed calls of each; the median counts")
    ap.add_argument("--rows", type=int, default=4, help="images on the row side of the kernel's blocks")
    ap.add_argument("--threads", type=int, default=1, help="numba threads of the kernel variants")
    ap.add_argument("--skip-loops", action="store_true")
    a = ap.parse_args()
    nb.set_num_threads(a.threads)
    if not a.skip_loops:
        loops(clock_ghz(), a.rounds)
    kernels(a)


if __name__ == "__main__":
    main()
