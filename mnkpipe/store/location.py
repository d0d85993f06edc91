"""Where a store lives: a local folder, or s3://BUCKET/PREFIX on an S3-compatible object store.

Endpoint, region and credentials of an object store come from the standard AWS variables and files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP for an http endpoint), read
by obstore as boto and Ray read them. A URL with any other scheme is an error, never a local folder named after it.
"""

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .lock import StoreLockedError, owner_state
from .errors import StoreError

SUPPORTED = "a local path or s3://BUCKET/PREFIX"
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule: 3 to 63 of these, a letter or digit at
# each end (a server may take objects into a bucket named otherwise and list none of them back)


@dataclass(frozen=True)
class Location:
    """A store's place: `path` (an absolute local folder) or `bucket` and `prefix` on S3; `url` names either."""
    url: str
    path: Path | None = None
    bucket: str | None = None
    prefix: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def sibling(self, suffix: str) -> "Location":
        """The location whose name is this one's plus suffix (the results folder `<store>-results`, the lock)."""
        if self.is_s3:
            return Location(f"s3://{self.bucket}/{self.prefix}{suffix}", bucket=self.bucket,
                            prefix=self.prefix + suffix)
        return Location(str(self.path) + suffix, path=self.path.with_name(self.path.name + suffix))


def is_url(text) -> bool:
    """Whether text starts with a URL scheme (s3://, file://, gs://, ...), supported or not."""
    return bool(URL_SCHEME.match(str(text)))


def parse_location(text, option: str = "--store") -> Location:
    """Location of `--store TEXT` (or another option's): s3://BUCKET/PREFIX, file:///PATH or a plain path (made
    absolute); StoreError naming the option for any other URL scheme or an s3 URL without a bucket and a prefix."""
    text = str(text)
    m = URL_SCHEME.match(text)
    if not m:
        path = Path(os.path.abspath(os.path.expanduser(text)))
        return Location(str(path), path=path)
    scheme = m.group(1).lower()
    rest = text[m.end():]
    if scheme == "file":
        path = Path(os.path.abspath("/" + rest.lstrip("/")))
        return Location(str(path), path=path)
    if scheme not in ("s3", "s3a"):
        raise StoreError(f"{option} {text}: the URL scheme {scheme!r} is not supported; give {SUPPORTED}")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise StoreError(f"{option} {text}: an object store needs a bucket and a prefix inside it, "
                         "e.g. s3://my-bucket/runs/omniglot.zarr")
    if not BUCKET_NAME.match(bucket):
        raise StoreError(f"{option} {text}: {bucket!r} is not a bucket name S3 allows (3 to 63 lowercase letters, "
                         "digits, dots and hyphens, a letter or digit at each end)")
    return Location(f"s3://{bucket}/{prefix}", bucket=bucket, prefix=prefix)


def object_store(loc: Location, prefix: str | None = None):
    """obstore's S3Store for the bucket of loc under `prefix` (default: loc's own), configured from the AWS
    environment (an http endpoint needs AWS_ALLOW_HTTP=true, as for every client of the object_store crate)."""
    from obstore.store import S3Store
    return S3Store(loc.bucket, prefix=loc.prefix if prefix is None else prefix,
                   retry_config={"max_retries": 3, "backoff": {"init_backoff": _ms(100), "max_backoff": _ms(2000)},
                                 "retry_timeout": _ms(30_000)})


def _ms(n: int):
    from datetime import timedelta
    return timedelta(milliseconds=n)


def zarr_store(loc: Location, read_only: bool = True):
    """The Zarr store at loc: a LocalStore for a folder, an ObjectStore over obstore for S3."""
    from zarr.storage import LocalStore, ObjectStore
    if loc.is_s3:
        return ObjectStore(object_store(loc), read_only=read_only)
    return LocalStore(str(loc.path), read_only=read_only)


def describe_unreachable(loc: Location, err: Exception) -> str:
    """One line naming this host and the URL, for a process that cannot reach the object store or is refused by it."""
    return (f"host {socket.gethostname()} cannot reach or use {loc.url} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); "
            "check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ALLOW_HTTP there")


def probe_conditional_writes(loc: Location) -> None:
    """Check that the server honours create-if-absent and ETag-matched writes, which the driver lock needs;
    StoreError naming the endpoint when it ignores them (a lock there could let two drivers run at once)."""
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    store = object_store(loc, prefix="")
    key = f"{loc.prefix}.mnkpipe-probe-{uuid.uuid4().hex}"
    try:
        first = obstore.put(store, key, b"1", mode="create")
        for mode in ("create", {"e_tag": '"mnkpipe-not-the-etag"'}):
            try:
                obstore.put(store, key, b"2", mode=mode)
            except (AlreadyExistsError, PreconditionError):
                continue
            raise StoreError(f"the object store behind {loc.url} ignores conditional writes "
                             f"({'If-None-Match' if mode == 'create' else 'If-Match'}): mnkpipe's driver lock needs "
                             "them to keep a second driver out; use a server that honours them (AWS S3, MinIO, "
                             "SeaweedFS, Ceph RGW) or a local --store")
        obstore.put(store, key, b"3", mode={"e_tag": first["e_tag"]})
    finally:
        try:
            obstore.delete(store, key)
        except Exception:  # noqa: BLE001 - a probe object left behind is harmless; the probe's verdict stands
            pass


class ObjectLock:
    """with ObjectLock(loc): ... -- holds the object `<prefix>.lock` beside a store on S3, deleted on exit.

    Taken with a create-if-absent write; a stale lock (its owner's pid gone on this host), or any lock with
    break_lock whose owner is not alive on this host, is replaced only by a write that matches the ETag read, so of
    several drivers on any hosts racing for it exactly one wins."""

    def __init__(self, loc: Location, command: str = "", break_lock: bool = False):
        self.loc, self.command, self.break_lock = loc, command, break_lock
        self.store = object_store(loc, prefix="")
        self.key = f"{loc.prefix}.lock"
        self.url = f"s3://{loc.bucket}/{self.key}"
        self.me = {"format": "mnkpipe-lock/1", "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "token": uuid.uuid4().hex}
        self.replaced: dict | None = None

    def read(self) -> tuple[dict | None, str | None]:
        """(owner record, ETag) of the lock object; (None, None) when there is none."""
        import obstore
        try:
            got = obstore.get(self.store, self.key)
        except FileNotFoundError:  # obstore's "not found"
            return None, None
        try:
            owner = json.loads(bytes(got.bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            owner = None
        return (owner if isinstance(owner, dict) and owner.get("format") == "mnkpipe-lock/1" else None), \
            got.meta["e_tag"]

    def owner(self) -> dict | None:
        return self.read()[0]

    def acquire(self) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        body = json.dumps(self.me).encode()
        for _ in range(3):
            try:
                obstore.put(self.store, self.key, body, mode="create")
                return
            except AlreadyExistsError:
                pass
            owner, etag = self.read()
            if etag is None:
                continue  # released between our two requests: try to create it again
            if owner is None:
                raise StoreLockedError(f"{self.url} exists but is not an mnkpipe lock: mnkpipe does not remove "
                                       "what it did not write; remove it yourself if it is yours to remove")
            state = owner_state(owner)
            if state == "alive" or not (state == "dead" or self.break_lock):
                raise StoreLockedError(
                    f"store {self.loc.url} is being computed by another driver: pid {owner.get('pid')} on host "
                    f"{owner.get('host')}, started {owner.get('started')} ({owner.get('command', '')})"
                    + ("" if state == "alive" else ". If that process is gone, rerun with --break-lock."))
            try:
                obstore.put(self.store, self.key, body, mode={"e_tag": etag})
            except PreconditionError:
                continue  # another driver replaced it first: read again
            self.replaced = owner
            return
        raise StoreLockedError(f"could not take the lock {self.url}: other drivers kept changing it")

    def release(self) -> None:
        import obstore
        owner, _ = self.read()
        if owner and owner.get("token") == self.me["token"]:
            obstore.delete(self.store, self.key)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
