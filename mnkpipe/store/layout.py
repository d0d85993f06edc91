"""The Zarr v3 layout of one experiment (docs/store.md): images, scale maps, episodes, tiled Gram, tile records."""

import hashlib
import json
import time

import numpy as np
import zarr

from .. import __version__
from .errors import StoreError
from .storage import open_storage
from .tiled import TiledArray, add_tiled_array, n_blocks, plan_digest, symmetric_block

CREATION_MARKER = ".mnkpipe-creating"  # inside a store folder from its first write until its manifest is written
IMAGE_DIMS = ("image", "channel", "y", "x")
HASH_BLOCK_BYTES = 64 << 20  # input arrays are hashed in blocks of rows of about this size (bounded memory)


class Store:
    """One experiment's Zarr group, in a local folder or on object storage (`path`: a local path, URL or storage).
    Gram tiles are chunks; a tile is done when its record in gram_crc32 is set and its chunk object is present;
    reads check each tile against its record."""

    def __init__(self, path, mode: str = "r"):
        if mode not in ("r", "r+"):
            raise ValueError(f"a store is opened with mode 'r' or 'r+', not {mode!r}; create one with create_store() "
                             "(mode 'w' or 'a' could empty or change a finished store)")
        self.storage = open_storage(path)
        self.path = self.storage.path or self.storage.url  # a Path for a local folder, the URL on object storage
        if not self.storage.exists("zarr.json"):
            raise StoreError(f"no mnkpipe store at {self.path} (no zarr.json); "
                             "create one with `mnkpipe compute-kernel`")
        self.root = zarr.open_group(self.storage.zarr_store(read_only=mode == "r"), mode=mode)
        self._arrays = {}
        self.manifest = dict(self.root.attrs.get("manifest", {}))
        if not self.manifest and self.storage.exists(CREATION_MARKER):
            raise StoreError(f"{self.path} is an mnkpipe store being created, or whose creation was interrupted: "
                             "rerun the compute-kernel command that started it")
        if not self.manifest:
            raise StoreError(f"{self.path} is a Zarr group but not an mnkpipe store (no manifest attribute); "
                             "mnkpipe does not touch it: give a new or empty --store path")

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def tile_size(self) -> int:
        return int(self.manifest["tile_size"])

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.n, self.tile_size)

    @property
    def backend(self) -> str | None:
        """The CNTK backend the store's tiles are computed with ('cpu' or 'cupy'); None: not recorded (older store)."""
        return self.manifest.get("backend")

    def tiled(self, name: str = "gram") -> TiledArray:
        """The tiled array `name` of this store (its tiles, records and checked reads; the Gram's plan is checked
        against its record in the manifest)."""
        if name != "gram":
            return TiledArray(self.storage, name, group=self.root)
        return TiledArray(self.storage, name, group=self.root, repair_hint=f"run `mnkpipe verify --repair {self.path}`",
                          plan_record=self.manifest.get("plan"))

    def check_inputs(self) -> list[str]:
        """Recompute the sha256 of every input array (images, scale maps, val_images, episodes) and compare it with
        the manifest; StoreError naming the first that differs. Returns the names checked ([] for stores made
        before the manifest recorded them)."""
        recorded = self.manifest.get("inputs", {})
        for name, digest in recorded.items():
            try:
                now = array_sha256(self.root[name])
            except Exception as e:  # noqa: BLE001 - an undecodable or missing chunk is damage too
                now = f"unreadable ({type(e).__name__}: {e})"
            if now != digest:
                raise StoreError(f"{name} of {self.path} differs from its checksum in the manifest (a chunk "
                                 f"under {self.storage.where(name)} was changed or damaged): tiles computed from it "
                                 "would be wrong; nothing was computed. Rebuild the store with compute-kernel at a new "
                                 "--store path")
        return sorted(recorded)

    def remove_partial_files(self) -> list:
        """Delete the temporary chunk files killed zarr writers left in the store's arrays (needs the lock)."""
        folders = [name for name, _ in self.root.arrays()] + (["episodes"] if "episodes" in self.root else [])
        return self.storage.remove_partials(folders)

    def array(self, name: str):
        """The Zarr array `name`, opened once (each open reads its metadata: a request on object storage)."""
        if name not in self._arrays:
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def planned_tiles(self, name: str = "gram") -> list[tuple[int, int]]:
        """Upper-triangle tiles (bi <= bj) the plan asks for, row-major."""
        return self.tiled(name).planned_tiles()

    def records(self, name: str = "gram") -> np.ndarray:
        """(n_blocks, n_blocks) int64: the CRC32 of each done tile, RECORD_FILL where not done."""
        return self.tiled(name).records()

    def done_tiles(self, name: str = "gram") -> set[tuple[int, int]]:
        """Tiles with a record and a chunk file of the right size."""
        return self.tiled(name).done_tiles()

    def missing_tiles(self, name: str = "gram") -> list[tuple[int, int]]:
        return self.tiled(name).missing_tiles()

    # -- reading ----------------------------------------------------------------------------------------------
    def images(self, idx=slice(None)) -> np.ndarray:
        return self.array("images")[idx]

    def scales(self, idx=slice(None)) -> np.ndarray:
        return self.array("scales")[idx]

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
        """The full symmetric matrix (lower triangle by transposition); NaN where a tile is not computed. Every done
        tile is checked against its CRC record (StoreError naming a missing or damaged tile)."""
        arr = self.root[name]
        if arr.nbytes > max_bytes:
            raise StoreError(f"{name} is {arr.nbytes / 1e9:.1f} GB; read blocks with gram_block() instead")
        return self.tiled(name).read_symmetric()

    def gram_block(self, rows, cols, name: str = "gram") -> np.ndarray:
        """K[rows][:, cols] for integer index arrays, reading only the upper tiles that hold them (lower ones
        transposed), each checked against its CRC record; NaN in tiles not computed."""
        ta = self.tiled(name)
        rows, cols = _indices(rows, ta.n, "rows"), _indices(cols, ta.n, "cols")
        return symmetric_block(rows, cols, ta.tile_size, ta.read_tile)

    # -- writing (workers write tiles through tiled(name).write_tile) ------------------------------------------
    def clear_record(self, bi: int, bj: int, name: str = "gram") -> None:
        self.tiled(name).clear_record(bi, bj)

    def progress(self, name: str = "gram") -> dict:
        return self.tiled(name).progress()


def _indices(idx, n: int, what: str) -> np.ndarray:
    """A 1-D integer index array with every entry in [0, n); ValueError naming `what` otherwise (no masks, slices)."""
    if isinstance(idx, slice):
        raise ValueError(f"gram_block {what}: give an integer index array, not a slice (e.g. np.arange(a, b))")
    a = np.asarray(idx)
    if a.dtype == bool:
        raise ValueError(f"gram_block {what}: give integer indices, not a boolean mask (use np.nonzero(mask)[0])")
    if a.size == 0:
        a = a.astype(np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"gram_block {what}: need a 1-D array of integer indices, got shape {a.shape} of {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"gram_block {what}: indices must lie in [0, {n}), got {a.min()}..{a.max()}")
    return a.astype(np.int64)


def array_sha256(arr) -> str:
    """sha256 of a Zarr array's decoded values (C order, its dtype), read in blocks of rows."""
    h = hashlib.sha256()
    row_bytes = max(1, arr.nbytes // max(1, arr.shape[0])) if arr.ndim else 1
    step = max(1, HASH_BLOCK_BYTES // row_bytes)
    if arr.ndim == 0 or arr.shape[0] == 0:
        h.update(np.ascontiguousarray(arr[...]).tobytes())
    for b in range(0, arr.shape[0] if arr.ndim else 0, step):
        h.update(np.ascontiguousarray(arr[b:b + step]).tobytes())
    return h.hexdigest()


def input_digests(root) -> dict[str, str]:
    """sha256 of each input array of a store: images, scales, val_images and every episodes array."""
    names = [k for k in ("images", "scales", "val_images") if k in root]
    if "episodes" in root:
        names += [f"episodes/{k}" for k, _ in root["episodes"].arrays()]
        names += [f"episodes/{s}/{k}" for s, sub in root["episodes"].groups() for k, _ in sub.arrays()]
    return {name: array_sha256(root[name]) for name in sorted(names)}


def create_store(path, experiment, *, config: dict, depth: int, tile_size: int, plan: np.ndarray,
                 dtype: str = "float64", backend: str = "cpu") -> Store:
    """Write a new store into a new or empty folder (or prefix): the creation marker first, then images, scale maps,
    episodes, the empty Gram with its plan, then the manifest (with the backend and the checksums of inputs and
    plan), and only then remove the marker."""
    from ..kernels import scale_maps
    storage = open_storage(path)
    if storage.contents() != "none":
        raise StoreError(f"{storage.url} exists and is not an mnkpipe store; refusing to write into it (nothing was "
                         "changed)")
    storage.make()
    storage.write_text(CREATION_MARKER, "mnkpipe store being created; removed once its manifest is written\n")
    root = zarr.create_group(storage.zarr_store(read_only=False))  # never mode "w", which empties the folder
    x = experiment.images
    n = len(x)
    root.create_array("images", data=x, chunks=(tile_size,) + x.shape[1:], dimension_names=IMAGE_DIMS)
    sc = root.create_array("scales", shape=(n, depth - 1) + x.shape[2:], dtype="float32",
                           chunks=(tile_size, depth - 1) + x.shape[2:], dimension_names=("image", "layer", "y", "x"))
    for b in range(0, n, tile_size):  # in blocks: the scale maps of a big pool do not fit memory at once
        sc[b:b + tile_size] = scale_maps(x[b:b + tile_size], depth).astype(np.float32)
    root.create_array("val_images", data=experiment.val_images,
                      chunks=(max(1, min(len(experiment.val_images), 1024)),) + x.shape[1:],
                      dimension_names=("val_image",) + IMAGE_DIMS[1:])
    eg = root.create_group("episodes")
    for k, a in experiment.episodes.to_arrays().items():
        if k == "meta":
            eg.attrs["meta"] = str(a[0])
        else:
            a = np.asarray(a)
            eg.create_array(k, data=a, dimension_names=_episode_dims(k, a.ndim))
    add_tiled_array(root, "gram", n, tile_size, dtype, plan)
    root.attrs["manifest"] = {
        "format": "mnkpipe-store/1",
        "mnkpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "fingerprint": experiment.fingerprint(),
        "backend": backend,
        "inputs": input_digests(root),
        "plan": plan_digest(plan),
        "n_images": n,
        "n_train_images": experiment.n_train_images,
        "tile_size": tile_size,
        "standardiser": {"mean": experiment.mean, "std": experiment.std},
        "sources": experiment.paths,
    }
    storage.delete(CREATION_MARKER)
    return Store(storage, mode="r+")


def _episode_dims(key: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of an episodes array: 'train/support' (T, way*shot) -> ('train_task', 'train_support')."""
    if "/" not in key:  # way, shot, query, seed: (1,)
        return ("one",)[:ndim]
    split, what = key.split("/")
    item = what.removesuffix("_labels")  # support and support_labels share their items
    return (f"{split}_task", f"{split}_{item}")[:ndim]


def is_being_created(path) -> bool:
    """True for a store whose creation started (marker written) but never finished (no manifest yet)."""
    storage = open_storage(path)
    if not storage.exists(CREATION_MARKER):
        return False
    if not storage.exists("zarr.json"):
        return True
    return "manifest" not in zarr.open_group(storage.zarr_store(), mode="r").attrs


def open_store(path, mode: str = "r") -> Store:
    """Open an existing store (mode 'r' or 'r+' only: ValueError otherwise)."""
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
