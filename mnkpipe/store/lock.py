"""One driver per store: a lock file <store>.lock beside it with owner info; a lock whose owner is gone is stale.

The lock file appears whole (written to a private file, then hard-linked into place, which fails if it exists).
Taking over a stale lock happens under an exclusive flock on the store's parent folder, re-reading the lock there,
so of several drivers racing for one stale lock exactly one wins.
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

UNREADABLE_STALE_S = 60.0  # an empty or unreadable lock file older than this is stale (a writer died mid-write)


class StoreLockedError(RuntimeError):
    """Another live driver holds the store."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_state(owner: dict | None) -> str:
    """'alive', 'dead' (same host, pid gone), 'unknown' (another host) or 'unreadable' for a lock's owner info."""
    if not owner or "pid" not in owner:
        return "unreadable"
    if owner.get("host") != socket.gethostname():
        return "unknown"
    try:
        return "alive" if _alive(int(owner["pid"])) else "dead"
    except (TypeError, ValueError):
        return "unreadable"


class StoreLock:
    """with StoreLock(store_path): ... -- holds <store>.lock beside the store, removes it on exit."""

    def __init__(self, store_path, command: str = "", break_lock: bool = False):
        store_path = Path(store_path).resolve()
        self.store = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self.command = command
        self.break_lock = break_lock
        self.replaced: dict | None = None  # the stale owner we took over from, if any

    def owner(self) -> dict | None:
        """The lock file's owner info; None when there is no lock file or it is empty or unreadable."""
        try:
            owner = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        return owner if isinstance(owner, dict) else None

    def is_stale(self, owner: dict | None) -> bool:
        """Stale: same host and its pid no longer runs, or an unreadable lock file older than a minute. A lock
        from another host is never assumed stale."""
        state = owner_state(owner)
        if state == "unreadable":
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_STALE_S
            except FileNotFoundError:
                return False
        return state == "dead"

    def _place(self, me: dict) -> bool:
        """Atomically create the lock file with our info; False when a lock file already exists."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, me: dict) -> dict | None:
        """Under a flock on the parent folder: if the lock is (still) stale, or broken with --break-lock, replace it
        by ours and return the old owner (None when we did not take it)."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            owner = self.owner()
            if not self.path.exists() or not (self.break_lock or self.is_stale(owner)):
                return None
            self.path.unlink()
            return (owner or {}) if self._place(me) else None
        finally:
            os.close(fd)  # closing releases the flock

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": self.command}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._place(me):
                return
            self.replaced = self._take_over(me)
            if self.replaced is not None:
                return
            if self.path.exists():
                owner = self.owner() or {}
                raise StoreLockedError(
                    f"store {self.store} is being computed by another driver: pid {owner.get('pid')} on host "
                    f"{owner.get('host')}, started {owner.get('started')} ({owner.get('command', '')}). If that "
                    f"process is gone (e.g. on another host), rerun with --break-lock.")
        raise StoreLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
