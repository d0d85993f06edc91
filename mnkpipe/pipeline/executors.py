"""How the missing tiles of a tiled array are computed: one job, run by one of two executors.

The job says what to do (the target array, its tile source, which tiles are still missing); an executor says how
(as rechunker separates its plan from its executors): the LocalExecutor computes them one after another in this
process, the RayExecutor spreads them over Ray workers and restarts Ray when it fails under the job. Either way each
tile is computed, written whole, recorded (its CRC32), then counted by the job's Progress.
"""

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from tqdm import tqdm

from .. import __version__
from .ray_session import (HeldSignals, NodeLost, RayFailure, check_private_node, check_requested_counts,
                          check_resources, explain, start_ray, stop_ray)

RESTARTS = 3  # restarts of Ray in a row, without a tile finished in between, before the driver gives up
SAVE_S = 2.0  # the driver saves the target's progress attribute at most this often (and at the end)


@dataclass
class TileJob:
    """Tiles of the tiled array `name` of the Zarr group at `target` (a path or URL every worker opens), computed by
    `source` (workers/tile.py); missing() lists those still to do, re-read from the target's records each call."""
    target: str
    name: str
    source: object
    missing: Callable[[], list[tuple[int, int]]]


class Progress:
    """The counts of one job (the summary the commands return), its progress bar, and the target's `progress`
    attribute (rate, workers last seen), which only the driver writes, at most every SAVE_S seconds."""

    def __init__(self, target, planned: list, todo: list, show: bool):
        self.target = target
        self.total = sum(target.tile_pairs(*t) for t in planned)
        done = self.total - sum(target.tile_pairs(*t) for t in todo)
        self.summary = {"tiles_planned": len(planned), "tiles_computed": 0, "tiles_skipped": len(planned) - len(todo),
                        "pairs_computed": 0, "seconds": 0.0, "compute_s": 0.0, "io_s": 0.0, "workers": {},
                        "restarts": 0, "pairs_done": done}
        self.t0 = time.time()
        self.last_save = 0.0
        self.bar = tqdm(total=self.total, initial=done, unit="pair", unit_scale=True, disable=not (show and todo),
                        desc=f"{target.name} tiles", dynamic_ncols=True, smoothing=0.1)

    def tile_done(self, status: dict) -> None:
        """Count one tile written and recorded by a worker (its status from TileComputer.run)."""
        s = self.summary
        pairs = self.target.tile_pairs(*status["tile"])
        s["tiles_computed"] += 1
        s["pairs_computed"] += pairs
        s["pairs_done"] += pairs
        s["compute_s"] += status["compute_s"]
        s["io_s"] += status["read_s"] + status["write_s"]
        seen = s["workers"].get(status["worker"], {})
        s["workers"][status["worker"]] = {"node": status["node"], "last_seen": time.time(),
                                          "tiles": seen.get("tiles", 0) + 1,
                                          "rss_mb": max(seen.get("rss_mb", 0), status["rss_mb"])}
        self.bar.update(pairs)

    def save(self, final: bool = False) -> None:
        """Write the target's progress attribute when SAVE_S passed since the last write, or when final."""
        now = time.time()
        if not final and now - self.last_save <= SAVE_S:
            return
        self.last_save = now
        s = self.summary
        s["seconds"] = now - self.t0  # the last save's: status shows the rate the command prints
        self.target.set_progress({"pairs_total": self.total, "pairs_done": s["pairs_done"], "updated": now,
                                  "rate_pairs_per_s": s["pairs_computed"] / max(s["seconds"], 1e-9),
                                  "workers": s["workers"]})

    def close(self) -> None:
        self.bar.close()


class Executor(Protocol):
    """Runs a TileJob: computes, writes and records every tile job.missing() lists, counting each in progress."""
    backend: str  # the CNTK backend its workers compute with ("cpu" or "cupy"), recorded in a new store

    def check(self) -> None:
        """Refuse resources that cannot be had, before anything is written."""

    def execute(self, job: TileJob, progress: Progress) -> None:
        """Compute every missing tile of job; progress.tile_done(status) after each."""


class LocalExecutor:
    """Every tile in this process, one after another, with `backend` (numba's threads, or cupy on a GPU): no Ray."""

    def __init__(self, backend: str = "cpu"):
        from ..kernels.cntk import resolve_backend
        self.backend = resolve_backend(backend)

    def check(self) -> None:
        pass

    def execute(self, job: TileJob, progress: Progress) -> None:
        from ..workers.tile import TileComputer
        computer = TileComputer(job.source, job.target, job.name, backend=self.backend)
        progress.summary["n_workers"] = 1
        for bi, bj in job.missing():
            progress.tile_done(computer.run(bi, bj))
            progress.save()


class RayExecutor:
    """Ray workers: one cupy actor per GPU (gpus > 0), else one single-threaded CPU actor per CPU, each with at most
    in_flight_per_worker tiles queued. When Ray fails under the job (a node declared dead, workers that keep dying),
    Ray is restarted (or the cluster rejoined) and the missing tiles dispatched again, at most `restarts` times in a
    row without a tile finished in between; then RayFailure says what happened."""

    def __init__(self, gpus: int = 0, cpus: int | None = None, address: str | None = None,
                 in_flight_per_worker: int = 2, restarts: int = RESTARTS):
        self.gpus, self.cpus, self.address = gpus, cpus, address
        self.in_flight_per_worker, self.restarts = in_flight_per_worker, restarts
        self.backend = "cupy" if gpus else "cpu"

    def check(self) -> None:
        check_resources(self.address, self.cpus, self.gpus)

    def execute(self, job: TileJob, progress: Progress) -> None:
        import ray.exceptions as rx
        if not self.address:
            check_resources(None, self.cpus, self.gpus)  # a cluster's resources are checked once joined
        failures = 0
        while True:
            before = progress.summary["tiles_computed"]
            started = start_ray(self.address, cpus=self.cpus, gpus=self.gpus)
            try:
                with HeldSignals() as held:
                    self._dispatch(deque(job.missing()), self._make_workers(job), progress, held)
                return
            except rx.RayTaskError as e:  # the tile code raised (the same on a retry)
                raise RayFailure(explain(e)) from None
            except (rx.RayError, NodeLost) as e:  # a node or workers lost
                failures = 1 if progress.summary["tiles_computed"] > before else failures + 1
                if not started or failures > self.restarts:
                    again = f" ({self.restarts} restarts of Ray in a row did not help)" if started else ""
                    raise RayFailure(explain(e) + again) from None
                progress.summary["restarts"] += 1
                print(f"\nRay failed under the job ({type(e).__name__}); restarting Ray and resuming "
                      f"({failures}/{self.restarts})", file=sys.stderr)
            finally:
                if started:
                    stop_ray()

    def _make_workers(self, job: TileJob) -> list:
        """The actors, each running this mnkpipe version; each starts the tile source (CNTKSource checks that it
        sees the driver's store) and opens the target."""
        import ray

        from ..workers.tile import make_ray_worker
        worker = make_ray_worker()
        args = (job.source, job.target, job.name, __version__)
        resources = ray.cluster_resources()
        check_requested_counts("the Ray cluster", resources, cpus=self.cpus, gpus=self.gpus)
        if self.gpus:
            return [worker.options(num_gpus=1, num_cpus=1).remote(*args, "cupy", 1) for _ in range(self.gpus)]
        n = self.cpus or int(resources["CPU"])
        return [worker.options(num_cpus=1).remote(*args, "cpu", 1) for _ in range(n)]

    def _dispatch(self, todo: deque, workers: list, progress: Progress, held) -> None:
        """Keep every worker busy with tiles from todo until all are written; raise a signal `held` (HeldSignals)
        between Ray calls."""
        import ray
        progress.summary["n_workers"] = len(workers)
        free = deque(w for w in workers for _ in range(self.in_flight_per_worker))
        pending = {}
        while todo or pending:
            while todo and free:
                w = free.popleft()
                bi, bj = todo.popleft()
                pending[w.run.remote(bi, bj)] = w
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            held.deliver()  # Ctrl-C or SIGTERM, raised here rather than inside ray.wait
            check_private_node()  # its workers can go on for a while without their raylet: do not wait for Ray
            for ref in ready:
                free.append(pending.pop(ref))
                progress.tile_done(ray.get(ref))
            progress.save()
