"""Pairs/s of the fused CPU backend vs the float64 numpy reference, same Omniglot inputs, same run; cost per pair
by image size and depth against the arithmetic limit; peak memory.

    .venv/bin/python bench/cntk_cpu.py [--depths 3,10,20] [--pairs-ref 1] [--pairs-cpu 64] [--sizes 8,12,16,28]
                                       [--rows 8] [--flop-per-cycle 32] [--threads N] [--skip-reference]

Prints Markdown tables (medians of --repeats calls, the same statistic for both backends) for docs/benchmarks.md,
with the load averages before and after. The reference and the cpu backend are called in turn, one call of each
per round, so that a change of load during the run falls on both.
The speed-up is of wall times (cpu backend on all numba threads vs the single-threaded reference); the
CPU-seconds ratio (reference CPU time / cpu backend CPU time of all its threads) is the speed-up per core, which
other processes on the machine disturb less.
The limit: FLOP_PER_ENTRY(C, d) floating-point operations per kernel entry (pair x entry of the 4-D recursion),
at --flop-per-cycle per core and the clock measured by a dependency chain, on all numba threads. The default, 2 FMA
x 8 float32 lanes x 2 flop = 32, is for two 256-bit FMA pipes (AMD Zen 4, where 512-bit instructions are split in
two, and Intel cores with one 512-bit FMA unit); AMD Zen 5 server cores have two full 512-bit FMA pipes: 64.
The cost table times blocks of --rows images against the rest, as Gram tiles are: a call of few pairs is dominated
by the setup of its batches (at 8x8 on 2 threads, 128 pairs a call cost 1.1x to 1.3x more per pair than 1024).
"""

import argparse
import statistics
import os
import resource
import time

import numba
import numpy as np

from mnkpipe.data import fit_standardiser, load_omniglot, resolve_data_root, standardise_and_pad
from mnkpipe.kernels import scale_maps
from mnkpipe.kernels.cntk_cpu import batch_lanes, cntk_block_cpu
from mnkpipe.kernels.cntk_reference import cntk_pair


def flop_per_entry(c: int, depth: int) -> int:
    """G (2C), the first box filter on S (4 adds: 2 in the row pass, 2 in the column pass), d-1 V steps (28 each:
    r_x r_z, a_x a_z, rho = S r_x r_z; 1 - |rho|, 7 FMA of the acos polynomial, u P, pi - acos, 1 + |rho|, u sqrt,
    FMA rho (pi - theta) + sin, (pi - theta)/(9 pi), the product with a_x a_z, FMA of T; plus 2 square roots and 5
    clip/abs/select ops not counted), d-2 box filters on S and T (8 adds), the final sum (1)."""
    return 2 * c + 4 + 28 * (depth - 1) + 8 * (depth - 2) + 1


@numba.njit
def _chain(n, x):
    for i in range(n):
        x = (x * x) ^ i  # imul (3 cycles) + xor (1 cycle), dependent
    return x


def clock_ghz() -> float:
    """Core clock from a dependent imul + xor chain of 4 cycles per step (best of 10)."""
    _chain(10, 1)
    best = min(time_once(lambda: _chain(20_000_000, 1)) for _ in range(10))
    return 4 * 20e6 / best / 1e9


def omniglot_images(n: int, size: int = 28) -> np.ndarray:
    """n standardised images of two evaluation alphabets (920 images), drawn without replacement."""
    ds = load_omniglot(resolve_data_root(None), "evaluation", image_size=size, alphabets=["Angelic", "Keble"])
    mean, std = fit_standardiser(ds.images)
    idx = np.random.default_rng(0).choice(len(ds.images), n, replace=False)
    return standardise_and_pad(ds.images[idx], mean, std, None)


def time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_it(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls."""
    return statistics.median(time_once(fn) for _ in range(repeats))


def time_side_by_side(fns, repeats: int) -> list[list[tuple[float, float]]]:
    """Per round, (wall seconds, CPU seconds of this process on all threads) of one call of each function, called in
    turn, so that a change of load by other processes falls on all of them alike; `repeats` rounds."""
    rounds = []
    for _ in range(repeats):
        row = []
        for f in fns:
            c0 = time.process_time()
            row.append((time_once(f), time.process_time() - c0))
        rounds.append(row)
    return rounds


def load() -> str:
    return "load averages " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def speedup_table(a) -> None:
    x = omniglot_images(2 + a.pairs_cpu, a.size)
    print(f"{a.size}x{a.size} Omniglot, GAP; cpu backend: {numba.get_num_threads()} threads on {os.cpu_count()} cores, "
          f"reference: 1 thread; medians of {a.repeats} rounds (speed-up: of the medians, and the median of the "
          f"rounds' own ratios)\n")
    print("| depth | reference ms/pair | cpu ms/pair | reference pairs/s | cpu pairs/s | speed-up | speed-up, median "
          "of rounds | max rel. diff | CPU-seconds ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in map(int, a.depths.split(",")):
        l = scale_maps(x, d)
        x64, l64 = x.astype(np.float64), l
        ref_vals, out = [], []
        cntk_block_cpu(x[:1], l[:1], x[1:3], l[1:3], depth=d)  # compile / load the cache outside the timing
        rounds = time_side_by_side([
            lambda: ref_vals.append([cntk_pair(x64[0], x64[1 + j], l64[0], l64[1 + j], depth=d)
                                     for j in range(a.pairs_ref)]),
            lambda: out.append(cntk_block_cpu(x[:1], l[:1], x[1:1 + a.pairs_cpu], l[1:1 + a.pairs_cpu], depth=d)),
        ], a.repeats)
        per_pair = [((wr / a.pairs_ref, cr / a.pairs_ref), (wc / a.pairs_cpu, cc / a.pairs_cpu))
                    for (wr, cr), (wc, cc) in rounds]
        t_ref, c_ref, t_cpu, c_cpu = (statistics.median(r[i][j] for r in per_pair) for i in (0, 1) for j in (0, 1))
        paired = statistics.median(r[0][0] / r[1][0] for r in per_pair)
        diff = np.max(np.abs(out[-1][0, :a.pairs_ref] - ref_vals[-1]) / np.abs(ref_vals[-1]))
        print(f"| {d} | {1e3 * t_ref:.1f} | {1e3 * t_cpu:.2f} | {1 / t_ref:.2f} | {1 / t_cpu:.1f} | "
              f"{t_ref / t_cpu:.1f}x | {paired:.1f}x | {diff:.1e} | {c_ref / c_cpu:.1f}x |", flush=True)


def cost_table(a, ghz: float) -> None:
    threads = numba.get_num_threads()
    print(f"\ncpu backend, {threads} threads, GAP, Omniglot resized, {a.rows} x n blocks; clock {ghz:.2f} GHz "
          f"(measured); limit = flop per entry / ({a.flop_per_cycle} flop/cycle x {ghz:.2f} GHz x {threads} cores)\n")
    print("| size | depth | us/pair | pairs/s | ns per entry per layer (x cores) | flop per entry | "
          "limit us/pair | fraction of limit |")
    print("|---|---|---|---|---|---|---|---|")
    for size in map(int, a.sizes.split(",")):
        n = a.batches * batch_lanes(size) * threads  # --batches batches per thread per row of a timed call
        x = omniglot_images(a.rows + n, size)  # x[:rows] against the n others: rows x n pairs
        for d in map(int, a.depths.split(",")):
            l = scale_maps(x, d)
            cntk_block_cpu(x[:1], l[:1], x[1:3], l[1:3], depth=d)
            entries = size ** 4
            t = time_it(lambda: cntk_block_cpu(x[:a.rows], l[:a.rows], x[a.rows:], l[a.rows:], depth=d),
                        a.repeats) / (a.rows * n)
            flop = flop_per_entry(x.shape[1], d)
            limit = entries * flop / (a.flop_per_cycle * ghz * 1e9 * threads)
            ns = 1e9 * t * threads / (entries * (d - 1))
            print(f"| {size}x{size} | {d} | {1e6 * t:.1f} | {1 / t:,.0f} | {ns:.2f} | "
                  f"{flop} | {1e6 * limit:.1f} | {limit / t:.0%} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="3,10,20")
    ap.add_argument("--pairs-ref", type=int, default=1, help="pairs per timed call of the reference (slow)")
    ap.add_argument("--pairs-cpu", type=int, default=64, help="pairs per timed call of the cpu backend (64 at 28x28: "
                    "two batches of 16 per thread, so both threads work all the call)")
    ap.add_argument("--batches", type=int, default=2, help="batches per thread per row of a timed call of the cost "
                    "table")
    ap.add_argument("--rows", type=int, default=8, help="images on the row side of the cost table's blocks")
    ap.add_argument("--flop-per-cycle", type=int, default=32, help="the limit's flop per cycle per core (64 on AMD "
                    "Zen 5 server cores)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the median counts")
    ap.add_argument("--size", type=int, default=28, help="image size of the speed-up table")
    ap.add_argument("--sizes", default="", help="image sizes of the cost table (cpu backend only), e.g. 8,12,16,28")
    ap.add_argument("--skip-reference", action="store_true", help="only the cost table")
    ap.add_argument("--threads", type=int, default=0, help="numba threads of the cpu backend (default: all)")
    a = ap.parse_args()
    if a.threads:
        numba.set_num_threads(a.threads)
    print(load(), "\n")
    if not a.skip_reference:
        speedup_table(a)
    if a.sizes:
        cost_table(a, clock_ghz())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB (reference 4-D tensors dominate: 6 x (HW)^2 float64)")
    print(load())


if __name__ == "__main__":
    main()
