"""A tiled (n, n) array X in a Zarr group with its siblings X_plan and X_crc32: tiles, records, checked reads."""

import hashlib
import zlib

import numpy as np
import zarr

from .errors import StoreError
from .storage import open_storage

RECORD_FILL = -1  # X_crc32 value of a tile that is not done
RECORD_REPAIR = -2  # X_crc32 value of a tile found bad and not recomputed yet (CRC32 values are >= 0)


def n_blocks(n: int, tile_size: int) -> int:
    """ceil(n / tile_size): the tiles along one side of an n x n array."""
    return -(-n // tile_size)


def tile_crc(tile: np.ndarray) -> int:
    """CRC32 of the tile's bytes as stored (C order, the store's dtype)."""
    return zlib.crc32(np.ascontiguousarray(tile).tobytes())


def plan_digest(plan: np.ndarray) -> dict:
    """What a plan is checked against: its shape, its tile count and the sha256 of its bytes (bool, C order)."""
    plan = np.ascontiguousarray(plan, dtype=bool)
    return {"shape": list(plan.shape), "tiles": int(plan.sum()), "sha256": hashlib.sha256(plan.tobytes()).hexdigest()}


def tiled_dimension_names(name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Zarr dimension names of X (n, n) and of X_plan / X_crc32 (nb, nb): unique within an array, shared by size."""
    return (f"{name}_i", f"{name}_j"), (f"{name}_block_i", f"{name}_block_j")


def add_tiled_array(root, name: str, n: int, tile_size: int, dtype: str, plan: np.ndarray) -> None:
    """A (n, n) array with one chunk per tile, no sharding, NaN fill; its plan and its per-tile records."""
    nb = n_blocks(n, tile_size)
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
    """Tiled array `name` of the Zarr group at `path` (a local path, URL or storage; opened as `group`). A tile
    (bi, bj) is one chunk object; it is done when its record X_crc32[bi, bj] is set and its chunk object is present
    with the size of one uncompressed chunk."""

    def __init__(self, path, name: str, group=None, repair_hint: str = "", plan_record: dict | None = None):
        self.storage = open_storage(path)
        self.path = self.storage.path or self.storage.url  # a Path for a local folder, the URL on object storage
        self.name = name
        self.group = group if group is not None else zarr.open_group(self.storage.zarr_store(), mode="r")
        for part in (name, f"{name}_plan", f"{name}_crc32"):
            if part not in self.group:
                raise StoreError(f"{self.path} holds no tiled array {name!r} (no {part!r} array)")
        self.array = self.group[name]
        self.crc = self.group[f"{name}_crc32"]  # opened once: each open reads metadata (a request on object storage)
        self.repair_hint = repair_hint
        self.plan_record = plan_record  # plan_digest of the plan as created; None: not recorded (not checked)

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def tile_size(self) -> int:
        return int(self.array.chunks[0])

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.n, self.tile_size)

    def block_range(self, b: int) -> slice:
        """Rows (or columns) of block b: [b t, min((b + 1) t, n))."""
        return slice(b * self.tile_size, min((b + 1) * self.tile_size, self.n))

    def tile_pairs(self, bi: int, bj: int) -> int:
        """Entries a tile computes: r c off the diagonal, r (r + 1) / 2 on it."""
        r = self.block_range(bi).stop - self.block_range(bi).start
        c = self.block_range(bj).stop - self.block_range(bj).start
        return r * (r + 1) // 2 if bi == bj else r * c

    def plan(self) -> np.ndarray:
        """X_plan as stored, checked against the plan's record when there is one (StoreError naming X_plan)."""
        what = f"{self.name}_plan of {self.path}"
        hint = self.repair_hint or "recreate the array"
        try:
            plan = self.group[f"{self.name}_plan"][...]
        except Exception as e:  # noqa: BLE001 - an undecodable plan chunk is a damaged plan
            raise StoreError(f"{what} is damaged ({type(e).__name__}: {e}): {hint}") from None
        if self.plan_record is not None and plan_digest(plan) != self.plan_record:
            raise StoreError(f"{what} is missing or damaged ({int(plan.sum())} tiles planned, the manifest records "
                             f"{self.plan_record['tiles']} and another checksum): {hint}")
        return plan

    def planned_tiles(self) -> list[tuple[int, int]]:
        """Upper-triangle tiles (bi <= bj) the plan asks for, row-major."""
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(self.plan()))]

    def records(self) -> np.ndarray:
        """(n_blocks, n_blocks) int64: the CRC32 of each done tile, RECORD_FILL where not done, RECORD_REPAIR where
        found bad and not recomputed yet."""
        return self.crc[...]

    def chunk_key(self, bi: int, bj: int) -> str:
        return f"{self.name}/c/{bi}/{bj}"

    def record_key(self, bi: int, bj: int) -> str:
        return f"{self.name}_crc32/c/{bi}/{bj}"

    def present_chunks(self) -> set[tuple[int, int]]:
        """Tiles whose chunk object exists with t * t * itemsize bytes (tiled arrays are not compressed): one listing
        of the array's chunks."""
        size = self.tile_size ** 2 * self.array.dtype.itemsize
        out = set()
        for key, n in self.storage.sizes(f"{self.name}/c").items():
            parts = key.split("/")
            if n == size and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
                out.add((int(parts[2]), int(parts[3])))
        return out

    def done_tiles(self) -> set[tuple[int, int]]:
        """Tiles with a record and a chunk object of the right size."""
        rec, present = self.records(), self.present_chunks()
        return {(int(i), int(j)) for i, j in zip(*np.nonzero(rec >= 0)) if (i, j) in present}

    def missing_tiles(self) -> list[tuple[int, int]]:
        done = self.done_tiles()
        return [t for t in self.planned_tiles() if t not in done]

    def damaged(self, bi: int, bj: int) -> StoreError:
        return StoreError(f"{self.name} tile ({bi}, {bj}) of {self.path} is missing or damaged (checksum differs "
                          f"from its record){': ' + self.repair_hint if self.repair_hint else ''}")

    def read_tile(self, bi: int, bj: int) -> np.ndarray:
        """Tile (bi, bj) as stored, checked against its CRC record; all NaN when it has no record (not done)."""
        rows, cols = self.block_range(bi), self.block_range(bj)
        rec = int(self.crc[bi, bj])
        if rec < 0:
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
                if rec[bi, bj] < 0:
                    a[block] = np.nan
                elif tile_crc(a[block]) != rec[bi, bj]:
                    raise self.damaged(bi, bj)
        return a

    def read_symmetric(self) -> np.ndarray:
        """read_all() with the lower triangle taken from the upper one (only upper tiles are written; the diagonal
        tiles hold both halves, equal)."""
        a = self.read_all()
        lower = np.tril_indices(len(a), -1)
        a[lower] = a.T[lower]
        return a

    def write_tile(self, bi: int, bj: int, tile: np.ndarray) -> int:
        """Write one whole aligned chunk, make it durable (fsync), then set its record; returns the CRC32."""
        tile = tile.astype(self.array.dtype)
        self.array[self.block_range(bi), self.block_range(bj)] = tile
        self.storage.sync(self.chunk_key(bi, bj))
        crc = tile_crc(tile)
        self.crc[bi, bj] = crc
        self.storage.sync(self.record_key(bi, bj))
        return crc

    def clear_record(self, bi: int, bj: int) -> None:
        self.crc[bi, bj] = RECORD_FILL

    def mark_for_repair(self, bi: int, bj: int) -> None:
        """Record tile (bi, bj) as bad (durably): not done, and recomputed by the next repair even if this one dies."""
        self.crc[bi, bj] = RECORD_REPAIR
        self.storage.sync(self.record_key(bi, bj))

    def tiles_to_repair(self) -> list[tuple[int, int]]:
        """Tiles marked bad by a repair and not recomputed yet, row-major."""
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(self.records() == RECORD_REPAIR))]

    def write_plan(self, plan: np.ndarray) -> None:
        """Rewrite X_plan (one chunk); only a plan equal to its record, when there is one (StoreError otherwise)."""
        if self.plan_record is not None and plan_digest(plan) != self.plan_record:
            raise StoreError(f"the plan rebuilt for {self.name}_plan of {self.path} differs from the one recorded in "
                             "its manifest: not written")
        self.group[f"{self.name}_plan"][...] = plan

    def set_progress(self, info: dict) -> None:
        """Driver-only (one driver holds the lock): rate, workers last seen, times; kept in the array's attributes."""
        self.array.attrs["progress"] = info

    def progress(self) -> dict:
        return dict(self.array.attrs.get("progress", {}))

    def status(self) -> dict:
        """Tiles and pairs done of the plan (done = record set and chunk object present), and the driver's progress."""
        planned = self.planned_tiles()
        done = self.done_tiles() & set(planned)
        pairs_total = sum(self.tile_pairs(*t) for t in planned)
        pairs_done = sum(self.tile_pairs(*t) for t in done)
        prog = self.progress()
        rate = prog.get("rate_pairs_per_s")
        return {"group": self.storage.url, "array": self.name, "n": self.n, "tile_size": self.tile_size,
                "tiles_done": len(done), "tiles_total": len(planned), "pairs_done": pairs_done,
                "pairs_total": pairs_total, "rate_pairs_per_s": rate,
                "eta_s": (pairs_total - pairs_done) / rate if rate else None,
                "last_update": prog.get("updated"), "workers": prog.get("workers", {})}


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
