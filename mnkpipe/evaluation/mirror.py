"""Results on object storage: a results prefix s3://BUCKET/PREFIX (by default <store>-results beside a store on S3),
worked on through a local copy that is pulled before a command and pushed after it.

Every results item (meta-kernel groups, validation kernels, checkpoints, results.json and its rendering) is made by
the same code as on local disk, in the copy $MNKPIPE_CACHE/results/<hash of the URL>/. Pulling downloads the objects
that changed since this copy last saw them; pushing uploads the files that changed here, each as one whole object:
Zarr metadata first, tile chunks before their records, results.json last. results.json is written only if nobody
wrote it since the pull (its ETag); else the methods this run made are merged into the newer one and the tables
rendered again. A command that changes nothing (refused, or with read-only credentials) writes nothing there.
"""

import hashlib
import json
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ..data._io import default_cache_dir
from ..files import atomic_write, atomic_write_text, read_json
from ..store import StoreError
from ..store.location import Location, is_url, parse_location
from ..store.storage import ZARR_PARTIAL, ObjectStorage
from .derived import LOCKS, PARTIAL, RESULTS_FORMAT, RESULTS_MARKER
from .results import check_same_store, results_dir

STATE = ".mnkpipe-mirror.json"  # in the local copy: {key: size, mtime and ETag} of each object as last pulled/pushed
LOCAL_ONLY = (f"{LOCKS}/", f"{PARTIAL}/", "results.json.lock", STATE)  # never pushed
RESULTS = "results.json"
TRIES = 5  # conditional writes of results.json before giving up on a prefix other runs keep changing


def results_location(store=None, out=None) -> Location:
    """Where results go: --out (a local folder or s3://BUCKET/PREFIX), else <store>-results beside the store (on the
    same object store for a store on S3); ValueError for results inside a store on S3."""
    if store is None and out is None:
        raise ValueError("give --store or --out")
    store_loc = parse_location(store) if store is not None else None
    if out is not None and is_url(out):
        loc = parse_location(out, "--out")
    elif store_loc is not None and store_loc.is_s3 and out is None:
        loc = store_loc.sibling("-results")
    else:
        path = results_dir(store, out)
        return Location(str(path), path=path)
    if store_loc is not None and store_loc.is_s3 and loc.is_s3 and loc.bucket == store_loc.bucket and \
            (loc.prefix + "/").startswith(store_loc.prefix + "/"):
        raise ValueError(f"results at {loc.url} would be inside the store {store_loc.url}: results live outside the "
                         f"store (default {store_loc.url}-results); give another --out")
    return loc


def local_copy(loc: Location) -> Path:
    """The folder holding the results at loc: itself when local, its local copy for an object store."""
    if not loc.is_s3:
        return loc.path
    return (default_cache_dir() / "results" / hashlib.sha256(loc.url.encode()).hexdigest()[:16]).resolve()


class LocalResults:
    """The local folder a command writes its results into (`folder`), and the Mirror behind it for an object store."""

    def __init__(self, folder: Path, mirror: "Mirror | None" = None):
        self.folder, self.mirror = folder, mirror

    @contextmanager
    def shared(self, path: Path):
        """with results.shared(group) as target: ... -- where Ray workers on any node write the tiles of the group
        at path (under folder): the path itself on local disk; on an object store the group's URL, after its files
        are pushed there, and its new tiles are pulled into the local copy after the body."""
        if self.mirror is None:
            yield path
            return
        key = Path(path).relative_to(self.folder).as_posix()
        self.mirror.push(under=key)
        yield f"{self.mirror.loc.url}/{key}"
        self.mirror.pull(under=key)


@contextmanager
def local_results(loc: Location, progress: bool = True, rerender=None):
    """with local_results(loc) as results: ... -- the LocalResults to write the results at loc into: loc's own folder
    on local disk; for an object store its local copy, pulled on entry and pushed on exit (also when the body fails:
    finished items are kept). rerender(folder) renders results.json's tables again after a merge."""
    if not loc.is_s3:
        yield LocalResults(loc.path)
        return
    mirror = Mirror(loc, progress)
    mirror.pull()
    ok = False
    try:
        yield LocalResults(mirror.folder, mirror)
        ok = True
    finally:
        if ok:
            mirror.push(rerender)
        else:  # the body's error is the news; a failed push is said in one line beside it
            try:
                mirror.push(rerender)
            except Exception as e:  # noqa: BLE001 - reported, the body's error propagates
                print(f"could not push the finished results to {loc.url}: {e}", file=sys.stderr)


class Mirror:
    """The local copy of the results prefix at loc, and what it last saw of each object (STATE)."""

    def __init__(self, loc: Location, progress: bool = True):
        self.loc, self.progress = loc, progress
        self.remote = ObjectStorage(loc)
        self.folder = local_copy(loc)
        self.seen: dict[str, dict] = {}
        self.base_methods: dict = {}  # results.json's methods as pulled: those that differ at push are this run's

    def pull(self, under: str = "") -> None:
        """Download every object (under the key `under`) changed since last seen; the first pull of a command checks
        first that the prefix is mnkpipe's and writable."""
        if under:
            listing = self.remote.listing(f"{under}/")
        else:
            listing = self._start()
        todo = [k for k, (size, etag) in listing.items()
                if not (self.seen.get(k, {}).get("etag") == etag and (self.folder / k).is_file())]
        for key in tqdm(todo, desc=f"pull {self.loc.url}", unit="object", disable=not self.progress or len(todo) < 20):
            data, etag = self.remote.get(key)
            path = self.folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(data))
            self._saw(key, etag)
        gone = [k for k in self.seen if k not in listing and k.startswith(f"{under}/" if under else "")]
        for key in gone:  # removed there since: removed here when unchanged
            if not self._changed(key):
                (self.folder / key).unlink(missing_ok=True)
            del self.seen[key]
        self._save()
        if not under and (self.folder / RESULTS).is_file():
            self.base_methods = read_json(self.folder / RESULTS).get("methods", {})

    def _start(self) -> dict:
        """Check the prefix is mnkpipe's and writable; make the local copy, read what it saw; the prefix's listing."""
        listing = self._check_ours()
        self._check_writable()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / RESULTS_MARKER).exists():  # the copy is mnkpipe's, as the prefix is (or will be)
            (self.folder / RESULTS_MARKER).write_text(f"local copy of the results at {self.loc.url}, made by mnkpipe\n")
        state = self.folder / STATE
        self.seen = read_json(state).get("objects", {}) if state.exists() else {}
        return listing

    def push(self, rerender=None, under: str = "") -> None:
        """Upload every file (under the key `under`) changed here since last seen, results.json last and only over
        the version pulled."""
        changed = self._changed_keys(under)
        if not changed or changed == [RESULTS_MARKER]:  # the marker alone is no result: nothing made, nothing written
            return
        if RESULTS_MARKER not in changed and self._changed(RESULTS_MARKER):
            changed.append(RESULTS_MARKER)  # pushed first with anything: the prefix is then known as mnkpipe's
        self._upload([k for k in changed if k != RESULTS])
        if not under and RESULTS in changed:
            self._push_results(rerender)
            self._upload(self._changed_keys())  # the tables, when a merge rendered them again
        self._save()

    def _check_ours(self) -> dict:
        """The prefix's listing; ValueError when it holds objects mnkpipe did not make (no marker, no results.json
        of mnkpipe's)."""
        listing = self.remote.listing()
        if listing and RESULTS_MARKER not in listing:
            try:
                ours = json.loads(self.remote.get(RESULTS)[0]).get("format") == RESULTS_FORMAT
            except (FileNotFoundError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise ValueError(f"{self.loc.url} holds objects mnkpipe did not make (no {RESULTS_MARKER} there); "
                                 "refusing to write there: give another --out")
        return listing

    def _check_writable(self) -> None:
        """Write and remove a probe object: refuse before any work when these credentials may not write here."""
        key = f".mnkpipe-probe-{uuid.uuid4().hex}"
        try:
            self.remote.put(key, b"")
            self.remote.delete(key)
        except StoreError as e:
            raise StoreError(f"cannot write the results to {self.loc.url}: {e}; or give a local --out") from None

    def _changed(self, key: str) -> bool:
        path, seen = self.folder / key, self.seen.get(key)
        if not path.is_file():
            return False
        st = path.stat()
        return seen is None or (st.st_size, st.st_mtime_ns) != (seen["size"], seen["mtime_ns"])

    def _changed_keys(self, under: str = "") -> list[str]:
        """Files changed here, less what is never pushed: locks, groups being built, and the temporary files a
        killed writer left (files.atomic_write's .NAME.*.tmp, zarr's NAME.<hex>.partial)."""
        files = [p for p in (self.folder / under).rglob("*") if p.is_file() and not ZARR_PARTIAL.search(p.name)
                 and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        keys = (p.relative_to(self.folder).as_posix() for p in files)
        return [k for k in keys if not k.startswith(LOCAL_ONLY) and self._changed(k)]

    def _upload(self, keys: list[str]) -> None:
        """PUT each key's file whole: the marker (the prefix is mnkpipe's), Zarr metadata, then chunks, then tile
        records (X_crc32), then results.json."""
        def order(k):
            return (k != RESULTS_MARKER, k == RESULTS, "_crc32/" in k, not k.endswith("zarr.json"), k)
        keys = sorted(keys, key=order)
        bar = tqdm(keys, desc=f"push {self.loc.url}", unit="object", disable=not self.progress or len(keys) < 20)
        for i, key in enumerate(bar):
            self._saw(key, self.remote.put(key, (self.folder / key).read_bytes()))
            if i % 100 == 99:  # a push cut short uploads only the rest next time
                self._save()

    def _push_results(self, rerender) -> None:
        """Write results.json over the version pulled (ETag-matched, or created when there was none); when another
        run wrote it since, merge this run's methods into theirs, render the tables again, and retry."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        path = self.folder / RESULTS
        seen = self.seen.get(RESULTS, {}).get("etag")
        for _ in range(TRIES):
            try:
                theirs, etag = self.remote.get(RESULTS)
            except FileNotFoundError:
                theirs, etag = None, None
            if etag is not None and etag != seen:
                self._merge_into(json.loads(theirs), path, rerender)
                seen = etag
            try:
                self._saw(RESULTS, self.remote.put(RESULTS, path.read_bytes(), if_match=etag, create=etag is None))
                return
            except (AlreadyExistsError, PreconditionError):
                continue  # another run wrote it in between: merge again
        raise StoreError(f"{self.loc.url}/{RESULTS} kept changing under {TRIES} tries; rerun the same command "
                         f"(its results are kept in {self.folder})")

    def _merge_into(self, theirs: dict, path: Path, rerender) -> None:
        """Write into path their results.json with the methods this run made or changed (since the pull)."""
        ours = read_json(path)
        check_same_store(f"{self.loc.url}/{RESULTS}", theirs, ours)
        mine = {k: v for k, v in ours["methods"].items() if self.base_methods.get(k) != v}
        merged = {**theirs, **{k: v for k, v in ours.items() if k != "methods"},
                  "methods": {**theirs.get("methods", {}), **mine}}
        atomic_write_text(path, json.dumps(merged, indent=1))
        if rerender:
            rerender(self.folder)

    def _saw(self, key: str, etag: str | None) -> None:
        st = (self.folder / key).stat()
        self.seen[key] = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _save(self) -> None:
        atomic_write_text(self.folder / STATE, json.dumps({"url": self.loc.url, "objects": self.seen}))
