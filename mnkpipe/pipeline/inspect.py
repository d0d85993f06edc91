"""`status` and `verify` of a store: what is done, how fast, and whether every done tile is intact."""

import time

import numpy as np

from ..store import RECORD_FILL, open_store, tile_crc
from .plan import tile_pairs


def store_status(store_path, name: str = "gram") -> dict:
    """Tiles done/total, pairs done/total, last rate, ETA, and the workers last seen (from the driver's progress)."""
    store = open_store(store_path)
    planned = store.planned_tiles(name)
    done = store.done_tiles(name)
    pairs_total = sum(tile_pairs(store, *t, name) for t in planned)
    pairs_done = sum(tile_pairs(store, *t, name) for t in planned if t in done)
    prog = store.progress(name)
    rate = prog.get("rate_pairs_per_s")
    return {
        "store": str(store.path), "array": name, "n_images": store.n, "tile_size": store.tile_size,
        "tiles_done": len(done & set(planned)), "tiles_total": len(planned),
        "pairs_done": pairs_done, "pairs_total": pairs_total,
        "rate_pairs_per_s": rate,
        "eta_s": (pairs_total - pairs_done) / rate if rate else None,
        "last_update": prog.get("updated"),
        "workers": prog.get("workers", {}),
        "lock": _lock_owner(store.path),
    }


def _lock_owner(path):
    from ..store import StoreLock
    return StoreLock(path).owner()


def format_status(s: dict) -> str:
    lines = [f"store      {s['store']}  ({s['array']}: {s['n_images']} images, tile {s['tile_size']})",
             f"tiles      {s['tiles_done']} / {s['tiles_total']} done",
             f"pairs      {s['pairs_done']:,} / {s['pairs_total']:,} ({100 * s['pairs_done'] / max(1, s['pairs_total']):.1f}%)"]
    if s["rate_pairs_per_s"]:
        lines.append(f"rate       {s['rate_pairs_per_s']:,.1f} pairs/s (last run)")
    if s["eta_s"] is not None and s["pairs_done"] < s["pairs_total"]:
        lines.append(f"ETA        {s['eta_s'] / 3600:.2f} h at that rate")
    if s["lock"]:
        lines.append(f"driver     pid {s['lock'].get('pid')} on {s['lock'].get('host')} since {s['lock'].get('started')}")
    for w, info in sorted(s["workers"].items()):
        ago = time.time() - info["last_seen"]
        lines.append(f"worker     {w} on node {info['node'][:12]}: {info['tiles']} tiles, last seen {ago:.0f} s ago")
    return "\n".join(lines)


def verify_store(store_path, name: str = "gram", repair: bool = False) -> dict:
    """Check each done tile: readable, CRC32 equal to its record, finite, diagonal tiles symmetric. repair: forget bad ones."""
    store = open_store(store_path, mode="r+" if repair else "r")
    arr, rec = store.array(name), store.records(name)
    bad = []
    checked = 0
    for bi, bj in store.planned_tiles(name):
        if rec[bi, bj] == RECORD_FILL:
            continue
        checked += 1
        try:
            tile = arr[store.block_range(bi, name), store.block_range(bj, name)]
        except Exception as e:  # noqa: BLE001 - any unreadable chunk is a bad tile
            bad.append({"tile": (bi, bj), "problem": f"unreadable chunk: {type(e).__name__}: {e}"})
            continue
        if tile_crc(tile) != rec[bi, bj]:
            bad.append({"tile": (bi, bj), "problem": "checksum differs from the tile's record"})
        elif not np.isfinite(tile).all():
            bad.append({"tile": (bi, bj), "problem": f"{int((~np.isfinite(tile)).sum())} non-finite values"})
        elif bi == bj and not np.array_equal(tile, tile.T):
            bad.append({"tile": (bi, bj), "problem": "diagonal tile is not symmetric"})
    if repair:
        for b in bad:
            store.clear_record(*b["tile"], name=name)
    return {"checked": checked, "bad": bad, "repaired": repair}
