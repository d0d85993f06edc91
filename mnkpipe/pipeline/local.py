"""The tile loop without Ray: compute_kernel with the LocalExecutor (for a GPU box without Ray)."""

from .config import load_config
from .driver import compute_kernel
from .executors import LocalExecutor


def compute_local(config, store_path, *, backend: str = "cpu", data: str | None = None, progress: bool = True) -> dict:
    """compute_kernel in this process with `backend` (recorded in the store): prepare the store, check its inputs,
    compute its missing Gram tiles; returns tiles, pairs, seconds, compute seconds and pairs/s."""
    cfg = load_config(config) if not hasattr(config, "compute") else config
    s = compute_kernel(cfg, store_path, data=data, progress=progress, executor=LocalExecutor(backend))
    seconds = s["seconds"]
    return {"tiles": s["tiles_computed"], "pairs": s["pairs_computed"], "seconds": seconds, "compute_s": s["compute_s"],
            "pairs_per_s": s["pairs_computed"] / seconds if seconds else 0.0}
