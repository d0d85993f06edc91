"""The Zarr v3 layout of one experiment (docs/store.md): images, scale maps, episodes, tiled Gram, tile records."""

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import zarr

from .. import __version__

RECORD_FILL = -1  # tile_crc32 value of a tile that is not done


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""


def tile_crc(tile: np.ndarray) -> int:
    """CRC32 of the tile's bytes as stored (C order, the store's dtype)."""
    return zlib.crc32(np.ascontiguousarray(tile).tobytes())


class Store:
    """One experiment's Zarr group. Gram tiles are chunks; a tile is done when its record in tile_crc32 is set."""

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"no mnkpipe store at {self.path} (no zarr.json); create one with `mnkpipe compute-kernel`")
        self.root = zarr.open_group(str(self.path), mode=mode)
        self.manifest = dict(self.root.attrs.get("manifest", {}))
        if not self.manifest:
            raise StoreError(f"{self.path} is a Zarr group but not an mnkpipe store (no manifest attribute)")

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def tile_size(self) -> int:
        return int(self.manifest["tile_size"])

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.tile_size)

    def block_range(self, b: int, name: str = "gram") -> slice:
        """Rows (or columns) of block b of the tiled array `name`."""
        n = self.n if name == "gram" else int(self.root[name].shape[0])
        return slice(b * self.tile_size, min((b + 1) * self.tile_size, n))

    def array(self, name: str):
        return self.root[name]

    def planned_tiles(self, name: str = "gram") -> list[tuple[int, int]]:
        """Upper-triangle tiles (bi <= bj) the plan asks for, row-major."""
        plan = self.root[f"{name}_plan"][...]
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(plan))]

    def records(self, name: str = "gram") -> np.ndarray:
        """(n_blocks, n_blocks) int64: the CRC32 of each done tile, RECORD_FILL where not done."""
        return self.root[f"{name}_crc32"][...]

    def done_tiles(self, name: str = "gram") -> set[tuple[int, int]]:
        rec = self.records(name)
        return {(int(i), int(j)) for i, j in zip(*np.nonzero(rec != RECORD_FILL))}

    def missing_tiles(self, name: str = "gram") -> list[tuple[int, int]]:
        done = self.done_tiles(name)
        return [t for t in self.planned_tiles(name) if t not in done]

    # -- reading ----------------------------------------------------------------------------------------------
    def images(self, idx=slice(None)) -> np.ndarray:
        return self.root["images"][idx]

    def scales(self, idx=slice(None)) -> np.ndarray:
        return self.root["scales"][idx]

    def episodes(self):
        from ..data import EpisodeSet
        if "episodes" not in self.root:
            raise StoreError(f"{self.path} holds no episodes")
        g = self.root["episodes"]
        arrays = {k: a[...] for k, a in g.arrays()}
        for split, sub in g.groups():
            arrays.update({f"{split}/{k}": a[...] for k, a in sub.arrays()})
        arrays["meta"] = np.array([g.attrs["meta"]])
        return EpisodeSet.from_arrays(arrays)

    def read_gram(self, name: str = "gram", max_bytes: float = 8e9) -> np.ndarray:
        """The full symmetric matrix (lower triangle by transposition); NaN where a tile is not computed."""
        arr = self.root[name]
        if arr.nbytes > max_bytes:
            raise StoreError(f"{name} is {arr.nbytes / 1e9:.1f} GB; read blocks with gram_block() instead")
        g = arr[...]
        lower = np.tril_indices(len(g), -1)
        upper_vals = g.T[lower]
        g[lower] = np.where(np.isnan(g[lower]), upper_vals, g[lower])
        return g

    def gram_block(self, rows, cols, name: str = "gram") -> np.ndarray:
        """K[rows][:, cols] for index arrays, reading only the upper tiles that hold them (lower ones transposed)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        arr, t = self.root[name], self.tile_size
        out = np.empty((len(rows), len(cols)), np.float64)
        rb, cb = rows // t, cols // t
        for bi in np.unique(rb):
            ri = np.nonzero(rb == bi)[0]
            for bj in np.unique(cb):
                ci = np.nonzero(cb == bj)[0]
                lo, hi = min(bi, bj), max(bi, bj)
                tile = arr[self.block_range(lo, name), self.block_range(hi, name)]
                if bi <= bj:
                    out[np.ix_(ri, ci)] = tile[np.ix_(rows[ri] - bi * t, cols[ci] - bj * t)]
                else:
                    out[np.ix_(ri, ci)] = tile[np.ix_(cols[ci] - bj * t, rows[ri] - bi * t)].T
        return out

    # -- writing (workers) -------------------------------------------------------------------------------------
    def write_tile(self, bi: int, bj: int, tile: np.ndarray, name: str = "gram") -> int:
        """Write one whole aligned chunk, make it durable (fsync), then set its record; returns the CRC32."""
        arr = self.root[name]
        tile = tile.astype(arr.dtype)
        arr[self.block_range(bi, name), self.block_range(bj, name)] = tile
        _fsync(self.path / name / "c" / str(bi) / str(bj))
        crc = tile_crc(tile)
        self.root[f"{name}_crc32"][bi, bj] = crc
        _fsync(self.path / f"{name}_crc32" / "c" / str(bi) / str(bj))
        return crc

    def clear_record(self, bi: int, bj: int, name: str = "gram") -> None:
        self.root[f"{name}_crc32"][bi, bj] = RECORD_FILL

    def set_progress(self, info: dict, name: str = "gram") -> None:
        """Driver-only (one driver holds the lock): rate, workers last seen, times; kept in the array's attributes."""
        self.root[name].attrs["progress"] = info

    def progress(self, name: str = "gram") -> dict:
        return dict(self.root[name].attrs.get("progress", {}))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add_tiled_array(root, name: str, n: int, tile_size: int, dtype: str, plan: np.ndarray) -> None:
    """A (n, n) array with one chunk per tile, no sharding, NaN fill; its plan and its per-tile records."""
    nb = -(-n // tile_size)
    root.create_array(name, shape=(n, n), chunks=(tile_size, tile_size), dtype=dtype, fill_value=np.nan,
                      compressors=None, config={"write_empty_chunks": True})
    root.create_array(f"{name}_plan", shape=(nb, nb), chunks=(nb, nb), dtype="bool", fill_value=False)[...] = plan
    root.create_array(f"{name}_crc32", shape=(nb, nb), chunks=(1, 1), dtype="int64", fill_value=RECORD_FILL,
                      compressors=None, config={"write_empty_chunks": True})


def create_store(path, experiment, *, config: dict, depth: int, tile_size: int, plan: np.ndarray,
                 dtype: str = "float64") -> Store:
    """Write a new store: images, scale maps, episodes, the empty Gram with its plan, and the manifest."""
    from ..kernels import scale_maps
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} exists and is not an mnkpipe store; refusing to write into it")
    root = zarr.open_group(str(path), mode="w-")  # never "w": it would empty the folder, lock included
    x = experiment.images
    n = len(x)
    root.create_array("images", data=x, chunks=(tile_size,) + x.shape[1:])
    sc = root.create_array("scales", shape=(n, depth - 1) + x.shape[2:], dtype="float32",
                           chunks=(tile_size, depth - 1) + x.shape[2:])
    for b in range(0, n, tile_size):  # in blocks: the scale maps of a big pool do not fit memory at once
        sc[b:b + tile_size] = scale_maps(x[b:b + tile_size], depth).astype(np.float32)
    root.create_array("val_images", data=experiment.val_images,
                      chunks=(max(1, min(len(experiment.val_images), 1024)),) + x.shape[1:])
    eg = root.create_group("episodes")
    for k, a in experiment.episodes.to_arrays().items():
        if k == "meta":
            eg.attrs["meta"] = str(a[0])
        else:
            eg.create_array(k, data=np.asarray(a))
    add_tiled_array(root, "gram", n, tile_size, dtype, plan)
    root.attrs["manifest"] = {
        "format": "mnkpipe-store/1",
        "mnkpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "fingerprint": experiment.fingerprint(),
        "n_images": n,
        "n_train_images": experiment.n_train_images,
        "tile_size": tile_size,
        "standardiser": {"mean": experiment.mean, "std": experiment.std},
        "sources": experiment.paths,
    }
    return Store(path, mode="r+")


def open_store(path, mode: str = "r") -> Store:
    """Open an existing store (mode 'r' or 'r+')."""
    return Store(path, mode=mode)


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {json.dumps(a)}, now {json.dumps(b)}")
    return out
