"""The driver's Ray instance: a private local one by default, or a cluster joined on purpose with --address;
the CPUs and GPUs it can give; Ray's failures said in words, with what to run next.

A private instance is started with ray.init(address="local"): it never joins another Ray instance of the host
(neither RAY_ADDRESS nor the `ray start` cluster in /tmp/ray/ray_current_cluster), and it does not write
ray_current_cluster itself, so other users' plain ray.init() never joins it either.
"""

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

RAY_OPTIONS = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
RERUN = "Finished tiles are kept in the store; rerun the same command to resume."


class RayFailure(RuntimeError):
    """Ray could not run the job (or no longer could): what happened and what to run next."""


class NodeLost(Exception):
    """A process of the driver's private Ray instance (its GCS, raylet, ...) has ended."""


class HeldSignals:
    """with HeldSignals() as held: ... held.deliver() -- SIGINT and SIGTERM are held while the driver is inside Ray
    (waiting on it, starting or stopping it) and raised again, with the handlers from before (KeyboardInterrupt for
    Ctrl-C), by deliver() between Ray calls or at the end of the block: an exception raised by a handler inside
    ray.wait comes out as a SystemError, or is lost, and one inside ray.init or ray.shutdown leaves it half done."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        self.signum = signum

    def restore(self):
        """Put the handlers from before back, at the OS level too (ray.shutdown resets SIGTERM's to the default
        there while Python still reports its own)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()
        self.deliver()

    def deliver(self):
        """Raise a held signal again, now, with the handlers from before."""
        if self.signum is not None:
            signum, self.signum = self.signum, None
            self.restore()
            signal.raise_signal(signum)


def start_ray(address: str | None, *, cpus: int | None = None, gpus: int = 0) -> bool:
    """Start a private local Ray instance (address None) or join the cluster at address; False if Ray was up.
    Ctrl-C or SIGTERM while Ray starts is held, and raised once the instance is shut down again."""
    import ray
    if ray.is_initialized():
        return False
    with HeldSignals() as held, _without_ray_sigterm_handler():
        try:
            if address:
                ray.init(address=_reachable(address), **RAY_OPTIONS)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only instance of our own: no token
                # Ray starts its workers at nice 15: then every process at the default 0 (this driver too, training
                # an extractor beside its own meta-kernel workers) takes the CPUs from them (docs/benchmarks.md)
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(address="local", num_cpus=cpus or local_cpus(), num_gpus=gpus or None, **RAY_OPTIONS)
        except ConnectionError as e:
            raise RayFailure(f"could not join the Ray cluster at --address {address}: {e}") from None
        if held.signum is not None:  # stopped while Ray started: the caller never learns it started
            stop_ray()
    return True


@contextmanager
def _without_ray_sigterm_handler():
    """ray.init first makes SIGTERM sys.exit(15) wherever it lands, inside ray.init too: keep the caller's handler."""
    from ray._private import utils
    original, utils.set_sigterm_handler = utils.set_sigterm_handler, lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


def stop_ray() -> None:
    """Shut down the driver's connection, and its private instance if it started one; Ctrl-C or SIGTERM meanwhile
    is held and raised after.

    Stopped mid-job (Ctrl-C, SIGTERM, a failure), Ray's core worker logs to fd 2 that it cannot report the
    in-flight tiles any more; they are simply computed again on the rerun, so fd 2 is muted for the shutdown."""
    import ray
    sys.stderr.flush()
    saved = os.dup(2)
    with HeldSignals():
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            ray.shutdown()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def check_private_node() -> None:
    """Raise NodeLost when a process of the private instance this driver started has died: Ray itself declares
    the node dead only after its heartbeats time out, and its workers go on meanwhile. No-op for a cluster."""
    from ray._private import worker
    node = worker._global_node
    dead = node.dead_processes() if node is not None and node.head else []
    lost = sorted({kind for kind, _ in dead} & {"raylet", "gcs_server"})  # the node itself, not a helper process
    if lost:
        raise NodeLost(f"the private Ray instance lost its {' and '.join(lost)}")


def check_resources(address: str | None, cpus: int | None, gpus: int) -> None:
    """Refuse --cpus / --gpus that the machine (no address) or the cluster at address cannot give, before any
    work: --cpus above the CPUs there is refused, not capped (more single-threaded workers than cores would only
    slow every tile down; on a cluster they would wait for CPUs forever)."""
    if cpus is not None and cpus < 1:
        raise ValueError(f"--cpus must be at least 1 (got {cpus})")
    if gpus < 0:
        raise ValueError(f"--gpus must be 0 or more (got {gpus})")
    if not address:
        check_requested_counts("this machine", {"CPU": local_cpus(), "GPU": local_gpus() if gpus else 0},
                               cpus=cpus, gpus=gpus)
        return
    import ray
    started = start_ray(address)
    try:
        check_requested_counts(f"the Ray cluster at {address}", ray.cluster_resources(), cpus=cpus, gpus=gpus)
    finally:
        if started:
            stop_ray()


def check_requested_counts(where: str, resources: dict, *, cpus: int | None, gpus: int) -> None:
    """Refuse more CPUs or GPUs than `resources` (Ray's {"CPU": .., "GPU": ..}) of `where` hold."""
    have_cpus, have_gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus is not None and cpus > have_cpus:
        raise ValueError(f"--cpus {cpus} is more than the {have_cpus} CPUs of {where}; use --cpus {have_cpus} or "
                         "fewer (or leave it out to use them all)")
    if gpus > have_gpus:
        hint = " (--gpus needs cupy and a usable CUDA device: pip install 'mnkpipe[gpu]')" if have_gpus == 0 else ""
        raise ValueError(f"--gpus {gpus} asked for, but {where} has {have_gpus} usable GPUs{hint}")


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask), the size of a private instance by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def local_gpus() -> int:
    """CUDA devices cupy can use here; 0 without cupy or a working driver."""
    from ..kernels.cntk_cupy import available
    if not available():
        return 0
    import cupy
    return int(cupy.cuda.runtime.getDeviceCount())


def explain(e: Exception) -> str:
    """A Ray error in one or two sentences: what happened and what to run next."""
    import ray.exceptions as rx
    from ..files import DiskFull
    from ..store import StoreError
    if isinstance(e, NodeLost):
        return f"{e} (killed, or out of memory?). {RERUN}"
    if isinstance(e, rx.RayTaskError):
        cause = e.cause if isinstance(e.cause, Exception) else e
        if isinstance(cause, (StoreError, DiskFull)):  # ours, already in words (a worker that does not see the
            return str(cause)  # store, a full disk under the target)
        return f"a worker failed: {type(cause).__name__}: {_first_line(cause)}. {RERUN}"
    if isinstance(e, rx.NodeDiedError) or ("node" in str(e).lower() and "dead" in str(e).lower()):
        return f"a Ray node died (lost its raylet, or was declared dead under load). {RERUN}"
    if isinstance(e, (rx.RayActorError, rx.WorkerCrashedError)):
        return f"Ray workers kept dying (out of memory? see `dmesg` and the Ray logs in /tmp/ray). {RERUN}"
    return f"Ray failed: {type(e).__name__}: {_first_line(e)}. {RERUN}"


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def _reachable(address: str) -> str:
    """address, with "auto" resolved to the cluster of this host's last `ray start` (or $RAY_ADDRESS) and never to
    another user's private instance; fails at once, naming the address, when nothing listens there (ray.init
    would retry for minutes)."""
    target = address
    if address == "auto":
        from ray._common.utils import get_ray_address_file
        current = Path(get_ray_address_file(None))
        target = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.exists() else "")
        if not target:
            raise RayFailure("--address auto found no cluster started with `ray start` on this host (nor "
                             "$RAY_ADDRESS); start one with `ray start --head`, give HOST:PORT, or leave out "
                             "--address for a private local instance")
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise RayFailure(f"no Ray cluster answers at --address {address} ({getattr(e, 'strerror', None) or e}); "
                         "start one with `ray start --head --port=PORT` (docs/cluster.md), or leave out --address "
                         "for a private local instance") from None
    return target
