"""Scale benchmark: an N ~ 20,000 Gram (full plan, depth 2, small Omniglot images) through the real driver and Ray.

    .venv/bin/python bench/scale.py [--size 8] [--train-tasks 200] [--test-tasks 1] [--skip-depth10]
    .venv/bin/python bench/scale.py --size 4 --train-tasks 200 --test-tasks 131 --skip-depth10   # N = 20,700

Reports wall time, pairs/s, driver and worker peak RSS, the share of worker time not spent in kernel compute,
the same share at depth 10 (smaller N), and the time to resume a store that is 95% done.
"""

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from mnkpipe.pipeline.config import ExperimentConfig
from mnkpipe.pipeline.driver import compute_kernel
from mnkpipe.pipeline.inspect import verify_store
from mnkpipe.store import open_store


def config(train_tasks: int, depth: int, tile: int, size: int = 8, test_tasks: int = 1) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data.image_size, cfg.data.pad = size, 0
    cfg.tasks.way, cfg.tasks.shot, cfg.tasks.query = 5, 1, 19
    cfg.tasks.train_tasks, cfg.tasks.test_tasks, cfg.tasks.val_tasks = train_tasks, test_tasks, 0
    cfg.kernel.depth = depth
    cfg.compute.tile_size, cfg.compute.plan = tile, "full"
    cfg.validate()
    return cfg


def run(cfg: ExperimentConfig, store: Path) -> dict:
    t = time.time()
    s = compute_kernel(cfg, store, progress=True)
    s["wall"] = time.time() - t
    busy = s["n_workers"] * s["seconds"]
    s["overhead_share"] = 1 - s["compute_s"] / busy if busy else 0.0
    s["worker_rss_mb"] = max((w["rss_mb"] for w in s["workers"].values()), default=0)
    return s


def report(name: str, s: dict, n: int) -> None:
    print(f"| {name} | {n:,} | {s['pairs_computed']:,} | {s['wall']:.0f} s | "
          f"{s['pairs_computed'] / s['seconds']:,.0f} | "
          f"{s['worker_rss_mb']:.0f} MiB | {100 * s['overhead_share']:.1f}% | "
          f"{100 * s['io_s'] / max(s['compute_s'], 1e-9):.2f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tasks", type=int, default=200, help="5-way 1-shot 19-query tasks (100 images each)")
    ap.add_argument("--test-tasks", type=int, default=1, help="test tasks from the evaluation split (more images)")
    ap.add_argument("--size", type=int, default=8, help="image size (no padding)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--skip-depth10", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnkpipe-scale-"))
    rows = []
    try:
        store = tmp / "scale.zarr"
        cfg = config(a.train_tasks, 2, a.tile, a.size, a.test_tasks)
        s = run(cfg, store)
        n = open_store(store).n
        rows.append((f"depth 2, {a.size}x{a.size}", s, n))
        if not a.skip_depth10:
            s10 = run(config(max(1, a.train_tasks // 10), 10, a.tile, a.size), tmp / "depth10.zarr")
            rows.append((f"depth 10, {a.size}x{a.size}", s10, open_store(tmp / "depth10.zarr").n))
        driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # resume: forget 5% of the tiles (last ones), then rerun the same command; and a no-op resume
        st = open_store(store, mode="r+")
        tiles = st.planned_tiles()
        forget = tiles[-max(1, len(tiles) // 20):]
        for t in forget:
            st.clear_record(*t)
        t0 = time.time()
        r = compute_kernel(cfg, store, progress=False)
        resume_wall = time.time() - t0
        t0 = time.time()
        compute_kernel(cfg, store, progress=False)
        noop_wall = time.time() - t0
        print("\n| run | N | pairs | wall | pairs/s | worker peak RSS | worker time not in kernel "
              "| read+write / kernel |")
        print("|---|---|---|---|---|---|---|---|")
        for name, s_, n_ in rows:
            report(name, s_, n_)
        print(f"\ndriver peak RSS (this process, incl. experiment building): {driver_rss:.0f} MiB")
        print(f"resume of a 95%-done store ({len(forget)} of {len(tiles)} tiles missing): {resume_wall:.1f} s wall "
              f"({r['tiles_computed']} tiles recomputed, {r['seconds']:.1f} s in the dispatch loop); "
              f"no-op resume of a complete store: {noop_wall:.1f} s (data loading + fingerprint + record scan)")
        v = verify_store(store)
        print(f"verify: {v['checked']} tiles reread, {len(v['bad'])} bad (checksum, finiteness, diagonal symmetry)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
