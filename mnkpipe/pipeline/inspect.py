"""`status` and `verify` of a store: what is done, how fast, and whether every done tile is intact."""

import time

import numpy as np
import zarr

from ..store import (RECORD_REPAIR, ObjectStorage, StoreError, TiledArray, find_tiled_arrays, open_storage, open_store,
                     tile_crc)


def store_status(store_path, name: str = "gram") -> dict:
    """Tiles and pairs done/total (done = record set and chunk object present), last rate, ETA, workers last seen,
    the lock's owner and whether it is alive, and the same for each meta-kernel group under <store>-results/phi/."""
    store = open_store(store_path)
    s = store.tiled(name).status()
    s.update(store=str(store.path), n_images=store.n, lock=lock_status(store.storage),
             meta_kernels=[tiled_status(g) for g in phi_groups(store.storage)])
    return s


def lock_status(store_path) -> dict | None:
    """The lock's owner info with 'state': alive, dead (stale), unknown (another host) or foreign (a file or object
    at the lock's path that is not mnkpipe's, with its 'path'); None if free."""
    return open_storage(store_path).lock_status()


def phi_groups(store_path) -> list:
    """Zarr groups <store>-results/phi/<key>/ (the meta-kernel arrays, kept outside the Gram store): folders beside
    a local store, URLs beside a store on S3."""
    storage = open_storage(store_path)
    if storage.path is None:
        results = ObjectStorage(storage.loc.sibling("-results"))
        return sorted(f"{results.url}/{k.removesuffix('/zarr.json')}" for k in results.sizes("phi/")
                      if k.count("/") == 2 and k.endswith("/zarr.json"))
    p = storage.path.resolve()
    phi = p.with_name(p.name + "-results") / "phi"
    return sorted(g for g in phi.glob("*") if (g / "zarr.json").is_file()) if phi.is_dir() else []


def tiled_status(group_path, name: str | None = None) -> dict:
    """Status of the tiled array `name` of any Zarr group (default: its only tiled array X, with X_plan, X_crc32)."""
    group = zarr.open_group(open_storage(group_path).zarr_store(), mode="r")
    if name is None:
        names = find_tiled_arrays(group)
        if not names:
            return {"group": str(group_path), "array": None, "error": "no tiled array (X with X_plan and X_crc32)"}
        name = names[0]
    return TiledArray(group_path, name, group=group).status()


def _progress_lines(s: dict) -> list[str]:
    lines = [f"tiles      {s['tiles_done']} / {s['tiles_total']} done",
             f"pairs      {s['pairs_done']:,} / {s['pairs_total']:,} "
             f"({100 * s['pairs_done'] / max(1, s['pairs_total']):.1f}%)"]
    if s["rate_pairs_per_s"]:
        lines.append(f"rate       {s['rate_pairs_per_s']:,.1f} pairs/s (last run)")
    if s["eta_s"] is not None and s["pairs_done"] < s["pairs_total"]:
        lines.append(f"ETA        {s['eta_s'] / 3600:.2f} h at that rate")
    return lines


def format_status(s: dict) -> str:
    lines = [f"store      {s['store']}  ({s['array']}: {s['n_images']} images, tile {s['tile_size']})"]
    lines += _progress_lines(s)
    lock = s["lock"]
    if lock:
        what = {"alive": "running", "dead": "NOT running: stale lock, the next compute-kernel takes it over",
                "unknown": "on another host: cannot tell whether it runs",
                "foreign": ""}[lock["state"]]
        if lock["state"] == "foreign":
            lines.append(f"driver     {lock['path']} is not an mnkpipe lock file: mnkpipe leaves it alone, and "
                         "refuses to compute this store until it is moved away")
        else:
            lines.append(f"driver     pid {lock['pid']} on {lock['host']} since {lock['started']}: {what}")
    else:
        lines.append("driver     none (not locked)")
    for w, info in sorted(s["workers"].items()):
        ago = time.time() - info["last_seen"]
        lines.append(f"worker     {w} on node {info['node'][:12]}: {info['tiles']} tiles, last seen {ago:.0f} s ago")
    for m in s["meta_kernels"]:
        if m.get("array") is None:
            lines.append(f"meta       {m['group']}: {m['error']}")
        else:
            lines.append(f"meta       {m['group']} ({m['array']}: {m['n']} rows, tile {m['tile_size']})")
            lines += ["  " + line for line in _progress_lines(m)]
    return "\n".join(lines)


def verify_store(store_path, name: str = "gram", inputs: bool = True) -> dict:
    """Read-only check: the input arrays against their checksums (unless inputs=False) and the plan against its
    digest (StoreError naming what differs); then each recorded tile: chunk present, readable, CRC32 equal to its
    record, finite, diagonal tiles symmetric. Tiles marked bad by an unfinished repair are bad too."""
    store = open_store(store_path)
    checked_inputs = store.check_inputs() if inputs else list(store.manifest.get("inputs", {}))
    ta = store.tiled(name)
    if not ta.plan().any():  # checked against its digest; a store made before the digest: a lost chunk plans nothing
        raise StoreError(f"{name}_plan of {store.path} plans no tile (its chunk is lost): "
                         f"run `mnkpipe verify --repair {store.path}`")
    arr, rec, present = ta.array, ta.records(), ta.present_chunks()
    bad = []
    checked = 0
    for bi, bj in ta.planned_tiles():
        if rec[bi, bj] == RECORD_REPAIR:
            bad.append({"tile": (bi, bj), "problem": "found bad by a repair that did not finish (not recomputed yet)"})
            continue
        if rec[bi, bj] < 0:
            continue
        checked += 1
        if (bi, bj) not in present:
            bad.append({"tile": (bi, bj), "problem": "unreadable chunk: file missing or of the wrong size"})
            continue
        try:
            tile = arr[ta.block_range(bi), ta.block_range(bj)]
        except Exception as e:  # noqa: BLE001 - any unreadable chunk is a bad tile
            bad.append({"tile": (bi, bj), "problem": f"unreadable chunk: {type(e).__name__}: {e}"})
            continue
        if tile_crc(tile) != rec[bi, bj]:
            bad.append({"tile": (bi, bj), "problem": "checksum differs from the tile's record"})
        elif not np.isfinite(tile).all():
            bad.append({"tile": (bi, bj), "problem": f"{int((~np.isfinite(tile)).sum())} non-finite values"})
        elif bi == bj and not np.array_equal(tile, tile.T):
            bad.append({"tile": (bi, bj), "problem": "diagonal tile is not symmetric"})
    notes = [] if checked_inputs else [f"{store.path} records no checksums of its input arrays (made before mnkpipe "
                                       "recorded them): images and scale maps were not checked"]
    return {"checked": checked, "bad": bad, "inputs_checked": checked_inputs, "notes": notes}
