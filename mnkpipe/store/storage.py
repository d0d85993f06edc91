"""Where a store's objects live, behind one small interface: a local folder, or a prefix on an S3-compatible store.

The Zarr layout (layout.py, tiled.py) is written once against it. Zarr reads and writes the arrays through
`zarr_store()`; the rest are the few operations the layout needs beside Zarr: whether an object exists and its
size, a marker object, making a write durable, removing what killed writers left, and the driver's lock.
Keys are relative to the store ("zarr.json", "gram/c/0/1").
"""

import os
import re
import shutil
from pathlib import Path

from .location import (Location, ObjectLock, describe_unreachable, is_url, object_store, parse_location,
                       probe_conditional_writes, zarr_store)
from .lock import StoreLock, owner_state
from .errors import StoreError

# zarr's LocalStore writes a file to <name>.<uuid4 hex>.partial, then renames it: what a killed writer leaves
ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


class LocalStorage:
    """A store in a local folder (one every Ray node sees at the same path, for workers on other nodes)."""
    noun = "folder"

    def __init__(self, path):
        self.path = Path(path)
        self.url = str(self.path)

    def zarr_store(self, read_only: bool = True):
        return zarr_store(Location(self.url, path=self.path), read_only=read_only)

    def where(self, key: str = "") -> str:
        """How messages name the object or folder at key."""
        return str(self.path / key) if key else self.url

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: size in bytes} of every object under prefix ("gram/c")."""
        folder = self.path / prefix
        if not folder.is_dir():
            return {}
        return {f.relative_to(self.path).as_posix(): f.stat().st_size for f in folder.rglob("*") if f.is_file()}

    def contents(self) -> str:
        """'none' (no folder, or an empty one), 'file' (a file, not a folder) or 'objects' (a folder with files)."""
        if self.path.exists() and not self.path.is_dir():
            return "file"
        return "objects" if self.path.is_dir() and any(self.path.iterdir()) else "none"

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, key: str, text: str) -> None:
        (self.path / key).write_text(text)

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.path)

    def sync(self, key: str) -> None:
        """fsync the object's file: the tile is on disk before its record is written."""
        fd = os.open(self.path / key, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_partials(self, folders: list[str]) -> list[Path]:
        """Delete the temporary files killed zarr writers left: zarr.<32 hex>.partial in the store's folder, and
        <name>.<32 hex>.partial anywhere under `folders` (nothing else); return them."""
        gone = [f for f in self.path.glob("zarr.*.partial") if f.is_file() and ZARR_PARTIAL.search(f.name)]
        for folder in folders:
            gone += [f for f in (self.path / folder).rglob("*.partial")
                     if f.is_file() and not f.is_symlink() and ZARR_PARTIAL.search(f.name)]
        for f in gone:
            f.unlink(missing_ok=True)
        return gone

    def lock(self, command: str = "", break_lock: bool = False) -> StoreLock:
        """The driver lock: the file <store>.lock beside the folder."""
        return StoreLock(self.path, command=command, break_lock=break_lock)

    def lock_status(self) -> dict | None:
        """The lock's owner with 'state' (lock.owner_state), or {'path', 'state': 'foreign'}; None when free."""
        lock = StoreLock(self.path)
        if not lock.path.exists():
            return None
        owner = lock.owner()
        return dict(owner or {"path": str(lock.path)}, state=owner_state(owner))


class ObjectStorage:
    """A store under s3://BUCKET/PREFIX/ (AWS_* variables say where and as whom). Each object is written whole by
    one PUT, so there is nothing to make durable and no partial object a killed writer could leave."""
    noun = "prefix"

    def __init__(self, loc: Location):
        self.loc, self.url, self.path = loc, loc.url, None
        self.store = object_store(loc)

    def zarr_store(self, read_only: bool = True):
        from zarr.storage import ObjectStore
        return ObjectStore(self.store, read_only=read_only)

    def where(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def _call(self, what, *args, **kwargs):
        """obstore's `what`; StoreError naming this host and the URL when the server cannot be reached or refuses
        these credentials (FileNotFoundError passes: a missing object is an answer)."""
        try:
            return what(*args, **kwargs)
        except (FileNotFoundError, StoreError):
            raise
        except Exception as e:  # noqa: BLE001 - obstore's errors for a bad endpoint or credentials have no common base
            raise StoreError(describe_unreachable(self.loc, e)) from None

    def exists(self, key: str) -> bool:
        import obstore
        try:
            self._call(obstore.head, self.store, key)
        except FileNotFoundError:
            return False
        return True

    def sizes(self, prefix: str) -> dict[str, int]:
        return {k: size for k, (size, _) in self.listing(prefix).items()}

    def listing(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """{key: (size, ETag)} of every object under prefix."""
        import obstore
        return {o["path"]: (o["size"], o["e_tag"])
                for batch in self._call(lambda: list(obstore.list(self.store, prefix=prefix))) for o in batch}

    def get(self, key: str) -> tuple[bytes, str]:
        """(bytes, ETag) of the object at key; FileNotFoundError when there is none."""
        import obstore
        got = self._call(obstore.get, self.store, key)
        return bytes(self._call(got.bytes)), got.meta["e_tag"]

    def put(self, key: str, data: bytes, if_match: str | None = None, create: bool = False) -> str:
        """Write the object at key whole; only if its ETag is still if_match, or (create) if there is none. Returns
        the new ETag; obstore's PreconditionError / AlreadyExistsError when the condition fails."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        mode = "create" if create else ({"e_tag": if_match} if if_match else "overwrite")
        try:
            return obstore.put(self.store, key, data, mode=mode)["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            raise
        except Exception as e:  # noqa: BLE001 - as in _call
            raise StoreError(describe_unreachable(self.loc, e)) from None

    def contents(self) -> str:
        """'objects' when anything is stored under the prefix, else 'none'."""
        import obstore
        first = self._call(lambda: next(iter(obstore.list(self.store, chunk_size=1)), []))
        return "objects" if first else "none"

    def make(self) -> None:
        pass  # a prefix exists once an object is written under it

    def write_text(self, key: str, text: str) -> None:
        import obstore
        self._call(obstore.put, self.store, key, text.encode())

    def delete(self, key: str) -> None:
        import obstore
        self._call(obstore.delete, self.store, key)

    def remove_all(self) -> None:
        import obstore
        keys = list(self.sizes(""))
        for b in range(0, len(keys), 1000):
            self._call(obstore.delete, self.store, keys[b:b + 1000])

    def sync(self, key: str) -> None:
        pass  # a PUT is durable once the server answers it

    def remove_partials(self, folders: list[str]) -> list:
        return []

    def lock(self, command: str = "", break_lock: bool = False) -> ObjectLock:
        """The driver lock: the object <prefix>.lock, after a probe that the server honours conditional writes."""
        self._call(probe_conditional_writes, self.loc)
        return ObjectLock(self.loc, command=command, break_lock=break_lock)

    def lock_status(self) -> dict | None:
        lock = ObjectLock(self.loc)
        owner, etag = self._call(lock.read)
        if etag is None:
            return None
        return dict(owner or {"path": lock.url}, state=owner_state(owner))


Storage = LocalStorage | ObjectStorage


def open_storage(where) -> Storage:
    """The storage of a store: `where` is a Storage, a local path (kept as given) or a URL (parse_location)."""
    if isinstance(where, (LocalStorage, ObjectStorage)):
        return where
    if isinstance(where, Path) or not is_url(where):
        return LocalStorage(where)
    loc = parse_location(where)
    return ObjectStorage(loc) if loc.is_s3 else LocalStorage(loc.path)
