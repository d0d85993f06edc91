"""A driver racing for a store's lock, run as a script by the lock tests:

    python lock_racer.py STORE GO RELEASE [--break-lock]

It prints READY, waits for the file GO (so racers start within a few ms), tries StoreLock(STORE), prints LOCKED or
`WON <host> <pid>`, and a winner holds the lock until the file RELEASE exists. Removing `.lock` files is slowed down,
as on a slow file system, to widen the window between reading the lock and replacing it."""

import os
import sys
import time

from mnkpipe.store import StoreLock, StoreLockedError

_unlink = os.unlink


def slow_unlink(path, *a, **kw):
    if str(path).endswith(".lock"):
        time.sleep(0.3)
    return _unlink(path, *a, **kw)


def main(store: str, go: str, release: str, *flags: str) -> None:
    os.unlink = slow_unlink
    print("READY", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    try:
        lock = StoreLock(store, command="racer", break_lock="--break-lock" in flags)
        lock.acquire()
    except StoreLockedError:
        print("LOCKED", flush=True)
        return
    print("WON", os.uname().nodename, os.getpid(), flush=True)
    while not os.path.exists(release):  # hold the lock until every racer has tried
        time.sleep(0.05)
    lock.release()


if __name__ == "__main__":
    main(*sys.argv[1:])
