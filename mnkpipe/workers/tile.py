"""Compute one tile with a backend and write it to the store; the same code runs inside a Ray actor or without Ray."""

import os
import resource
import socket
import time

import numpy as np

from .. import __version__
from ..store import Store, StoreError, open_store

WORKER_RESTARTS = 3  # restarts of one worker process before its actor is dead and the driver restarts Ray


class StoreNotShared(StoreError):
    """A worker does not see the driver's store at the driver's path, or runs another mnkpipe version."""


class TileComputer:
    """Holds an open store (and, for cupy, the images resident on the GPU) and computes tiles of it."""

    def __init__(self, store_path, backend: str = "cpu", threads: int | None = None, fingerprint: str | None = None):
        self.store = _open_same_store(store_path, fingerprint)
        self.backend = backend
        k = self.store.manifest["config"]["kernel"]
        self.depth, self.gap, self.fix = int(k["depth"]), bool(k["gap"]), bool(k["fix"])
        if threads:
            import numba
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        self.engine = None
        if backend == "cupy":
            from ..kernels.cntk_cupy import CupyCNTK
            self.engine = CupyCNTK(self.store.images(), self.store.scales(), depth=self.depth, gap=self.gap,
                                   fix=self.fix)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def gram_tile(self, bi: int, bj: int) -> tuple[np.ndarray, float]:
        """K over the rows of block bi and the columns of block bj (upper triangle mirrored on the diagonal),
        and the seconds spent reading its inputs."""
        s = self.store
        r, c = s.block_range(bi), s.block_range(bj)
        if self.engine is not None:
            return self.engine.block(np.arange(r.start, r.stop), np.arange(c.start, c.stop), upper=bi == bj), 0.0
        from ..kernels import cntk_block
        t0 = time.perf_counter()
        x1, l1 = s.images(r), s.scales(r)
        x2, l2 = (x1, l1) if bi == bj else (s.images(c), s.scales(c))
        read = time.perf_counter() - t0
        return cntk_block(x1, l1, x2, l2, depth=self.depth, gap=self.gap, fix=self.fix, upper=bi == bj,
                          backend=self.backend), read

    def run(self, bi: int, bj: int, name: str = "gram") -> dict:
        """Compute tile (bi, bj) of array `name`, write it durably with its record; return a small status."""
        t0 = time.perf_counter()
        if name == "gram":
            tile, read = self.gram_tile(bi, bj)
        else:
            from ..pipeline.mnk_tiles import mnk_tile
            tile, read = mnk_tile(self.store, bi, bj), 0.0
        t1 = time.perf_counter()
        crc = self.store.write_tile(bi, bj, tile, name=name)
        t2 = time.perf_counter()
        return {"tile": (bi, bj), "name": name, "crc32": crc, "read_s": read, "compute_s": t1 - t0 - read,
                "write_s": t2 - t1, "worker": self.worker_id, "node": _node_id(),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _open_same_store(store_path, fingerprint: str | None) -> Store:
    """The store at store_path, checked to be the driver's (same manifest fingerprint) when fingerprint is given."""
    where = f"the worker on node {_node_id()} (host {socket.gethostname()})"
    shared = "the store must be on a filesystem every node can see, at the same path"
    try:
        store = open_store(store_path, mode="r+")
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
        def __init__(self, store_path, fingerprint, version, backend, threads):
            self.computer, self.problem = None, None
            if version != __version__:  # tiles of two kernel codes must never mix in one Gram
                self.problem = StoreNotShared(f"the worker on node {_node_id()} (host {socket.gethostname()}) runs "
                                              f"mnkpipe {__version__}, the driver {version}: install the same "
                                              "version on every node")
                return
            try:
                self.computer = TileComputer(store_path, backend, threads, fingerprint)
            except StoreNotShared as e:  # said by its first tile: an error in __init__ would reach the driver
                self.problem = e  # only as an ActorDiedError without its message

        def run(self, bi, bj, name="gram"):
            if self.problem:
                raise self.problem
            return self.computer.run(bi, bj, name)

    return TileWorker


__all__ = ["Store", "StoreNotShared", "TileComputer", "make_ray_worker"]
