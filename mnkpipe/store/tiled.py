"""Any Zarr group holding tiled arrays (`name`, `name_plan`, `name_crc32`, as made by add_tiled_array): the target
the tile driver writes into, be it a store's Gram or a meta-kernel group of a results folder."""

from pathlib import Path

import numpy as np
import zarr

from .layout import RECORD_FILL, StoreError, _fsync, tile_crc


class TiledGroup:
    """Tiles are whole chunks of a (n, n) array; a tile is done when its record in `name`_crc32 is set."""

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"no Zarr group at {self.path}")
        self.root = zarr.open_group(str(self.path), mode=mode)

    def tile_size(self, name: str) -> int:
        return int(self.root[name].chunks[0])

    def block_range(self, b: int, name: str) -> slice:
        """Rows (or columns) of block b of the tiled array `name`."""
        t, n = self.tile_size(name), int(self.root[name].shape[0])
        return slice(b * t, min((b + 1) * t, n))

    def planned_tiles(self, name: str) -> list[tuple[int, int]]:
        """Upper-triangle tiles (bi <= bj) the plan asks for, row-major."""
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(self.root[f"{name}_plan"][...]))]

    def done_tiles(self, name: str) -> set[tuple[int, int]]:
        rec = self.root[f"{name}_crc32"][...]
        return {(int(i), int(j)) for i, j in zip(*np.nonzero(rec != RECORD_FILL))}

    def missing_tiles(self, name: str) -> list[tuple[int, int]]:
        done = self.done_tiles(name)
        return [t for t in self.planned_tiles(name) if t not in done]

    def write_tile(self, bi: int, bj: int, tile: np.ndarray, name: str) -> int:
        """Write one whole aligned chunk, make it durable (fsync), then set its record; returns the CRC32."""
        arr = self.root[name]
        tile = tile.astype(arr.dtype)
        arr[self.block_range(bi, name), self.block_range(bj, name)] = tile
        _fsync(self.path / name / "c" / str(bi) / str(bj))
        crc = tile_crc(tile)
        self.root[f"{name}_crc32"][bi, bj] = crc
        _fsync(self.path / f"{name}_crc32" / "c" / str(bi) / str(bj))
        return crc

    def set_progress(self, info: dict, name: str) -> None:
        """Driver-only: rate, workers last seen, times; kept in the array's attributes."""
        self.root[name].attrs["progress"] = info

    def read_symmetric(self, name: str) -> np.ndarray:
        """The whole symmetric array from its upper tiles (lower triangle by transposition)."""
        a = self.root[name][...]
        lower = np.tril_indices(len(a), -1)
        a[lower] = a.T[lower]
        return a
