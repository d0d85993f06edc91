"""Where a store may live: a local folder (`~` expanded, made absolute, never a system folder or the home folder
itself), or, for the commands that compute, check and verify a store, s3://BUCKET/PREFIX."""

import os
from pathlib import Path

from .location import parse_location
from .errors import StoreError


def _protected() -> set[Path]:
    """The root, the home folder and every folder above it: a store there would mix its arrays with a user's or the
    system's files (and `<store>.lock`, `<store>-results` beside it would land outside any folder mnkpipe owns)."""
    home = Path.home().resolve()
    return {Path("/"), home, *home.parents}


def store_folder(text) -> Path:
    """The absolute local folder of `--store TEXT` (`~` and `~user` expanded); StoreError naming --store for a URL
    (never a local folder named `s3:`), the root,
    a folder directly under it (/usr, /etc, /bin, /tmp...) or the home folder and its parents."""
    if parse_location(text).is_s3:  # any other URL scheme is refused by parse_location itself
        raise StoreError(f"--store {text}: this command does not read stores on object storage yet (compute-kernel, "
                         "status and verify do): give a local folder, e.g. a copy of the store (docs/cluster.md)")
    path = Path(os.path.abspath(os.path.expanduser(str(text))))
    protected = _protected()
    if any(p in protected or p.parent == Path("/") for p in (path, path.resolve())):  # /bin links to /usr/bin
        shown = str(text) if str(text) == str(path) else f"{text} ({path})"
        raise StoreError(f"--store {shown} is a system folder or your home folder; mnkpipe refuses to make or use a "
                         "store there: give a new folder for the store, e.g. --store runs/omniglot.zarr")
    return path


def store_location(text) -> Path | str:
    """store_folder(text) for a local path; the URL s3://BUCKET/PREFIX (normalised) for a store on object storage."""
    loc = parse_location(text)
    return loc.url if loc.is_s3 else store_folder(text)
