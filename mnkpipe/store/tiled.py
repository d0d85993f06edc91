"""A tiled (n, n) array X in a Zarr group with its siblings X_plan and X_crc32: tiles, records, checked reads."""

import os
import zlib
from pathlib import Path

import numpy as np
import zarr

RECORD_FILL = -1  # X_crc32 value of a tile that is not done


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""


def tile_crc(tile: np.ndarray) -> int:
    """CRC32 of the tile's bytes as stored (C order, the store's dtype)."""
    return zlib.crc32(np.ascontiguousarray(tile).tobytes())


def tiled_dimension_names(name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Zarr dimension names of X (n, n) and of X_plan / X_crc32 (nb, nb): unique within an array, shared by size."""
    return (f"{name}_i", f"{name}_j"), (f"{name}_block_i", f"{name}_block_j")


def add_tiled_array(root, name: str, n: int, tile_size: int, dtype: str, plan: np.ndarray) -> None:
    """A (n, n) array with one chunk per tile, no sharding, NaN fill; its plan and its per-tile records."""
    nb = -(-n // tile_size)
    dims, block_dims = tiled_dimension_names(name)
    root.create_array(name, shape=(n, n), chunks=(tile_size, tile_size), dtype=dtype, fill_value=np.nan,
                      compressors=None, config={"write_empty_chunks": True}, dimension_names=dims)
    root.create_array(f"{name}_plan", shape=(nb, nb), chunks=(nb, nb), dtype="bool", fill_value=False,
                      dimension_names=block_dims)[...] = plan
    root.create_array(f"{name}_crc32", shape=(nb, nb), chunks=(1, 1), dtype="int64", fill_value=RECORD_FILL,
                      compressors=None, config={"write_empty_chunks": True}, dimension_names=block_dims)


def find_tiled_arrays(group) -> list[str]:
    """Names X of the tiled arrays in a Zarr group: arrays with both siblings X_plan and X_crc32."""
    names = {k for k, _ in group.arrays()}
    return sorted(x for x in names if f"{x}_plan" in names and f"{x}_crc32" in names)


class TiledArray:
    """Tiled array `name` of the Zarr group at `path` (opened as `group`). A tile (bi, bj) is one chunk; it is done
    when its record X_crc32[bi, bj] is set and its chunk file is present with the size of one uncompressed chunk."""

    def __init__(self, path, name: str, group=None, repair_hint: str = ""):
        self.path = Path(path)
        self.name = name
        self.group = group if group is not None else zarr.open_group(str(self.path), mode="r")
        for part in (name, f"{name}_plan", f"{name}_crc32"):
            if part not in self.group:
                raise StoreError(f"{self.path} holds no tiled array {name!r} (no {part!r} array)")
        self.array = self.group[name]
        self.repair_hint = repair_hint

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def tile_size(self) -> int:
        return int(self.array.chunks[0])

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.tile_size)

    def block_range(self, b: int) -> slice:
        """Rows (or columns) of block b: [b t, min((b + 1) t, n))."""
        return slice(b * self.tile_size, min((b + 1) * self.tile_size, self.n))

    def tile_pairs(self, bi: int, bj: int) -> int:
        """Entries a tile computes: r c off the diagonal, r (r + 1) / 2 on it."""
        r = self.block_range(bi).stop - self.block_range(bi).start
        c = self.block_range(bj).stop - self.block_range(bj).start
        return r * (r + 1) // 2 if bi == bj else r * c

    def planned_tiles(self) -> list[tuple[int, int]]:
        """Upper-triangle tiles (bi <= bj) the plan asks for, row-major."""
        plan = self.group[f"{self.name}_plan"][...]
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(plan))]

    def records(self) -> np.ndarray:
        """(n_blocks, n_blocks) int64: the CRC32 of each done tile, RECORD_FILL where not done."""
        return self.group[f"{self.name}_crc32"][...]

    def chunk_path(self, bi: int, bj: int) -> Path:
        return self.path / self.name / "c" / str(bi) / str(bj)

    def chunk_present(self, bi: int, bj: int) -> bool:
        """Cheap check: the chunk file exists with t * t * itemsize bytes (tiled arrays are not compressed)."""
        try:
            size = os.stat(self.chunk_path(bi, bj)).st_size
        except FileNotFoundError:
            return False
        return size == self.tile_size ** 2 * self.array.dtype.itemsize

    def done_tiles(self) -> set[tuple[int, int]]:
        """Tiles with a record and a chunk file of the right size."""
        rec = self.records()
        return {(int(i), int(j)) for i, j in zip(*np.nonzero(rec != RECORD_FILL)) if self.chunk_present(i, j)}

    def missing_tiles(self) -> list[tuple[int, int]]:
        done = self.done_tiles()
        return [t for t in self.planned_tiles() if t not in done]

    def damaged(self, bi: int, bj: int) -> StoreError:
        return StoreError(f"{self.name} tile ({bi}, {bj}) of {self.path} is missing or damaged (checksum differs "
                          f"from its record){': ' + self.repair_hint if self.repair_hint else ''}")

    def read_tile(self, bi: int, bj: int) -> np.ndarray:
        """Tile (bi, bj) as stored, checked against its CRC record; all NaN when it has no record (not done)."""
        rows, cols = self.block_range(bi), self.block_range(bj)
        rec = int(self.group[f"{self.name}_crc32"][bi, bj])
        if rec == RECORD_FILL:
            return np.full((rows.stop - rows.start, cols.stop - cols.start), np.nan, self.array.dtype)
        try:
            tile = self.array[rows, cols]
        except Exception as e:  # noqa: BLE001 - an unreadable chunk is a damaged tile
            raise self.damaged(bi, bj) from e
        if tile_crc(tile) != rec:
            raise self.damaged(bi, bj)
        return tile

    def read_all(self) -> np.ndarray:
        """The whole array, every recorded tile checked against its CRC record, NaN in tiles not done."""
        a = self.array[...]
        rec = self.records()
        for bi in range(self.n_blocks):
            for bj in range(self.n_blocks):
                block = (self.block_range(bi), self.block_range(bj))
                if rec[bi, bj] == RECORD_FILL:
                    a[block] = np.nan
                elif tile_crc(a[block]) != rec[bi, bj]:
                    raise self.damaged(bi, bj)
        return a

    def write_tile(self, bi: int, bj: int, tile: np.ndarray) -> int:
        """Write one whole aligned chunk, make it durable (fsync), then set its record; returns the CRC32."""
        tile = tile.astype(self.array.dtype)
        self.array[self.block_range(bi), self.block_range(bj)] = tile
        _fsync(self.chunk_path(bi, bj))
        crc = tile_crc(tile)
        self.group[f"{self.name}_crc32"][bi, bj] = crc
        _fsync(self.path / f"{self.name}_crc32" / "c" / str(bi) / str(bj))
        return crc

    def clear_record(self, bi: int, bj: int) -> None:
        self.group[f"{self.name}_crc32"][bi, bj] = RECORD_FILL

    def set_progress(self, info: dict) -> None:
        """Driver-only (one driver holds the lock): rate, workers last seen, times; kept in the array's attributes."""
        self.array.attrs["progress"] = info

    def progress(self) -> dict:
        return dict(self.array.attrs.get("progress", {}))

    def status(self) -> dict:
        """Tiles and pairs done of the plan (done = record set and chunk file present), and the driver's progress."""
        planned = self.planned_tiles()
        done = self.done_tiles() & set(planned)
        pairs_total = sum(self.tile_pairs(*t) for t in planned)
        pairs_done = sum(self.tile_pairs(*t) for t in done)
        prog = self.progress()
        rate = prog.get("rate_pairs_per_s")
        return {"group": str(self.path), "array": self.name, "n": self.n, "tile_size": self.tile_size,
                "tiles_done": len(done), "tiles_total": len(planned), "pairs_done": pairs_done,
                "pairs_total": pairs_total, "rate_pairs_per_s": rate,
                "eta_s": (pairs_total - pairs_done) / rate if rate else None,
                "last_update": prog.get("updated"), "workers": prog.get("workers", {})}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def symmetric_block(rows: np.ndarray, cols: np.ndarray, tile_size: int, upper_tile) -> np.ndarray:
    """K[rows][:, cols] of a symmetric matrix kept as upper tiles: upper_tile(bi, bj) for bi <= bj, a lower tile
    (bi > bj) is upper_tile(bj, bi) transposed; rows and cols are int64 index arrays."""
    t = tile_size
    out = np.empty((len(rows), len(cols)), np.float64)
    rb, cb = rows // t, cols // t
    for bi in np.unique(rb):
        ri = np.flatnonzero(rb == bi)
        for bj in np.unique(cb):
            ci = np.flatnonzero(cb == bj)
            if bi <= bj:
                out[np.ix_(ri, ci)] = upper_tile(bi, bj)[np.ix_(rows[ri] - bi * t, cols[ci] - bj * t)]
            else:
                out[np.ix_(ri, ci)] = upper_tile(bj, bi)[np.ix_(cols[ci] - bj * t, rows[ri] - bi * t)].T
    return out
