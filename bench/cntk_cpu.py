"""Pairs/s of the fused CPU backend vs the float64 numpy reference, same Omniglot inputs, same run; peak memory.

    .venv/bin/python bench/cntk_cpu.py [--depths 3,10,20] [--pairs-ref 2] [--pairs-cpu 64]

Prints a Markdown table (medians of --repeats runs) for docs/benchmarks.md.
"""

import argparse
import os
import resource
import statistics
import time

import numpy as np

from mnkpipe.data import fit_standardiser, load_omniglot, resolve_data_root, standardise_and_pad
from mnkpipe.kernels import scale_maps
from mnkpipe.kernels.cntk_cpu import cntk_block_cpu
from mnkpipe.kernels.cntk_reference import cntk_pair


def omniglot_images(n: int, size: int = 28) -> np.ndarray:
    ds = load_omniglot(resolve_data_root(None), "evaluation", image_size=size, alphabets=["Angelic", "Keble"])
    mean, std = fit_standardiser(ds.images)
    idx = np.random.default_rng(0).choice(len(ds.images), n, replace=False)
    return standardise_and_pad(ds.images[idx], mean, std, None)


def time_it(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="3,10,20")
    ap.add_argument("--pairs-ref", type=int, default=2, help="pairs timed with the reference (slow)")
    ap.add_argument("--pairs-cpu", type=int, default=64, help="pairs timed with the cpu backend")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=28)
    a = ap.parse_args()
    import numba
    x = omniglot_images(2 + a.pairs_cpu, a.size)
    print(f"{a.size}x{a.size} Omniglot, GAP; cpu backend: {numba.get_num_threads()} threads on {os.cpu_count()} cores; "
          f"medians of {a.repeats} runs\n")
    print("| depth | reference ms/pair | cpu ms/pair | reference pairs/s | cpu pairs/s | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for d in map(int, a.depths.split(",")):
        l = scale_maps(x, d)
        x64, l64 = x.astype(np.float64), l
        ref_vals = []
        t_ref = time_it(lambda: ref_vals.append([cntk_pair(x64[0], x64[1 + j], l64[0], l64[1 + j], depth=d)
                                                 for j in range(a.pairs_ref)]), a.repeats) / a.pairs_ref
        cntk_block_cpu(x[:1], l[:1], x[1:3], l[1:3], depth=d)  # compile / load the cache outside the timing
        out = []
        t_cpu = time_it(lambda: out.append(cntk_block_cpu(x[:1], l[:1], x[1:1 + a.pairs_cpu], l[1:1 + a.pairs_cpu],
                                                          depth=d)), a.repeats) / a.pairs_cpu
        diff = np.max(np.abs(out[-1][0, :a.pairs_ref] - ref_vals[-1]) / np.abs(ref_vals[-1]))
        print(f"| {d} | {1e3 * t_ref:.1f} | {1e3 * t_cpu:.2f} | {1 / t_ref:.2f} | {1 / t_cpu:.1f} | "
              f"{t_ref / t_cpu:.1f}x | {diff:.1e} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB (reference 4-D tensors dominate: 6 x (HW)^2 float64)")


if __name__ == "__main__":
    main()
