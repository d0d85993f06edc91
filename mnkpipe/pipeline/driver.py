"""The driver: create or check the store, then dispatch its missing tiles to Ray workers and track progress."""

import errno
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from .. import __version__
from ..store import (StoreError, StoreLock, TiledArray, create_store, describe_differences, is_being_created,
                     open_store, store_folder)
from .config import ExperimentConfig, load_config
from .experiment import build_experiment, experiment_plan, store_plan
from .inspect import verify_store
from .ray_session import (HeldSignals, NodeLost, RayFailure, check_requested_counts, check_private_node,
                          check_resources, explain, start_ray, stop_ray)

RESTARTS = 3  # restarts of Ray in a row, without a tile finished in between, before the driver gives up


def rebuild_plan(store, plan: np.ndarray) -> bool:
    """Under the lock: rewrite gram_plan when it is lost or damaged (it differs from the manifest's digest, or, in a
    store made before the digest was recorded, it is unreadable or plans no tile) with `plan`, the plan rebuilt
    from config and episodes, written only if it equals the recorded digest; True when it was rewritten."""
    ta = store.tiled("gram")
    try:
        if ta.plan().any():  # plan() raises when the plan differs from its digest (or its chunk is undecodable)
            return False
    except StoreError:
        pass
    ta.write_plan(plan)
    return True


def prepare_store(cfg: ExperimentConfig, store_path, *, data: str | None = None, backend: str = "cpu"):
    """Create the store for cfg (recording the CNTK backend its tiles are computed with), or check that an existing
    one was made from the same config, data and backend; then, as its lock holder, rebuild a lost plan and delete
    the temporary files killed writers left."""
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
        if store.backend is None:
            print(f"note: {store_path} does not record the backend its tiles were computed with (made before mnkpipe "
                  f"recorded it): computing its missing tiles with {backend}", file=sys.stderr)
        elif store.backend != backend:  # tiles of two backends differ in the last bits
            diffs.append(f'backend: store has "{store.backend}", now "{backend}" (--gpus > 0 computes with cupy)')
        if store.manifest["fingerprint"] != exp.fingerprint():
            diffs.append("dataset/episodes fingerprint: the images or tasks differ from those the store was made with")
        if diffs:
            raise StoreError(f"{store_path} was made with a different experiment; refusing to mix them (nothing was "
                             "changed). Differences:\n  " + "\n  ".join(diffs) +
                             "\nUse the store's own config, or a new --store path.")
        store.remove_partial_files()
        if rebuild_plan(store, experiment_plan(cfg, exp)):
            print(f"note: gram_plan of {store_path} was lost or damaged: rebuilt from the config and episodes",
                  file=sys.stderr)
        return store
    return create_store(store_path, exp, config=cfg.to_dict(), depth=cfg.kernel.depth, tile_size=cfg.compute.tile_size,
                        plan=experiment_plan(cfg, exp), dtype=cfg.compute.dtype, backend=backend)


def compute_kernel(config, store_path, *, data: str | None = None, gpus: int = 0, cpus: int | None = None,
                   address: str | None = None, tile_size: int | None = None, progress: bool = True,
                   break_lock: bool = False) -> dict:
    """mnkpipe compute-kernel: prepare the store, then compute every planned Gram tile that is not done yet."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if tile_size:
        cfg.compute.tile_size = int(tile_size)
        cfg.validate()
    store_path = store_folder(store_path)  # absolute: workers on other nodes open it by this path
    check_resources(address, cpus, gpus)  # before anything is built
    try:
        with StoreLock(store_path, command=" ".join(sys.argv), break_lock=break_lock):
            prepare_store(cfg, store_path, data=data, backend="cupy" if gpus else "cpu")
            return run_tiles(store_path, gpus=gpus, cpus=cpus, address=address, progress=progress)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise StoreError(f"the disk holding {store_path} is full ({e.strerror}): free space there, or give another "
                         "--store; rerunning the same command then rebuilds or resumes the store") from None


def repair_store(store_path, *, gpus: int = 0, cpus: int | None = None, address: str | None = None,
                 progress: bool = True) -> dict:
    """mnkpipe verify --repair: under the lock, check the inputs, rebuild a lost plan, mark the bad tiles (durably:
    a killed repair is finished by the next one) and recompute exactly the marked tiles, with the backend the store
    was made with. Resources and backend are checked before anything is written."""
    store_path = Path(os.path.abspath(store_path))
    check_resources(address, cpus, gpus)
    backend, notes = "cupy" if gpus else "cpu", []
    with StoreLock(store_path, command=" ".join(sys.argv)):
        store = open_store(store_path, mode="r+")
        if store.backend is None:
            notes.append(f"{store_path} does not record the backend its tiles were computed with (made before mnkpipe "
                         f"recorded it): repairing with {backend}; if its tiles came from GPUs, repair with --gpus")
        elif store.backend != backend:
            how = "with --gpus N (GPU workers)" if store.backend == "cupy" else "without --gpus (CPU workers)"
            raise StoreError(f"{store_path} was computed with the {store.backend} backend: repair it {how}, so that "
                             f"its tiles are not mixed with {backend} tiles (nothing was changed)")
        store.check_inputs()
        if rebuild_plan(store, store_plan(store)):
            notes.append("gram_plan was lost or damaged: gram_plan rebuilt from the manifest's config and the episodes")
        store.remove_partial_files()
        result = verify_store(store_path, inputs=False)  # just checked
        ta = store.tiled("gram")
        for b in result["bad"]:
            ta.mark_for_repair(*b["tile"])
        todo = ta.tiles_to_repair()
        s = run_tiles(store_path, gpus=gpus, cpus=cpus, address=address, progress=progress, tiles=todo) if todo else {}
    return dict(result, notes=notes + result["notes"], tiles_recomputed=s.get("tiles_computed", 0))


def _make_workers(source, target: TiledArray, gpus: int, cpus: int | None):
    """gpus > 0: one cupy actor per GPU; else one single-threaded CPU actor per CPU. Each runs this mnkpipe
    version, starts the tile source (CNTKSource checks that it sees the driver's store) and opens the target."""
    import ray

    from ..workers.tile import make_ray_worker
    worker = make_ray_worker()
    args = (source, str(target.path), target.name, __version__)
    resources = ray.cluster_resources()
    check_requested_counts("the Ray cluster", resources, cpus=cpus, gpus=gpus)
    if gpus:
        return [worker.options(num_gpus=1, num_cpus=1).remote(*args, "cupy", 1) for _ in range(gpus)]
    n = cpus or int(resources["CPU"])
    return [worker.options(num_cpus=1).remote(*args, "cpu", 1) for _ in range(n)]


def run_tiles(store_path, *, name: str = "gram", source=None, gpus: int = 0, cpus: int | None = None,
              address: str | None = None, progress: bool = True, in_flight_per_worker: int = 2,
              restarts: int = RESTARTS, tiles=None) -> dict:
    """Dispatch the missing tiles (only those in `tiles`, when given) of the tiled array `name` of the Zarr group at
    store_path, computed by the tile source (workers/tile.py; default: the CNTK of the store's images, whose input
    arrays are checked against the manifest first); at most in_flight_per_worker per worker.

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
    only = None if tiles is None else {tuple(t) for t in tiles}

    def missing() -> list[tuple[int, int]]:
        return [t for t in target.missing_tiles() if only is None or t in only]

    todo = missing()
    if name == "gram" and todo:
        store.check_inputs()  # tiles computed from damaged images or scale maps would be wrong
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
                _dispatch(target, deque(missing()), _make_workers(source, target, gpus, cpus), summary,
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
