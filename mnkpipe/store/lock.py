"""One driver per store: an exclusive lock file with owner info; a lock whose owner process is gone is stale."""

import json
import os
import socket
import time
from pathlib import Path


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


class StoreLock:
    """with StoreLock(store_path): ... -- creates <store>.lock beside the store with O_EXCL, removes it on exit."""

    def __init__(self, store_path, command: str = "", break_lock: bool = False):
        store_path = Path(store_path).resolve()
        self.store = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self.command = command
        self.break_lock = break_lock
        self.replaced: dict | None = None  # the stale owner we took over from, if any

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_stale(self, owner: dict) -> bool:
        """Stale: same host and its pid no longer runs. A lock from another host is never assumed stale."""
        return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": self.command}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner() or {}
                if self.break_lock or self.is_stale(owner):
                    self.replaced = owner
                    self.path.unlink(missing_ok=True)
                    continue
                raise StoreLockedError(
                    f"store {self.store} is being computed by another driver: pid {owner.get('pid')} on host "
                    f"{owner.get('host')}, started {owner.get('started')} ({owner.get('command', '')}). If that "
                    f"process is gone (e.g. on another host), rerun with --break-lock.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
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
