"""What ties derived data to its store and what keeps it whole: the key of a store's Gram, the results folder's
marker (mnkpipe writes only into folders it made), one lock per derived item, and folders created whole or not at
all (built under <results>/.partial/, then renamed into place)."""

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..keys import settings_key
from ..store.location import is_url

RESULTS_MARKER = ".mnkpipe-results"  # written into a results folder when mnkpipe creates or first uses it
RESULTS_FORMAT = "mnkpipe-results/1"
PARTIAL = ".partial"  # <results>/.partial/: derived folders being built, renamed into place once whole
LOCKS = ".locks"  # <results>/.locks/: one lock file per derived item
# Config settings that say where or how the Gram was stored, not what it holds: left out of the Gram key.
NOT_IN_GRAM = {"data": ("root",), "compute": ("tile_size", "plan")}


def gram_settings(config: dict) -> dict:
    """The store config's settings that determine the Gram's values (every section, less locations and tiling)."""
    return {sec: {k: v for k, v in table.items() if k not in NOT_IN_GRAM.get(sec, ())}
            if isinstance(table, dict) else table for sec, table in config.items()}


def gram_key(fingerprint: str, config: dict) -> str:
    """sha256 of everything that determines a store's Gram: its fingerprint (images, episodes) and gram_settings."""
    ident = {"fingerprint": fingerprint, "settings": gram_settings(config)}
    return settings_key(ident, 64)


def store_gram_key(store) -> str:
    return gram_key(store.manifest["fingerprint"], store.manifest["config"])


def store_where(store) -> str:
    """How results name a store: its URL on object storage, its resolved folder on local disk."""
    return store.path if isinstance(store.path, str) else str(Path(store.path).resolve())


def made_by_mnkpipe(folder: Path) -> bool:
    """A folder holding the results marker, or a results.json that mnkpipe wrote (before the marker existed)."""
    if (folder / RESULTS_MARKER).is_file():
        return True
    try:
        return json.loads((folder / "results.json").read_text()).get("format") == RESULTS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_results_dir(out, store_path=None) -> Path:
    """out, resolved, when mnkpipe may write into it: outside the store, and new, empty or made by mnkpipe;
    ValueError naming the folder otherwise. Writes nothing."""
    out = Path(out).resolve()
    if store_path is not None and not is_url(store_path):  # a store on object storage holds no local folder
        store = Path(store_path).resolve()
        if out == store or store in out.parents:
            raise ValueError(f"results folder {out} is inside the store {store}: results live outside the store "
                             f"(default {store}-results); give another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"results folder {out} is a file; give another --out")
    if out.is_dir() and any(out.iterdir()) and not made_by_mnkpipe(out):
        raise ValueError(f"results folder {out} is not empty and was not made by mnkpipe (no {RESULTS_MARKER} in "
                         f"it); refusing to write into it: give another --out (or, if mnkpipe made it, create the "
                         f"empty file {out / RESULTS_MARKER})")
    return out


def claim_results_dir(out, store_path=None) -> Path:
    """check_results_dir, then create the folder if needed and mark it as mnkpipe's."""
    out = check_results_dir(out, store_path)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RESULTS_MARKER
    if not marker.exists():
        marker.write_text("results folder made by mnkpipe: evaluate, baselines and report write here\n")
    return out


def _beside(results: Path, path: Path, folder: str, suffix: str = "") -> Path:
    """<results>/<folder>/<path's parts under results joined by '-'><suffix>: phi/<key> -> .locks/phi-<key>.lock."""
    return Path(results) / folder / ("-".join(Path(path).relative_to(results).parts) + suffix)


@contextmanager
def held(results: Path, path: Path):
    """Hold the lock file <results>/.locks/<item>.lock while the derived item at path (under results) is made or
    completed: a second run on the same results folder waits (saying so once), then finds the item whole."""
    lock_path = _beside(results, path, LOCKS, ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for {path}: another mnkpipe run is making it", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def create_whole(results: Path, path: Path, build) -> None:
    """Make the folder `path` (under `results`) whole or not at all: build(tmp) fills <results>/.partial/<name>,
    which is then renamed to path; what an interrupted build left there is discarded first. Call it under
    held(results, path)."""
    path, tmp = Path(path), _beside(results, path, PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, path)
    try:
        tmp.parent.rmdir()  # only when empty: another run may be building something else there
    except OSError:
        pass
