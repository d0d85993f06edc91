"""Files written whole or not at all (the bottom layer: imports nothing from mnkpipe)."""

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(f) on a private temporary file beside `path`, then rename it over `path`: readers see the old file
    or the whole new one. On any failure or interruption the temporary file is removed and `path` is unchanged."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except Exception as e:  # a writer may say "disk full" in its own words (torch: "unexpected pos")
        full = disk_is_full(path.parent)
        Path(tmp).unlink(missing_ok=True)
        if (full or getattr(e, "errno", None) == errno.ENOSPC) and not isinstance(e, DiskFull):
            raise DiskFull(path.parent) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DiskFull(OSError):
    """No space left on the disk holding a folder, said in one line that names the folder."""

    def __init__(self, folder):
        super().__init__(errno.ENOSPC, "No space left on device", str(folder))

    def __reduce__(self):  # rebuilt from the folder alone (Ray sends a worker's errors to the driver pickled)
        return DiskFull, (self.filename,)

    def __str__(self):
        return (f"the disk holding {self.filename} is full: free space there and rerun the same command "
                "(finished work is kept)")


def disk_is_full(folder, reserve: int = 1 << 20) -> bool:
    """Less than `reserve` bytes (1 MiB) free on the disk holding folder: a failed write there is the full disk."""
    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False


def atomic_write_text(path, text: str) -> Path:
    """atomic_write of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path, what: str = ""):
    """The JSON document in the file at path; ValueError naming `what` (default: the file's name) and the path when
    it is not valid JSON (a truncated or damaged file), never json's bare 'Expecting value: line 1 column 1'."""
    import json
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what or path.name} at {path} is not valid JSON ({e}); it is damaged or was cut short: "
                         "restore it, or remove it to rebuild it") from None
