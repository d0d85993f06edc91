"""Compute one tile from a tile source and write it into a tiled array; the same code runs in a Ray actor or without.

A tile source is a picklable object with two methods, called in the worker process:
``start(backend)`` (once: open its inputs, build what every tile needs) and
``tile(rows, cols) -> (tile, seconds spent reading inputs)`` for contiguous slices of the target's rows and columns.
CNTKSource (below) gives the base kernel of a store's images; evaluation/ defines the meta-kernel source.
"""

import os
import resource
import socket
import time

import numpy as np
import zarr

from ..store import TiledArray, open_store


class CNTKSource:
    """K(x_i, x_j) over the store's images: the CNTK of its [kernel] config, on the CPU or (cupy) a GPU."""

    def __init__(self, store_path):
        self.store_path = str(store_path)
        self.store = self.engine = None

    def start(self, backend: str) -> None:
        self.store = open_store(self.store_path)
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
    """A started tile source and the open target group; computes tiles of the target array `name`."""

    def __init__(self, source, target_path, name: str = "gram", backend: str = "cpu", threads: int | None = None):
        self.target = TiledArray(target_path, name, group=zarr.open_group(str(target_path), mode="r+"))
        if threads:
            import numba
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        self.source = source
        self.source.start(backend)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, bi: int, bj: int) -> dict:
        """Compute tile (bi, bj) of the target array, write it durably with its record; return a small status."""
        t0 = time.perf_counter()
        tile, read = self.source.tile(self.target.block_range(bi), self.target.block_range(bj))
        t1 = time.perf_counter()
        crc = self.target.write_tile(bi, bj, tile)
        t2 = time.perf_counter()
        return {"tile": (bi, bj), "name": self.target.name, "crc32": crc, "read_s": read, "compute_s": t1 - t0 - read,
                "write_s": t2 - t1, "worker": self.worker_id, "node": _node_id(),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return socket.gethostname()


def make_ray_worker():
    """The Ray actor class: restarted when its process dies, and its unfinished tiles are retried."""
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=-1)
    class TileWorker:
        def __init__(self, source, target_path, name, backend, threads):
            self.computer = TileComputer(source, target_path, name, backend, threads)

        def run(self, bi, bj):
            return self.computer.run(bi, bj)

    return TileWorker


__all__ = ["CNTKSource", "TileComputer", "make_ray_worker"]
