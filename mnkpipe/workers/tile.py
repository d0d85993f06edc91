"""Compute one tile from a tile source and write it into a tiled array; the same code runs in a Ray actor or without.

A tile source is a picklable object with two methods, called in the worker process:
``start(backend)`` (once: open its inputs, build what every tile needs) and
``tile(rows, cols) -> (tile, seconds spent reading inputs)`` for contiguous slices of the target's rows and columns.
CNTKSource (below) gives the base kernel of a store's images; evaluation/ defines the meta-kernel source.
"""

import errno
import os
import resource
import socket
import time

import numpy as np
import zarr

from .. import __version__
from ..files import DiskFull
from ..store import Store, StoreError, TiledArray, open_storage, open_store

WORKER_RESTARTS = 3  # restarts of one worker process before its actor is dead and the driver restarts Ray


class StoreNotShared(StoreError):
    """A worker does not see the driver's store at the driver's path or URL, or runs another mnkpipe version."""


def _shared_hint(where: str) -> str:
    """What a store every worker sees needs: a shared filesystem for a local path, the AWS settings for a URL."""
    if open_storage(where).path is None:
        return ("every node needs AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and "
                "AWS_ALLOW_HTTP for an http endpoint) that reach it")
    return "the store must be on a filesystem every node can see, at the same path"


class CNTKSource:
    """K(x_i, x_j) over the store's images: the CNTK of its [kernel] config, on the CPU or (cupy) a GPU. Started in
    a worker, it checks that the store there is the driver's (same manifest fingerprint) when fingerprint is given."""

    def __init__(self, store_path, fingerprint: str | None = None):
        self.store_path, self.fingerprint = str(store_path), fingerprint
        self.store = self.engine = None

    def start(self, backend: str) -> None:
        self.store = _open_same_store(self.store_path, self.fingerprint)
        self.backend = backend
        k = self.store.manifest["config"]["kernel"]
        self.depth, self.gap, self.fix = int(k["depth"]), bool(k["gap"]), bool(k["fix"])
        if backend == "cupy":
            from ..kernels.cntk_cupy import CupyCNTK
            self.engine = CupyCNTK(self.store.images(), self.store.scales(), depth=self.depth, gap=self.gap,
                                   fix=self.fix)

    def tile(self, rows: slice, cols: slice) -> tuple[np.ndarray, float]:
        """K over rows x cols (upper triangle mirrored when rows == cols), and the seconds spent reading inputs."""
        upper = rows == cols
        if self.engine is not None:
            return self.engine.block(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop),
                                     upper=upper), 0.0
        from ..kernels import cntk_block
        s = self.store
        t0 = time.perf_counter()
        x1, l1 = s.images(rows), s.scales(rows)
        x2, l2 = (x1, l1) if upper else (s.images(cols), s.scales(cols))
        read = time.perf_counter() - t0
        return cntk_block(x1, l1, x2, l2, depth=self.depth, gap=self.gap, fix=self.fix, upper=upper,
                          backend=self.backend), read


class TileComputer:
    """A started tile source and the open target array `name` of the Zarr group at target_path (a local path or URL);
    computes tiles."""

    def __init__(self, source, target_path, name: str = "gram", backend: str = "cpu", threads: int | None = None):
        if threads:
            import numba
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        self.source = source
        self.source.start(backend)
        storage, where = open_storage(target_path), f"the worker on node {_node_id()} (host {socket.gethostname()})"
        try:
            found = storage.exists("zarr.json")
        except StoreError as e:  # the object store cannot be reached from here
            raise StoreNotShared(f"{where}: {e}") from None
        if not found:
            raise StoreNotShared(f"{where} finds no Zarr group at {target_path}: {_shared_hint(str(target_path))}")
        self.target = TiledArray(storage, name, group=zarr.open_group(storage.zarr_store(read_only=False), mode="r+"))
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, bi: int, bj: int) -> dict:
        """Compute tile (bi, bj) of the target array, write it durably with its record; return a small status."""
        t0 = time.perf_counter()
        tile, read = self.source.tile(self.target.block_range(bi), self.target.block_range(bj))
        t1 = time.perf_counter()
        try:
            crc = self.target.write_tile(bi, bj, tile)
        except OSError as e:  # zarr's ENOSPC names no file: name the target's folder
            if e.errno == errno.ENOSPC:
                raise DiskFull(self.target.path) from None
            raise
        t2 = time.perf_counter()
        return {"tile": (bi, bj), "name": self.target.name, "crc32": crc, "read_s": read,
                "compute_s": t1 - t0 - read, "write_s": t2 - t1, "worker": self.worker_id, "node": _node_id(),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _open_same_store(store_path, fingerprint: str | None) -> Store:
    """The store at store_path, checked to be the driver's (same manifest fingerprint) when fingerprint is given."""
    where = f"the worker on node {_node_id()} (host {socket.gethostname()})"
    shared = _shared_hint(store_path)
    try:
        store = open_store(store_path, mode="r")  # a tile source only reads; the target array is opened for writing
    except (StoreError, OSError) as e:
        raise StoreNotShared(f"{where} cannot open the store at {store_path} ({e}): {shared}") from None
    if fingerprint is not None and store.manifest["fingerprint"] != fingerprint:
        raise StoreNotShared(f"{where} sees another store at {store_path} (its manifest fingerprint differs from "
                             f"the driver's): {shared}")
    return store


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return socket.gethostname()


def make_ray_worker():
    """The Ray actor class: restarted when its process dies (WORKER_RESTARTS times), and its unfinished tiles are
    retried. A worker that does not see the driver's store raises StoreNotShared on every tile."""
    import ray

    @ray.remote(max_restarts=WORKER_RESTARTS, max_task_retries=-1)
    class TileWorker:
        def __init__(self, source, target_path, name, version, backend, threads):
            self.computer, self.problem = None, None
            if version != __version__:  # tiles of two kernel codes must never mix in one Gram
                self.problem = StoreNotShared(f"the worker on node {_node_id()} (host {socket.gethostname()}) runs "
                                              f"mnkpipe {__version__}, the driver {version}: install the same "
                                              "version on every node")
                return
            try:
                self.computer = TileComputer(source, target_path, name, backend, threads)
            except StoreNotShared as e:  # said by its first tile: an error in __init__ would reach the driver
                self.problem = e  # only as an ActorDiedError without its message

        def run(self, bi, bj):
            if self.problem:
                raise self.problem
            return self.computer.run(bi, bj)

    return TileWorker


__all__ = ["CNTKSource", "StoreNotShared", "TileComputer", "make_ray_worker"]
