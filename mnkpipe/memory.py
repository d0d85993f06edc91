"""How much memory this process may still allocate (the bottom layer: imports nothing from mnkpipe)."""

import resource
from pathlib import Path

GIB = 2 ** 30


class TooBigError(ValueError):
    """Arrays that would not fit in the memory this process may use; the message names the size at fault."""


def available_memory() -> tuple[float, str]:
    """(bytes, where from): the smallest of MemAvailable, the address-space limit (RLIMIT_AS) and the cgroup's
    memory.max less its memory.current."""
    import psutil
    limits = [(float(psutil.virtual_memory().available), "available memory")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((float(soft), "the address-space limit (ulimit -v)"))
    cg = Path("/sys/fs/cgroup")
    try:
        top = (cg / "memory.max").read_text().strip()
        if top != "max":
            limits.append((float(int(top) - int((cg / "memory.current").read_text())), "the cgroup memory limit"))
    except (OSError, ValueError):
        pass
    return min(limits)


def check_fits(nbytes: float, what: str) -> None:
    """TooBigError naming `what` when nbytes exceed the memory this process may still allocate."""
    free, source = available_memory()
    if nbytes > free:
        raise TooBigError(f"{what} needs about {nbytes / GIB:.1f} GiB of memory, more than the {free / GIB:.1f} GiB "
                          f"{source} allows; choose a smaller size")
