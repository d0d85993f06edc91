"""The driver: create or check the store, then dispatch its missing tiles to Ray workers and track progress."""

import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import zarr
from tqdm import tqdm

from ..store import (StoreError, StoreLock, TiledArray, create_store, describe_differences, is_being_created,
                     open_store)
from .config import ExperimentConfig, load_config
from .experiment import build_experiment
from .plan import plan_full, plan_mnk
from .ray_session import start_ray, stop_ray


def prepare_store(cfg: ExperimentConfig, store_path, *, data: str | None = None):
    """Create the store for cfg, or check that an existing one was made from the same config and data."""
    store_path = Path(store_path)
    exp = build_experiment(cfg, data)
    if _interrupted_creation(store_path):
        shutil.rmtree(store_path)
    if store_path.exists() and not store_path.is_dir():
        raise StoreError(f"{store_path} is a file, not an mnkpipe store; refusing to touch it")
    if store_path.is_dir() and any(store_path.iterdir()):
        if not (store_path / "zarr.json").exists():
            raise StoreError(f"{store_path} is a folder not made by mnkpipe (no zarr.json); refusing to touch it "
                             "(nothing was changed): give a new or empty --store path")
        store = open_store(store_path, mode="r+")  # a Zarr group not made by mnkpipe: StoreError, untouched
        diffs = describe_differences(store.manifest["config"], cfg.to_dict())
        if store.manifest["fingerprint"] != exp.fingerprint():
            diffs.append("dataset/episodes fingerprint: the images or tasks differ from those the store was made with")
        if diffs:
            raise StoreError(f"{store_path} was made with a different experiment; refusing to mix them (nothing was "
                             "changed). Differences:\n  " + "\n  ".join(diffs) +
                             "\nUse the store's own config, or a new --store path.")
        return store
    n, t = len(exp.images), cfg.compute.tile_size
    if cfg.compute.plan == "full":
        plan = plan_full(n, t)
    else:
        test = exp.episodes.test
        plan = plan_mnk(n, t, exp.n_train_images, [list(s) + list(q) for s, q in zip(test.support, test.query)])
    return create_store(store_path, exp, config=cfg.to_dict(), depth=cfg.kernel.depth, tile_size=t, plan=plan,
                        dtype=cfg.compute.dtype)


def _interrupted_creation(store_path: Path) -> bool:
    """A store whose creation was killed: it still carries the creation marker and has no manifest yet."""
    return is_being_created(store_path)


def compute_kernel(config, store_path, *, data: str | None = None, gpus: int = 0, cpus: int | None = None,
                   address: str | None = None, tile_size: int | None = None, progress: bool = True,
                   break_lock: bool = False) -> dict:
    """mnkpipe compute-kernel: prepare the store, then compute every planned Gram tile that is not done yet."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if tile_size:
        cfg.compute.tile_size = int(tile_size)
        cfg.validate()
    with StoreLock(store_path, command=" ".join(sys.argv), break_lock=break_lock):
        prepare_store(cfg, store_path, data=data)
        return run_tiles(store_path, gpus=gpus, cpus=cpus, address=address, progress=progress)


def _make_workers(source, store_path, name: str, gpus: int, cpus: int | None):
    """gpus > 0: one cupy actor per GPU; else one single-threaded CPU actor per CPU."""
    import ray
    from ..workers.tile import make_ray_worker
    worker = make_ray_worker()
    args = (source, str(store_path), name)
    if gpus:
        total = int(ray.cluster_resources().get("GPU", 0))
        if total < gpus:
            raise RuntimeError(f"--gpus {gpus} asked for, but the Ray cluster has {total} GPUs")
        return [worker.options(num_gpus=1, num_cpus=1).remote(*args, "cupy", 1) for _ in range(gpus)]
    n = cpus or int(ray.cluster_resources().get("CPU", os.cpu_count()))
    return [worker.options(num_cpus=1).remote(*args, "cpu", 1) for _ in range(n)]


def run_tiles(store_path, *, name: str = "gram", source=None, gpus: int = 0, cpus: int | None = None,
              address: str | None = None, progress: bool = True, in_flight_per_worker: int = 2) -> dict:
    """Dispatch the missing tiles of the tiled array `name` in the Zarr group store_path, computed by the tile
    source (workers/tile.py; default: the CNTK of the store's images); at most in_flight_per_worker per worker."""
    import ray
    from ..workers.tile import CNTKSource
    source = source or CNTKSource(store_path)
    target = (open_store(store_path, mode="r+").tiled(name) if name == "gram"
              else TiledArray(store_path, name, group=zarr.open_group(str(store_path), mode="r+")))
    todo = deque(target.missing_tiles())
    planned = target.planned_tiles()
    total_pairs = sum(target.tile_pairs(*t) for t in planned)
    done_pairs = total_pairs - sum(target.tile_pairs(*t) for t in todo)
    summary = {"tiles_planned": len(planned), "tiles_computed": 0, "tiles_skipped": len(planned) - len(todo),
               "pairs_computed": 0, "seconds": 0.0, "compute_s": 0.0, "io_s": 0.0, "workers": {}}
    if not todo:
        return summary
    if gpus:
        from ..kernels.cntk_cupy import available
        if not address and not available():
            raise RuntimeError("--gpus needs cupy and a usable CUDA device (pip install 'mnkpipe[gpu]'); none found")
    started = start_ray(address, cpus=cpus, gpus=gpus)
    t0 = time.time()
    workers_seen = {}
    try:
        workers = _make_workers(source, store_path, name, gpus, cpus)
        free = deque(w for w in workers for _ in range(in_flight_per_worker))
        pending = {}
        bar = tqdm(total=total_pairs, initial=done_pairs, unit="pair", unit_scale=True, disable=not progress,
                   desc=f"{name} tiles", dynamic_ncols=True, smoothing=0.1)
        last_save = 0.0
        while todo or pending:
            while todo and free:
                w = free.popleft()
                bi, bj = todo.popleft()
                pending[w.run.remote(bi, bj)] = (w, (bi, bj))
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                w, tile = pending.pop(ref)
                status = ray.get(ref)
                free.append(w)
                pairs = target.tile_pairs(*tile)
                summary["tiles_computed"] += 1
                summary["pairs_computed"] += pairs
                summary["compute_s"] += status["compute_s"]
                summary["io_s"] += status["read_s"] + status["write_s"]
                seen = workers_seen.get(status["worker"], {})
                workers_seen[status["worker"]] = {"node": status["node"], "last_seen": time.time(),
                                                  "tiles": seen.get("tiles", 0) + 1,
                                                  "rss_mb": max(seen.get("rss_mb", 0), status["rss_mb"])}
                bar.update(pairs)
            if time.time() - last_save > 2 or not (todo or pending):
                last_save = time.time()
                elapsed = last_save - t0
                target.array.attrs["progress"] = {
                    "pairs_total": total_pairs, "pairs_done": done_pairs + summary["pairs_computed"],
                    "updated": last_save, "rate_pairs_per_s": summary["pairs_computed"] / max(elapsed, 1e-9),
                    "workers": workers_seen}
        bar.close()
    finally:
        if started:
            stop_ray()
    summary["seconds"] = time.time() - t0
    summary["workers"] = workers_seen
    summary["n_workers"] = len(workers)
    return summary
