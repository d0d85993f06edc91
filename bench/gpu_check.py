"""One-shot check of the cupy CNTK backend on a lent GPU: correctness, throughput, baseline, end to end.

Run from the repository root on the device (bench/gpu_check.sh does, with the log under $OUT):
  (a) the fused kernel against the float64 oracle on 50 random pairs (several sizes, depths, gap/vanilla, fix,
      Omniglot-like images with a flat background, a zero image), every output item poisoned first; and against
      neural-tangents' golden Grams (GOLDEN=path, default tests/data/cntk_neural_tangents.npz);
  (b) throughput, pairs/s, at 32x32, depth 20, GAP, for several pairs per launch (cupy events, warm-up, median);
  (c) the seed's per-pair 4-D method ported to cupy (bench/seed_baseline_cupy.py) on the same pairs, and the ratio;
  (d) the tile loop end to end: mnkpipe.pipeline.local.compute_local(config, store, backend="cupy") on
      configs/gpu_check.toml (E2E_CONFIG=path for another config).
Prints a summary table last and writes gpu_check.json beside the log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TOL = 1e-4
T0 = time.time()


def log(*a):
    """print, flushed, with the elapsed seconds."""
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel_errors(k, ref):
    """(max elementwise |k - ref| / |ref| over entries above 1e-3 max|ref|, normwise max|k - ref| / max|ref|)."""
    k, ref = np.asarray(k, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    big = np.abs(ref) > 1e-3 * scale
    elem = float(np.max(np.abs(k - ref)[big] / np.abs(ref[big]))) if big.any() else 0.0
    norm = float(np.max(np.abs(k - ref)) / scale) if scale > 0 else float(np.max(np.abs(k)))
    return elem, norm


def omniglot_like(rng, n, size):
    """Strokes on a flat background, standardised by one scalar mean/std: many identical patches (rho = 1)."""
    x = np.zeros((n, 1, size, size))
    for img in x[:, 0]:
        for _ in range(3):
            r, c = rng.integers(4, size - 4, 2)
            dr, dc = rng.integers(-1, 2, 2)
            for k in range(rng.integers(4, size // 2)):
                rr, cc = np.clip(r + k * dr, 0, size - 1), np.clip(c + k * dc, 0, size - 1)
                img[max(rr - 1, 0):rr + 1, max(cc - 1, 0):cc + 1] = 1.0
    return (x - x.mean()) / x.std()


# --------------------------------------------------------------------------------------------------------------
# (a) correctness
# --------------------------------------------------------------------------------------------------------------

def check_pairs(cp, rng, name, x, depth, gap, fix, npairs, results):
    """Random pairs (plus one identical pair) of x through CupyCNTK vs cntk_reference; poisoned-output check."""
    from mnkpipe.kernels import cntk_cupy as cc
    from mnkpipe.kernels.cntk_reference import cntk_reference
    from mnkpipe.kernels.scales import scale_maps

    n = len(x)
    eng = cc.CupyCNTK(x, scale_maps(x, depth), depth=depth, gap=gap, fix=fix)
    p = rng.integers(0, n, npairs)
    q = rng.integers(0, n, npairs)
    q[0] = p[0]  # the diagonal: rho = 1 on the whole D = 0 slab
    # every output item written once: poison, launch, look
    p_d, q_d = cp.asarray(p.astype(np.int32)), cp.asarray(q.astype(np.int32))
    part = cp.full(cc.plan_items(npairs, eng.h, eng.w, gap)[1], np.nan, dtype=cp.float64)
    eng.launch(p_d, q_d, part)
    cp.cuda.Device().synchronize()
    unwritten = int((~cp.isfinite(part)).sum())
    k = eng.pairs(p, q)
    t = time.time()
    ref = np.array([cntk_reference(x[a:a + 1], x[b:b + 1], depth=depth, gap=gap, fix=fix)[0, 0] for a, b in zip(p, q)])
    elem, norm = rel_errors(k, ref)
    ok = unwritten == 0 and max(elem, norm) <= TOL and np.isfinite(k).all()
    results.append(dict(part="a", name=name, pairs=npairs, depth=depth, gap=gap, fix=fix, shape=list(x.shape[1:]),
                        max_rel_elem=elem, max_rel_norm=norm, unwritten=unwritten, ok=bool(ok)))
    log(f"  {name}: {npairs} pairs, rel err elem {elem:.2e} norm {norm:.2e}, unwritten {unwritten}, "
        f"ref {time.time() - t:.1f}s -> {'PASS' if ok else 'FAIL'}")
    return ok


def part_a(cp, rng, results):
    """Correctness on 50 random pairs of several kinds."""
    log("(a) correctness vs the float64 reference")
    z = rng.standard_normal((6, 1, 16, 16))
    z[-1] = 0.0  # an all-zero image: l = 0 everywhere, K = 0
    z[0, :, :7, :7] = 0.0  # a zero patch: l = 0 on part of the image
    cases = [
        ("16x16 C1 d5 gap", z, 5, True, False, 14),
        ("12x12 C2 d8 gap fix", rng.standard_normal((6, 2, 12, 12)), 8, True, True, 10),
        ("12x12 C1 d12 vanilla", rng.standard_normal((6, 1, 12, 12)), 12, False, False, 8),
        ("10x13 C3 d6 vanilla fix", rng.standard_normal((5, 3, 10, 13)), 6, False, True, 6),
        ("28x28 omniglot-like d4 gap", omniglot_like(rng, 6, 28), 4, True, False, 6),
        ("32x32 C1 d3 gap", rng.standard_normal((4, 1, 32, 32)), 3, True, False, 6),
    ]
    ok = True
    for name, x, depth, gap, fix, npairs in cases:
        try:
            ok &= check_pairs(cp, rng, name, x, depth, gap, fix, npairs, results)
        except Exception:
            ok = False
            results.append(dict(part="a", name=name, ok=False, error=traceback.format_exc(limit=3)))
            log(f"  {name}: ERROR\n{traceback.format_exc()}")
    return ok


def part_a_golden(cp, results):
    """Against neural-tangents (tests/data/README.md): c2 inputs are 2x the stored values (no 1/C)."""
    from mnkpipe.kernels import cntk_cupy as cc
    from mnkpipe.kernels.scales import scale_maps

    path = Path(os.environ.get("GOLDEN", REPO / "tests" / "data" / "cntk_neural_tangents.npz"))
    if not path.exists():
        log(f"(a') golden values not found at {path}: skipped (set GOLDEN=path)")
        results.append(dict(part="a-golden", name="golden", ok=None, skipped=f"not found: {path}"))
        return None
    log(f"(a') golden Grams from {path}")
    g = np.load(path)
    ok = True
    for key in sorted(k for k in g.files if k.rsplit("_", 1)[-1] in ("gap", "vanilla")):
        name, d, head = key.rsplit("_", 2)
        x = g[f"{name}_x"]
        depth = int(d[1:])
        ref = g[key] * (x.shape[1] if name.endswith("c2") else 1)
        try:
            k = cc.cntk_block_cupy(x, scale_maps(x, depth), depth=depth, gap=head == "gap", upper=True)
            elem, norm = rel_errors(k, ref)
            good = max(elem, norm) <= TOL
        except Exception:
            elem = norm = float("nan")
            good = False
            log(traceback.format_exc())
        ok &= good
        results.append(dict(part="a-golden", name=key, max_rel_elem=elem, max_rel_norm=norm, ok=bool(good)))
        log(f"  {key}: rel err elem {elem:.2e} norm {norm:.2e} -> {'PASS' if good else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------------------------------------------
# (b) throughput, (c) baseline
# --------------------------------------------------------------------------------------------------------------

def time_call(cp, fn, reps):
    """Median seconds of fn() over reps runs, timed with cupy events after the caller's warm-up."""
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(ts)), ts


def part_b(cp, rng, results, sizes, budget_s, variants):
    """pairs/s at 32x32, depth 20, GAP for each launch size; kernel resources; min_blocks variants at one size."""
    from mnkpipe.kernels import cntk_cupy as cc
    from mnkpipe.kernels.scales import scale_maps

    log("(b) throughput, 32x32 depth 20 GAP")
    depth, n = 20, 512
    x = rng.standard_normal((n, 1, 32, 32))
    l = scale_maps(x, depth)
    best = 0.0
    engines = {}
    for mb in variants:
        t = time.time()
        eng = cc.CupyCNTK(x, l, depth=depth, gap=True, min_blocks=mb)
        nw = min(64, min(sizes))
        eng.pair_sums(rng.integers(0, n, nw), rng.integers(0, n, nw))  # compile + warm-up
        cp.cuda.Device().synchronize()
        attrs = {}
        try:
            attrs = {k: v for k, v in eng._fn.attributes.items()
                     if k in ("num_regs", "local_size_bytes", "max_threads_per_block", "shared_size_bytes")}
        except Exception as exc:  # attributes are informative only
            attrs = {"error": repr(exc)}
        engines[mb] = eng
        log(f"  min_blocks={mb}: compiled+warm in {time.time() - t:.1f}s, {attrs}")
        results.append(dict(part="b-kernel", min_blocks=mb, attributes=attrs))
    start = time.time()
    est = None  # seconds per pair, from the last measurement
    for mb, eng in engines.items():
        for size in sizes if mb == variants[0] else [max(s for s in sizes if s <= 4096)]:
            if est is not None and est * size * 3 > budget_s - (time.time() - start):
                log(f"  {size} pairs/launch skipped: over the time budget")
                continue
            p = rng.integers(0, n, size)
            q = rng.integers(0, n, size)
            eng.pair_sums(p, q)  # warm-up at this size
            cp.cuda.Device().synchronize()
            reps = 3 if est is None else int(min(10, max(2, 4.0 / max(est * size, 1e-6))))
            med, ts = time_call(cp, lambda: eng.pair_sums(p, q), reps)
            est = med / size
            rate = size / med
            best = max(best, rate) if mb == variants[0] else best
            results.append(dict(part="b", min_blocks=mb, pairs_per_launch=size, seconds=med, reps=reps,
                                pairs_per_s=rate, spread=[min(ts), max(ts)],
                                tflops_at_0p9gflop_per_pair=rate * 0.9e9 / 1e12))
            log(f"  min_blocks={mb} {size:6d} pairs/launch: {med * 1e3:9.2f} ms  {rate:10.0f} pairs/s  "
                f"(spread {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms, {reps} reps)")
    return best, x, l


def part_c(cp, rng, results, x, l, fused_rate, npairs):
    """The seed's per-pair 4-D method in cupy: correctness on one small pair, then pairs/s at 32x32 depth 20."""
    from seed_baseline_cupy import baseline_pair

    from mnkpipe.kernels.cntk_reference import cntk_reference
    from mnkpipe.kernels.scales import scale_maps

    log("(c) baseline: per-pair 4-D cupy port of the seed method")
    xs = rng.standard_normal((2, 2, 10, 11))
    ls = scale_maps(xs, 6)
    f32 = lambda a: cp.asarray(a, dtype=cp.float32)  # noqa: E731
    kb = baseline_pair(cp, f32(xs[0]), f32(xs[1]), f32(ls[0]), f32(ls[1]), depth=6)
    kr = cntk_reference(xs[:1], xs[1:], depth=6)[0, 0]
    err = abs(kb - kr) / abs(kr)
    log(f"  baseline vs reference on one 10x11 depth-6 pair: rel err {err:.2e}")
    depth = 20
    xd, ld = f32(x), f32(l)
    p = rng.integers(0, len(x), npairs)
    q = rng.integers(0, len(x), npairs)
    baseline_pair(cp, xd[p[0]], xd[q[0]], ld[p[0]], ld[q[0]], depth=depth)  # warm-up
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    vals = [baseline_pair(cp, xd[a], xd[b], ld[a], ld[b], depth=depth) for a, b in zip(p, q)]
    cp.cuda.Device().synchronize()
    sec = time.perf_counter() - t
    rate = npairs / sec
    from mnkpipe.kernels import cntk_cupy as cc

    fused = cc.CupyCNTK(x, l, depth=depth).pairs(p, q)
    agree = rel_errors(fused, np.array(vals))
    ratio = fused_rate / rate if rate > 0 else float("nan")
    results.append(dict(part="c", pairs=npairs, seconds=sec, pairs_per_s=rate, check_rel_err=err,
                        fused_vs_baseline_rel=agree, speedup=ratio))
    log(f"  baseline: {npairs} pairs in {sec:.2f}s = {rate:.0f} pairs/s; fused/baseline values rel {agree[1]:.2e}; "
        f"speed-up {ratio:.1f}x")
    return rate, ratio, err


# --------------------------------------------------------------------------------------------------------------
# (d) end to end
# --------------------------------------------------------------------------------------------------------------

def part_d(results, backend="cupy"):
    """compute_local(config, store, backend): every tile of a fresh store, timed; its returned counts recorded."""
    from mnkpipe.pipeline.local import compute_local

    cfg = os.environ.get("E2E_CONFIG") or str(REPO / "configs" / "gpu_check.toml")
    log(f"(d) end to end: mnkpipe.pipeline.local.compute_local({cfg}, backend={backend!r})")
    store = Path(tempfile.mkdtemp(prefix="mnk_e2e_")) / "store.zarr"
    try:
        out = compute_local(cfg, str(store), backend=backend, progress=False)
    except Exception:
        log(traceback.format_exc())
        results.append(dict(part="d", ok=False, config=cfg, error=traceback.format_exc(limit=5)))
        return False
    results.append(dict(part="d", ok=True, config=cfg, backend=backend, **out))
    log(f"  {out['tiles']} tiles, {out['pairs']} pairs in {out['seconds']:.1f}s ({out['compute_s']:.1f}s computing): "
        f"{out['pairs_per_s']:.0f} pairs/s")
    return True


# --------------------------------------------------------------------------------------------------------------

def device_info(cp):
    """Name, SMs, clocks and versions of the current device."""
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return dict(name=name, sms=props.get("multiProcessorCount"), clock_khz=props.get("clockRate"),
                l2_bytes=props.get("l2CacheSize"), cc=f"{props.get('major')}.{props.get('minor')}",
                cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                driver=cp.cuda.runtime.driverGetVersion())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--sizes", default="256,1024,4096,16384", help="pairs per launch for (b)")
    ap.add_argument("--variants", default="4,1", help="min_blocks values to compile for (b); first is the default")
    ap.add_argument("--baseline-pairs", type=int, default=20)
    ap.add_argument("--budget", type=float, default=380.0, help="seconds for the whole run (parts shrink to fit)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,golden,b,c,d")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    rng = np.random.default_rng(seed)
    results, summary = [], []
    log(f"seed {seed}; python {sys.version.split()[0]}; numpy {np.__version__}")

    from mnkpipe.kernels import cntk_cupy as cc

    if not cc.available():
        log("cupy backend not available here (no cupy or no CUDA device): nothing to check")
        summary.append(("backend", "UNAVAILABLE"))
        _finish(out, seed, {}, results, summary)
        return 2
    import cupy as cp

    info = device_info(cp)
    log(f"device: {info}")

    ok_a = part_a(cp, rng, results) if "a" not in skip else None
    ok_g = part_a_golden(cp, results) if "golden" not in skip else None
    summary.append(("(a) 50 random pairs vs float64 reference", _verdict(ok_a, results, "a")))
    summary.append(("(a) golden Grams (neural-tangents)", _verdict(ok_g, results, "a-golden")))

    fused = 0.0
    x = l = None
    if "b" not in skip:
        try:
            left = args.budget - (time.time() - T0)
            sizes = [int(s) for s in args.sizes.split(",")]
            variants = [int(v) for v in args.variants.split(",")]
            fused, x, l = part_b(cp, rng, results, sizes, max(30.0, 0.5 * left), variants)
            rates = {r["pairs_per_launch"]: r["pairs_per_s"] for r in results
                     if r.get("part") == "b" and r["min_blocks"] == variants[0]}
            summary.append(("(b) fused 32x32 d20 GAP pairs/s by launch size",
                            ", ".join(f"{k}: {v:,.0f}" for k, v in rates.items())))
            for r in results:
                if r.get("part") == "b" and r["min_blocks"] != variants[0]:
                    summary.append((f"(b) min_blocks={r['min_blocks']} at {r['pairs_per_launch']}",
                                    f"{r['pairs_per_s']:,.0f} pairs/s"))
        except Exception:
            log(traceback.format_exc())
            summary.append(("(b) throughput", "ERROR (see log)"))
    if "c" not in skip and x is not None:
        try:
            rate, ratio, err = part_c(cp, rng, results, x, l, fused, args.baseline_pairs)
            summary.append(("(c) baseline per-pair 4-D pairs/s", f"{rate:,.1f} (check rel err {err:.1e})"))
            summary.append(("(c) speed-up fused / baseline", f"{ratio:,.1f}x"))
        except Exception:
            log(traceback.format_exc())
            summary.append(("(c) baseline", "ERROR (see log)"))
    if "d" not in skip:
        ok_d = part_d(results)
        d = [r for r in results if r.get("part") == "d"]
        summary.append(("(d) compute_local backend=cupy", "ERROR (see log)" if not ok_d else
                        f"{d[-1]['seconds']:.1f}s, {d[-1]['pairs_per_s']:,.0f} pairs/s"))
    _finish(out, seed, info, results, summary)
    failed = ok_a is False or ok_g is False
    return 1 if failed else 0


def _verdict(ok, results, part):
    """PASS/FAIL/skipped with the worst error of that part."""
    if ok is None:
        return "skipped"
    errs = [max(r.get("max_rel_elem", math.nan), r.get("max_rel_norm", math.nan)) for r in results
            if r.get("part") == part and "max_rel_elem" in r]
    worst = max(errs) if errs else math.nan
    return f"{'PASS' if ok else 'FAIL'} (max rel err {worst:.1e}, tol {TOL:.0e})"


def _finish(out, seed, info, results, summary):
    """Write gpu_check.json and print the summary table."""
    (out / "gpu_check.json").write_text(json.dumps(dict(seed=seed, device=info, results=results,
                                                        summary=summary), indent=1, default=str))
    width = max(len(k) for k, _ in summary) if summary else 10
    print("\n==== gpu_check summary " + "=" * 60)
    if info:
        print(f"device: {info.get('name')}, {info.get('sms')} SMs, cupy {info.get('cupy')}")
    for k, v in summary:
        print(f"{k:<{width}}  {v}")
    print(f"total {time.time() - T0:.0f}s; details in {out / 'gpu_check.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
