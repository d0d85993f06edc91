"""The train x train meta-kernel Phi_train as a second tiled array `mnk` in the store, computed by the same driver."""

import numpy as np

from ..kernels import mnk
from ..store import StoreError, add_tiled_array
from .plan import plan_full

INF = mnk.INF


def mnk_settings(ridge: float = 1e-5, eta: float = INF, normalise: bool = True) -> dict:
    """What the stored Phi_train depends on (besides the Gram): ridge and eta of the inner operator, cosine K."""
    return {"ridge": float(ridge), "eta": str(float(eta)), "normalise_k": bool(normalise)}


def base_reader(store, max_bytes: float = 8e9):
    """The block reader K(rows, cols) of the stored Gram: from memory when it fits (max_bytes), else tile by tile."""
    if store.array("gram").nbytes <= max_bytes:
        g = store.read_gram()
        reader = lambda rows, cols: g[np.ix_(np.asarray(rows), np.asarray(cols))]  # noqa: E731
        reader.diag = np.diag(g).copy()
    else:
        def reader(rows, cols):
            return store.gram_block(rows, cols)
        reader.diag = np.concatenate([np.diag(store.gram_block(np.arange(r.start, r.stop), np.arange(r.start, r.stop)))
                                      for r in map(store.block_range, range(store.n_blocks))])
    return reader


def task_ops_list(kb, tasks, settings: dict):
    """TaskOps (T_tau, r_tau, ...) of every task in a TaskSet."""
    way = int(tasks.way)
    return [mnk.task_ops(kb, s, sl, q, ql, way=way, eta=float(settings["eta"]), ridge=settings["ridge"])
            for s, sl, q, ql in zip(tasks.support, tasks.support_labels, tasks.query, tasks.query_labels)]


def reader_for(store, settings: dict):
    kb = base_reader(store)
    return mnk.cosine_normalised(kb, kb.diag) if settings["normalise_k"] else kb


def prepare_mnk_array(store, settings: dict) -> None:
    """Create the `mnk` array (M x M, M = stacked training queries) with its plan, or check an existing one."""
    ep = store.episodes()
    m = int(ep.train.query.size)
    if "mnk" in store.root:
        have = dict(store.array("mnk").attrs.get("settings", {}))
        if have != settings:
            raise StoreError(f"the store's mnk array was computed with {have}, not {settings}; "
                             "evaluate with those settings or use a copy of the store")
        return
    add_tiled_array(store.root, "mnk", m, store.tile_size, "float64", plan_full(m, store.tile_size))
    store.array("mnk").attrs["settings"] = settings


_CACHE: dict = {}


def mnk_tile(store, bi: int, bj: int) -> np.ndarray:
    """Phi_train over stacked-query rows of block bi and columns of block bj (SPEC.md sec. 2)."""
    key = str(store.path)
    if key not in _CACHE:  # per worker process: the reader and the training TaskOps are built once
        settings = dict(store.array("mnk").attrs["settings"])
        kb = reader_for(store, settings)
        _CACHE.clear()
        _CACHE[key] = (kb, task_ops_list(kb, store.episodes().train, settings))
    kb, tasks = _CACHE[key]
    return mnk.phi_tile(kb, tasks, store.block_range(bi, "mnk"), store.block_range(bj, "mnk"))
