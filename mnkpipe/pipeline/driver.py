"""The driver: create or check the store (local or on S3), then compute its missing tiles with an executor
(pipeline/executors.py: Ray workers by default) and track progress."""

import errno
import os
import sys
from pathlib import Path

import numpy as np
import zarr

from ..store import (StoreError, TiledArray, create_store, describe_differences, is_being_created, open_storage,
                     open_store, store_location)
from .config import ExperimentConfig, load_config
from .executors import RESTARTS, Executor, Progress, RayExecutor, TileJob
from .experiment import build_experiment, experiment_plan, store_plan
from .inspect import verify_store


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
    the temporary files killed writers left. store_path: a local path, URL or storage."""
    storage = open_storage(store_path)
    store_path = storage.url
    exp = build_experiment(cfg, data)
    if is_being_created(storage):  # its creation was killed: the marker is still there, no manifest yet
        storage.remove_all()
    contents = storage.contents()
    if contents == "file":
        raise StoreError(f"{store_path} is a file, not an mnkpipe store; refusing to touch it")
    if contents == "objects":
        if not storage.exists("zarr.json"):
            raise StoreError(f"{store_path} is a {storage.noun} not made by mnkpipe (no zarr.json); refusing to touch "
                             "it (nothing was changed): give a new or empty --store path")
        store = open_store(storage, mode="r+")  # a Zarr group not made by mnkpipe: StoreError, untouched
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
    return create_store(storage, exp, config=cfg.to_dict(), depth=cfg.kernel.depth, tile_size=cfg.compute.tile_size,
                        plan=experiment_plan(cfg, exp), dtype=cfg.compute.dtype, backend=backend)


def compute_kernel(config, store_path, *, data: str | None = None, gpus: int = 0, cpus: int | None = None,
                   address: str | None = None, tile_size: int | None = None, progress: bool = True,
                   break_lock: bool = False, executor: Executor | None = None) -> dict:
    """mnkpipe compute-kernel: prepare the store, then compute every planned Gram tile that is not done yet with
    `executor` (default: Ray workers of gpus, cpus, address), recording the backend it computes with."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if tile_size:
        cfg.compute.tile_size = int(tile_size)
        cfg.validate()
    store_path = store_location(store_path)  # an absolute path or a URL: workers on other nodes open it by it
    executor = executor or RayExecutor(gpus, cpus, address)
    executor.check()  # before anything is built
    storage = open_storage(store_path)
    try:
        with storage.lock(command=" ".join(sys.argv), break_lock=break_lock):
            prepare_store(cfg, storage, data=data, backend=executor.backend)
            return run_tiles(storage, progress=progress, executor=executor)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise StoreError(f"the disk holding {store_path} is full ({e.strerror}): free space there, or give another "
                         "--store; rerunning the same command then rebuilds or resumes the store") from None


def repair_store(store_path, *, gpus: int = 0, cpus: int | None = None, address: str | None = None,
                 progress: bool = True, executor: Executor | None = None) -> dict:
    """mnkpipe verify --repair: under the lock, check the inputs, rebuild a lost plan, mark the bad tiles (durably:
    a killed repair is finished by the next one) and recompute exactly the marked tiles, with the backend the store
    was made with, by `executor` (default: Ray workers of gpus, cpus, address). Resources and backend are checked
    before anything is written."""
    storage = _absolute(store_path)
    store_path = storage.url
    executor = executor or RayExecutor(gpus, cpus, address)
    executor.check()
    backend, notes = executor.backend, []
    with storage.lock(command=" ".join(sys.argv)):
        store = open_store(storage, mode="r+")
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
        result = verify_store(storage, inputs=False)  # just checked
        ta = store.tiled("gram")
        for b in result["bad"]:
            ta.mark_for_repair(*b["tile"])
        todo = ta.tiles_to_repair()
        s = run_tiles(storage, progress=progress, tiles=todo, executor=executor) if todo else {}
    return dict(result, notes=notes + result["notes"], tiles_recomputed=s.get("tiles_computed", 0))


def run_tiles(store_path, *, name: str = "gram", source=None, gpus: int = 0, cpus: int | None = None,
              address: str | None = None, progress: bool = True, in_flight_per_worker: int = 2,
              restarts: int = RESTARTS, tiles=None, executor: Executor | None = None) -> dict:
    """Compute the missing tiles (only those in `tiles`, when given) of the tiled array `name` of the Zarr group at
    store_path from the tile source (workers/tile.py; default: the CNTK of the store's images, whose input arrays are
    checked against the manifest first) with `executor` (default: a RayExecutor of gpus, cpus, address,
    in_flight_per_worker and restarts); returns the job's counts."""
    from ..workers.tile import CNTKSource
    storage = _absolute(store_path)  # workers on other nodes open it by its absolute path or URL
    if name == "gram":
        store = open_store(storage, mode="r+")
        target, source = store.tiled(name), source or CNTKSource(storage.url, store.manifest["fingerprint"])
    else:
        target = TiledArray(storage, name, group=zarr.open_group(storage.zarr_store(read_only=False), mode="r+"))
    only = None if tiles is None else {tuple(t) for t in tiles}

    def missing() -> list[tuple[int, int]]:
        return [t for t in target.missing_tiles() if only is None or t in only]

    todo = missing()
    if name == "gram" and todo:
        store.check_inputs()  # tiles computed from damaged images or scale maps would be wrong
    counts = Progress(target, target.planned_tiles(), todo, progress)
    if not todo:
        return counts.summary
    executor = executor or RayExecutor(gpus, cpus, address, in_flight_per_worker, restarts)
    executor.execute(TileJob(storage.url, name, source, missing), counts)
    counts.save(final=True)
    counts.close()
    return counts.summary


def _absolute(store_path):
    """The storage of store_path, a local folder made absolute (Ray workers may start in another folder)."""
    storage = open_storage(store_path)
    return open_storage(Path(os.path.abspath(storage.path))) if storage.path is not None else storage
