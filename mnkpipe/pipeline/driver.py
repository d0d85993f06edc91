"""The driver: create or check the store, then dispatch its missing tiles to Ray workers and track progress."""

import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import zarr
from tqdm import tqdm

from .. import __version__
from ..store import (StoreError, StoreLock, TiledArray, create_store, describe_differences, is_being_created,
                     open_store)
from .config import ExperimentConfig, load_config
from .experiment import build_experiment
from .plan import plan_full, plan_mnk
from .ray_session import (HeldSignals, NodeLost, RayFailure, check_counts, check_private_node, check_resources,
                          explain, start_ray, stop_ray)

RESTARTS = 3  # restarts of Ray in a row, without a tile finished in between, before the driver gives up


def prepare_store(cfg: ExperimentConfig, store_path, *, data: str | None = None):
    """Create the store for cfg, or check that an existing one was made from the same config and data."""
    store_path = Path(store_path)
    exp = build_experiment(cfg, data)
    if is_being_created(store_path):  # its creation was killed: the marker is still there, no manifest yet
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


def compute_kernel(config, store_path, *, data: str | None = None, gpus: int = 0, cpus: int | None = None,
                   address: str | None = None, tile_size: int | None = None, progress: bool = True,
                   break_lock: bool = False) -> dict:
    """mnkpipe compute-kernel: prepare the store, then compute every planned Gram tile that is not done yet."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if tile_size:
        cfg.compute.tile_size = int(tile_size)
        cfg.validate()
    store_path = Path(os.path.abspath(store_path))  # workers on other nodes open it by this path
    check_resources(address, cpus, gpus)  # before anything is built
    with StoreLock(store_path, command=" ".join(sys.argv), break_lock=break_lock):
        prepare_store(cfg, store_path, data=data)
        return run_tiles(store_path, gpus=gpus, cpus=cpus, address=address, progress=progress)


def _make_workers(source, target: TiledArray, gpus: int, cpus: int | None):
    """gpus > 0: one cupy actor per GPU; else one single-threaded CPU actor per CPU. Each runs this mnkpipe
    version, starts the tile source (CNTKSource checks that it sees the driver's store) and opens the target."""
    import ray
    from ..workers.tile import make_ray_worker
    worker = make_ray_worker()
    args = (source, str(target.path), target.name, __version__)
    resources = ray.cluster_resources()
    check_counts("the Ray cluster", resources, cpus=cpus, gpus=gpus)
    if gpus:
        return [worker.options(num_gpus=1, num_cpus=1).remote(*args, "cupy", 1) for _ in range(gpus)]
    n = cpus or int(resources["CPU"])
    return [worker.options(num_cpus=1).remote(*args, "cpu", 1) for _ in range(n)]


def run_tiles(store_path, *, name: str = "gram", source=None, gpus: int = 0, cpus: int | None = None,
              address: str | None = None, progress: bool = True, in_flight_per_worker: int = 2,
              restarts: int = RESTARTS) -> dict:
    """Dispatch the missing tiles of the tiled array `name` of the Zarr group at store_path, computed by the tile
    source (workers/tile.py; default: the CNTK of the store's images); at most in_flight_per_worker per worker.

    When Ray fails under the job (its node declared dead, workers that keep dying), Ray is restarted (or the
    cluster rejoined) and the missing tiles dispatched again, at most `restarts` times in a row without a tile
    finished in between; then RayFailure says what happened."""
    import ray.exceptions as rx
    from ..workers.tile import CNTKSource
    store_path = Path(os.path.abspath(store_path))  # workers on other nodes open it by this path
    if name == "gram":
        store = open_store(store_path, mode="r+")
        target, source = store.tiled(name), source or CNTKSource(store_path, store.manifest["fingerprint"])
    else:
        target = TiledArray(store_path, name, group=zarr.open_group(str(store_path), mode="r+"))
    todo = target.missing_tiles()
    planned = target.planned_tiles()
    total_pairs = sum(target.tile_pairs(*t) for t in planned)
    done_pairs = total_pairs - sum(target.tile_pairs(*t) for t in todo)
    summary = {"tiles_planned": len(planned), "tiles_computed": 0, "tiles_skipped": len(planned) - len(todo),
               "pairs_computed": 0, "seconds": 0.0, "compute_s": 0.0, "io_s": 0.0, "workers": {}, "restarts": 0,
               "pairs_done": done_pairs}
    if not todo:
        return summary
    if not address:
        check_resources(None, cpus, gpus)  # a cluster's resources are checked once joined, in _make_workers
    t0 = time.time()
    bar = tqdm(total=total_pairs, initial=done_pairs, unit="pair", unit_scale=True, disable=not progress,
               desc=f"{name} tiles", dynamic_ncols=True, smoothing=0.1)
    failures = 0
    while True:
        before = summary["tiles_computed"]
        started = start_ray(address, cpus=cpus, gpus=gpus)
        try:
            with HeldSignals() as held:
                _dispatch(target, deque(target.missing_tiles()), _make_workers(source, target, gpus, cpus), summary,
                          bar, t0, total_pairs, in_flight_per_worker, held)
            break
        except rx.RayTaskError as e:  # the tile code raised (the same on a retry)
            raise RayFailure(explain(e)) from None
        except (rx.RayError, NodeLost) as e:  # a node or workers lost
            failures = 1 if summary["tiles_computed"] > before else failures + 1
            if not started or failures > restarts:
                again = f" ({restarts} restarts of Ray in a row did not help)" if started else ""
                raise RayFailure(explain(e) + again) from None
            summary["restarts"] += 1
            print(f"\nRay failed under the job ({type(e).__name__}); restarting Ray and resuming "
                  f"({failures}/{restarts})", file=sys.stderr)
        finally:
            if started:
                stop_ray()
    bar.close()
    return summary


def _dispatch(target, todo, workers, summary, bar, t0, total_pairs, in_flight_per_worker, held):
    """Keep every worker busy with tiles from todo until all are written; record progress in the target array;
    raise a signal `held` (HeldSignals) between Ray calls."""
    import ray
    workers_seen = summary["workers"]
    summary["n_workers"] = len(workers)
    free = deque(w for w in workers for _ in range(in_flight_per_worker))
    pending = {}
    last_save = 0.0
    while todo or pending:
        while todo and free:
            w = free.popleft()
            bi, bj = todo.popleft()
            pending[w.run.remote(bi, bj)] = (w, (bi, bj))
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        held.deliver()  # Ctrl-C or SIGTERM, raised here rather than inside ray.wait
        check_private_node()  # its workers can go on for a while without their raylet: do not wait for Ray
        for ref in ready:
            w, tile = pending.pop(ref)
            status = ray.get(ref)
            free.append(w)
            pairs = target.tile_pairs(*tile)
            summary["tiles_computed"] += 1
            summary["pairs_computed"] += pairs
            summary["pairs_done"] += pairs
            summary["compute_s"] += status["compute_s"]
            summary["io_s"] += status["read_s"] + status["write_s"]
            seen = workers_seen.get(status["worker"], {})
            workers_seen[status["worker"]] = {"node": status["node"], "last_seen": time.time(),
                                              "tiles": seen.get("tiles", 0) + 1,
                                              "rss_mb": max(seen.get("rss_mb", 0), status["rss_mb"])}
            bar.update(pairs)
        if time.time() - last_save > 2 or not (todo or pending):
            last_save = time.time()
            summary["seconds"] = last_save - t0  # the last save's: status shows the rate compute-kernel prints
            target.set_progress({
                "pairs_total": total_pairs, "pairs_done": summary["pairs_done"], "updated": last_save,
                "rate_pairs_per_s": summary["pairs_computed"] / max(summary["seconds"], 1e-9), "workers": workers_seen})
