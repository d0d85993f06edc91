"""One driver per store: a lock file <store>.lock beside it with owner info; a lock whose owner is gone is stale.

A lock file is mnkpipe's only when it is a JSON object with "format": "mnkpipe-lock/1" and the fields of
LOCK_FIELDS; any other file at that path (a user's notes, an empty file) is never removed: the driver is refused,
naming it. The lock file appears whole: it is written and fsync'ed under a private name, then hard-linked into
place, which fails if a lock exists. Taking over a stale lock works across hosts without flock: the taker first
creates `<lock>.takeover-<token>` (a link, which fails if it exists; <token> is the stale lock's unique token), so
of several takers of one stale lock only one proceeds; it re-reads the lock, removes it only if it still holds that
token, links its own, and removes its takeover file.
"""

import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK_FORMAT = "mnkpipe-lock/1"
LOCK_FIELDS = {"format": str, "host": str, "pid": int, "started": str, "command": str, "token": str}


class StoreLockedError(RuntimeError):
    """Another live driver holds the store, or its lock cannot be taken over safely."""


def parse_lock(text: str) -> dict | None:
    """The owner info of a lock file's text when it is mnkpipe's (format and every field of LOCK_FIELDS), else None."""
    try:
        owner = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("format") != LOCK_FORMAT:
        return None
    if not all(isinstance(owner.get(k), t) and not isinstance(owner.get(k), bool) for k, t in LOCK_FIELDS.items()):
        return None
    return owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_state(owner: dict | None) -> str:
    """'alive', 'dead' (same host, pid gone), 'unknown' (another host) or 'foreign' (not an mnkpipe lock file)."""
    if owner is None:
        return "foreign"
    if owner.get("host") != socket.gethostname():
        return "unknown"
    return "alive" if _alive(int(owner.get("pid", 0))) else "dead"


class StoreLock:
    """with StoreLock(store_path): ... -- holds <store>.lock beside the store, removes it on exit."""

    def __init__(self, store_path, command: str = "", break_lock: bool = False):
        store_path = Path(store_path).resolve()
        self.store = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self.command = command
        self.break_lock = break_lock
        self.replaced: dict | None = None  # the stale owner we took over from, if any
        self.me: dict | None = None

    def _text(self) -> str | None:
        """The lock file's text; None when there is none; undecodable bytes read as text no lock parses."""
        try:
            return self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def owner(self) -> dict | None:
        """The lock's owner info; None when there is no lock file or it is not mnkpipe's."""
        text = self._text()
        return None if text is None else parse_lock(text)

    def _link_new(self, target: Path, info: dict) -> bool:
        """Atomically create target holding info (written and fsync'ed under a private name, then hard-linked);
        False when target exists. Any other failure (e.g. a full disk) is an OSError naming target, and leaves no
        private file behind."""
        tmp = target.with_name(f"{target.name}.{info['token']}.tmp")
        data = json.dumps(info).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # the lock's bytes reach the disk before its name: never an empty lock after a crash
            finally:
                os.close(fd)
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise OSError(e.errno, f"cannot write the lock file {target}: {e.strerror or os.strerror(e.errno)}") \
                from None
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict) -> bool:
        """Replace the lock file holding `stale` by ours; False when another process got there first. Only the
        creator of <lock>.takeover-<stale token> may remove that lock, and only while it still holds that token."""
        key = self.path.with_name(f"{self.path.name}.takeover-{stale['token']}")
        if not self._link_new(key, self.me):
            return False
        try:
            now = self.owner()
            if now is None or now["token"] != stale["token"]:
                return False  # removed or replaced meanwhile: no longer the lock we judged stale
            os.unlink(self.path)
            return self._link_new(self.path, self.me)  # False: a new driver placed its lock in between; it holds it
        finally:
            key.unlink(missing_ok=True)

    def _refusal(self, owner: dict | None, why: str = "") -> StoreLockedError:
        if owner is None:
            return StoreLockedError(
                f"{self.path} exists but is not an mnkpipe lock file (it has no \"format\": \"{LOCK_FORMAT}\" with "
                f"{', '.join(k for k in LOCK_FIELDS if k != 'format')}): mnkpipe does not remove it. Move it away if "
                "it is yours, or delete it if it is a lock of an mnkpipe older than this one and no driver runs")
        return StoreLockedError(
            f"store {self.store} is being computed by another driver: pid {owner['pid']} on host {owner['host']}, "
            f"started {owner['started']} ({owner['command']}){why}")

    def acquire(self) -> None:
        """Create the lock; take over a stale one (owner gone on this host, or on another host with break_lock);
        StoreLockedError otherwise (a live owner, a file not mnkpipe's, or another taker won)."""
        self.me = {"format": LOCK_FORMAT, "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command, "token": uuid.uuid4().hex}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._link_new(self.path, self.me):
                return
            text = self._text()
            if text is None:
                continue  # released between our two calls: try again
            owner = parse_lock(text)
            state = owner_state(owner)
            if state == "foreign":
                raise self._refusal(None)
            if state == "alive":
                raise self._refusal(owner, ". It runs on this host: --break-lock does not take over a live driver"
                                    if self.break_lock else "")
            if state == "unknown" and not self.break_lock:
                raise self._refusal(owner, ". If that process is gone (it runs on another host), rerun with "
                                    "--break-lock")
            if self._take_over(owner):
                self.replaced = owner
                return
            raise self._refusal(self.owner() or owner, f" (another process took over the stale lock first; a "
                                f"takeover killed midway leaves {self.path.name}.takeover-{owner['token']}: remove it "
                                "if no mnkpipe runs)")
        raise StoreLockedError(f"could not take the lock {self.path}: it keeps changing")

    def release(self) -> None:
        owner = self.owner()
        if owner and self.me and owner["token"] == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

