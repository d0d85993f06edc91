"""Meta-kernel arrays Phi_train (docs/math.md eqs. (9), (11)) as tiled Zarr groups under the results folder, never
in the store.

Each group <results>/phi/<key>/ holds one tiled array `mnk` (with `mnk_plan`, `mnk_crc32`) over the stacked queries
of its training tasks, and one attribute document written with the group: the store's Gram key (its fingerprint and
kernel settings), fingerprint and path, and every setting the key covers. A group is built under
<results>/.partial/ and renamed into place, so it is there whole or not at all. Its tiles are computed by the Ray
driver from a PhiSource, which reads only the Gram tiles it needs (a bounded cache of them), never the whole Gram.
"""

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zarr

from ..data import TaskSet
from ..kernels import mnk
from ..keys import settings_key
from ..memory import check_fits
from ..pipeline.plan import plan_full
from ..store import StoreError, TiledArray, add_tiled_array, open_store, symmetric_block
from .derived import create_whole, store_gram_key, store_where

INF = mnk.INF
ARRAY = "mnk"
FORMAT = "mnkpipe-phi/2"


def phi_settings(ridge: float = 1e-5, eta: float = INF, normalise: bool = True,
                 conventions: str = "formulas") -> dict:
    """What Phi_train depends on besides the Gram and the tasks: ridge and eta of the inner operator, cosine K, and
    conventions="authors" when asked (docs/conventions.md; absent for the formulas, whose groups keep their keys)."""
    s = {"ridge": float(ridge), "eta": str(float(eta)), "normalise_k": bool(normalise)}
    return s if conventions == "formulas" else {**s, "conventions": conventions}


class CachedGram:
    """The block reader K(rows, cols) of a store's Gram: whole upper tiles, each checked against its record when read
    (a StoreError names a damaged tile), kept until max_bytes, least recently used dropped; .diag is K_ii."""

    def __init__(self, store, max_bytes: float = 1e9):
        self.store, self.gram, self.max_bytes = store, store.tiled("gram"), max_bytes
        self.tiles: OrderedDict = OrderedDict()
        self.bytes = 0
        self.read_s = 0.0
        self.diag = np.concatenate([np.diag(self.tile(b, b)) for b in range(store.n_blocks)])

    def tile(self, bi: int, bj: int) -> np.ndarray:
        """Upper tile (bi <= bj) of the Gram."""
        key = (bi, bj)
        if key in self.tiles:
            self.tiles.move_to_end(key)
            return self.tiles[key]
        t0 = time.perf_counter()
        t = self.gram.read_tile(bi, bj).astype(np.float64)
        self.read_s += time.perf_counter() - t0
        self.tiles[key] = t
        self.bytes += t.nbytes
        while self.bytes > self.max_bytes and len(self.tiles) > 1:
            self.bytes -= self.tiles.popitem(last=False)[1].nbytes
        return t

    def __call__(self, rows, cols) -> np.ndarray:
        return symmetric_block(np.asarray(rows, np.int64), np.asarray(cols, np.int64), self.store.tile_size,
                               self.tile)


def kernel_reader(store, settings: dict, max_bytes: float = 1e9):
    """The (cosine-normalised when settings say so) base-kernel reader of a store, and its raw CachedGram."""
    gram = CachedGram(store, max_bytes)
    return normalised(gram, settings), gram


def normalised(raw, settings: dict):
    """The base-kernel reader the settings ask for over a raw reader with .diag: n(K), n(K + ridge I) or K."""
    if settings.get("conventions") == "authors":  # n(K + ridge I), docs/conventions.md
        return mnk.ridged_cosine_normalised(raw, raw.diag, settings["ridge"])
    return mnk.cosine_normalised(raw, raw.diag) if settings["normalise_k"] else raw


def task_ops_list(kb, tasks: TaskSet, settings: dict) -> list:
    """TaskOps (T_tau, r_tau with centred one-hot labels, ...) of every task in a TaskSet."""
    return [mnk.task_ops(kb, s, sl, q, ql, way=tasks.way, eta=float(settings["eta"]), ridge=settings["ridge"],
                         conventions=settings.get("conventions", "formulas"))
            for s, sl, q, ql in zip(tasks.support, tasks.support_labels, tasks.query, tasks.query_labels)]


class PhiSource:
    """Tile source (workers/tile.py) of Phi_train over the stacked queries of `tasks`, from the store's Gram."""

    def __init__(self, store_path, tasks: TaskSet, settings: dict, max_bytes: float = 1e9):
        self.store_path, self.tasks, self.settings, self.max_bytes = str(store_path), tasks, settings, max_bytes
        self.kb = self.gram = self.ops = None

    def start(self, backend: str) -> None:
        self.kb, self.gram = kernel_reader(open_store(self.store_path), self.settings, self.max_bytes)
        self.ops = task_ops_list(self.kb, self.tasks, self.settings)

    def tile(self, rows: slice, cols: slice) -> tuple[np.ndarray, float]:
        """Phi_train[rows, cols], and the seconds spent reading Gram tiles for it."""
        before = self.gram.read_s
        t = mnk.phi_tile(self.kb, self.ops, rows, cols)
        return t, self.gram.read_s - before


def phi_attrs(store, settings: dict, augment: int, subset=None, seed=None) -> dict:
    """What a Phi group covers: the store's Gram (its key: fingerprint and kernel settings; and where it was), the
    settings, and for augmented tasks (which depend on the training subset and the seed that drew them) those too."""
    a = {"format": FORMAT, "gram_key": store_gram_key(store), "gram_fingerprint": store.manifest["fingerprint"],
         "gram_store": store_where(store), **settings, "augment": int(augment)}
    if augment > 1:
        a.update(train_tasks=[int(i) for i in subset], seed=int(seed))
    return a


def covered(attrs: dict) -> dict:
    """The attributes a Phi group's key covers: all but the store's path (the same store, moved or named by another
    path, keeps its Phi)."""
    return {k: v for k, v in attrs.items() if k != "gram_store"}


def phi_key(attrs: dict) -> str:
    """Folder name of a Phi group: a hash of its covered attributes."""
    return settings_key(covered(attrs))


def phi_path(results: Path, attrs: dict) -> Path:
    return Path(results) / "phi" / phi_key(attrs)


def prepare_phi(results: Path, attrs: dict, tasks: TaskSet, tile_size: int) -> Path:
    """<results>/phi/<key>/ with its attributes and its empty tiled `mnk` array (full plan), created whole or not
    at all; or an existing group, its attributes checked. Call it holding the group's lock (derived.held)."""
    path = phi_path(results, attrs)
    if not (path / "zarr.json").exists():
        create_whole(results, path, lambda tmp: _new_group(tmp, attrs, int(tasks.query.size), tile_size))
    have = dict(zarr.open_group(str(path), mode="r").attrs)
    if covered(have) != covered(attrs):
        raise StoreError(f"{path} holds a meta-kernel array for other settings ({have}); move it away")
    return path


def _new_group(path: Path, attrs: dict, m: int, tile_size: int) -> None:
    """A Zarr group at path with attrs as its one attribute document and an empty (m, m) tiled `mnk` array."""
    root = zarr.create_group(str(path), attributes=attrs)
    add_tiled_array(root, ARRAY, m, tile_size, "float64", plan_full(m, tile_size))


def read_phi(path: Path) -> np.ndarray:
    """The whole Phi_train of a finished group (every tile checked against its record), lower triangle mirrored."""
    g = TiledArray(path, ARRAY, repair_hint="delete this group and rerun the same evaluate")
    check_fits(2 * 8 * g.n ** 2, f"the meta-kernel array {path} ({g.n} x {g.n}, float64, and its mirror)")
    missing = g.missing_tiles()
    if missing:
        raise StoreError(f"{path}: {len(missing)} meta-kernel tiles are not done; rerun the same evaluate")
    return g.read_symmetric()
