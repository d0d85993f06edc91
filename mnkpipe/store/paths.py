"""Where a store may live: a local folder (`~` expanded, made absolute, never a system folder or the home folder
itself), or s3://BUCKET/PREFIX."""

import os
from pathlib import Path

from .location import is_url, parse_location
from .errors import StoreError


def _protected() -> set[Path]:
    """The root, the home folder and every folder above it: a store there would mix its arrays with a user's or the
    system's files (and `<store>.lock`, `<store>-results` beside it would land outside any folder mnkpipe owns)."""
    home = Path.home().resolve()
    return {Path("/"), home, *home.parents}


def store_folder(text) -> Path:
    """The absolute local folder of `--store TEXT` (`~` and `~user` expanded); StoreError naming --store for the root,
    a folder directly under it (/usr, /etc, /bin, /tmp...) or the home folder and its parents."""
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
    if loc.is_s3:
        return loc.url
    return store_folder(loc.path if is_url(text) else text)  # file:///PATH: its path
