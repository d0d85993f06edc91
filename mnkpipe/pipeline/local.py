"""The tile loop without Ray: one process computes every missing tile of a store (for a GPU box without Ray)."""

import time

from tqdm import tqdm

from ..kernels.cntk import resolve_backend
from ..store import StoreLock
from ..workers.tile import CNTKSource, TileComputer
from .config import load_config
from .driver import prepare_store


def compute_local(config, store_path, *, backend: str = "cpu", data: str | None = None, progress: bool = True) -> dict:
    """Prepare the store (recording `backend`), check its inputs, then compute its missing Gram tiles in this process
    with `backend`; returns pairs/s."""
    cfg = load_config(config) if not hasattr(config, "compute") else config
    backend = resolve_backend(backend)
    with StoreLock(store_path, command=f"compute_local({backend})"):
        store = prepare_store(cfg, store_path, data=data, backend=backend)
        todo = store.missing_tiles()
        if todo:
            store.check_inputs()  # tiles computed from damaged images or scale maps would be wrong
        worker = TileComputer(CNTKSource(store_path), store_path, backend=backend)
        t0 = time.perf_counter()
        pairs = compute = 0.0
        for bi, bj in tqdm(todo, desc=f"tiles ({backend})", disable=not progress):
            status = worker.run(bi, bj)
            pairs += worker.target.tile_pairs(bi, bj)
            compute += status["compute_s"]
        seconds = time.perf_counter() - t0
    return {"tiles": len(todo), "pairs": int(pairs), "seconds": seconds, "compute_s": compute,
            "pairs_per_s": pairs / seconds if seconds else 0.0}
