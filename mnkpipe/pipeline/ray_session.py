"""The driver's Ray instance: a private local one by default, or a cluster joined on purpose with --address.

A private instance is started with ray.init(address="local"): it never joins another Ray instance of the host
(neither RAY_ADDRESS nor the `ray start` cluster in /tmp/ray/ray_current_cluster), and it does not write
ray_current_cluster itself, so other users' plain ray.init() never joins it either.
"""

import os

RAY_OPTIONS = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)


def start_ray(address: str | None, *, cpus: int | None = None, gpus: int = 0) -> bool:
    """Start a private local Ray instance (address None) or join the cluster at address; False if Ray was up."""
    import ray
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, **RAY_OPTIONS)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only instance of our own: no token needed
        ray.init(address="local", num_cpus=cpus or local_cpus(), num_gpus=gpus or None, **RAY_OPTIONS)
    return True


def stop_ray() -> None:
    """Shut down the driver's connection, and its private instance if it started one."""
    import ray
    ray.shutdown()


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask), the size of a private instance by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
