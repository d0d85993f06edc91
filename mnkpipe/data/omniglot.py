"""Omniglot (Lake et al. 2015): locate, download, list and load the official zips or their extracted folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from . import _io
from .dataset import DataError, DataNotFoundError, ImageDataset

__all__ = [
    "SPLITS",
    "OMNIGLOT_BASE_URL",
    "OMNIGLOT_FILES",
    "resolve_data_root",
    "load_omniglot",
    "omniglot_info",
    "omniglot_alphabets",
    "dataset_info",
    "default_data_root",
    "download_omniglot",
]

SPLITS = ("background", "evaluation", "background_small1", "background_small2")

OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"

# file name -> (path below the base URL, hashlib algorithm, digest of the OFFICIAL file). The digests check fresh
# downloads only; files already on disk are never re-checked (the offline copy's two full zips are rebuilt, not
# byte-equal).
OMNIGLOT_FILES: dict[str, tuple[str, str, str]] = {
    "images_background.zip": ("images_background.zip", "md5", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation.zip": ("images_evaluation.zip", "md5", "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1.zip": ("images_background_small1.zip", "md5", "e704a628b5459e08445c13499850abc4"),
    "images_background_small2.zip": ("images_background_small2.zip", "md5", "b75a71a51d3b13f821f212756fe481fd"),
    "all_runs.zip": (
        "one-shot-classification/all_runs.zip",
        "sha256",
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
    ),
}


def default_data_root() -> Path:
    """The per-user data folder: $MNKPIPE_CACHE/omniglot, else ~/.cache/mnkpipe/omniglot (`mnkpipe data download`)."""
    return _io.default_cache_dir() / "omniglot"


def resolve_data_root(data: str | os.PathLike | None = None) -> Path:
    """The data folder: the `data` argument if given, else $MNKPIPE_DATA, else default_data_root(); a
    DataNotFoundError naming what was tried and how to get the data."""
    env = os.environ.get("MNKPIPE_DATA")
    if data is not None:
        path, origin = Path(data).expanduser(), "the data argument (--data)"
    elif env:
        path, origin = Path(env).expanduser(), "$MNKPIPE_DATA"
    else:
        path, origin = default_data_root(), "the default, as neither --data nor $MNKPIPE_DATA is set"
    if not path.is_dir():
        kind = "is not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(
            f"data folder {path} (from {origin}, resolved to {path.absolute()}) {kind}. Get the Omniglot zips with "
            f"`mnkpipe data download` (into {default_data_root()}) or `mnkpipe data download --root DIR`, then pass "
            "--data DIR or set MNKPIPE_DATA=DIR")
    return path


def _split_name(split: str) -> str:
    """Validated split -> top-level name 'images_<split>'."""
    if split not in SPLITS:
        raise DataError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")
    return f"images_{split}"


def _split_tree(root: Path, split: str) -> tuple[str, Path, _io.Tree | None]:
    """Locate a split: ('folder', root/images_<split>, tree) when extracted, else ('zip', root/images_<split>.zip,
    None)."""
    top = _split_name(split)
    folder = root / top
    if folder.is_dir():
        return "folder", folder, _io.tree_from_folder(folder)
    zpath = root / f"{top}.zip"
    if zpath.is_file():
        return "zip", zpath, None
    raise DataNotFoundError(
        f"Omniglot split {split!r} not found in {root}: tried {zpath} and the extracted folder {folder}; "
        f"run `mnkpipe data download` or place {top}.zip there by hand"
    )


def _zip_tree(zf, top: str) -> _io.Tree:
    """Tree of a split zip below its top folder (or of the whole zip when it has no such folder)."""
    names = zf.namelist()
    tree = _io.tree_from_zip(names, (top,))
    return tree if tree.files else _io.tree_from_zip(names)


def _select_alphabets(entries: list[_io.ClassEntry], alphabets: Sequence[str] | None,
                      where: str) -> list[_io.ClassEntry]:
    """Keep only the classes of the requested alphabets (DataError naming unknown ones)."""
    if alphabets is None:
        return entries
    if isinstance(alphabets, str):
        alphabets = [alphabets]
    present = sorted({e.group for e in entries})
    missing = [a for a in alphabets if a not in present]
    if missing:
        raise DataError(f"alphabet(s) {missing} not in {where}; available: {', '.join(present)}")
    wanted = set(alphabets)
    return [e for e in entries if e.group in wanted]


def load_omniglot(
    root: str | os.PathLike | None,
    split: str = "background",
    *,
    image_size: int | None = 28,
    alphabets: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = False,
) -> ImageDataset:
    """One Omniglot split as an ImageDataset ("<Alphabet>/characterNN" classes, sorted), LANCZOS-resized, .npz-cached.

    Source: root/images_<split>/ if extracted, else root/images_<split>.zip. image_size=None keeps 105x105.
    cache_dir: None = $MNKPIPE_CACHE or ~/.cache/mnkpipe, False = no cache.
    """
    _io.check_image_size(image_size)
    root = resolve_data_root(root)
    top = _split_name(split)
    kind, src, tree = _split_tree(root, split)
    key = {"kind": "omniglot", "version": _io.CACHE_VERSION, "split": split, "image_size": image_size,
           "alphabets": sorted(alphabets) if alphabets is not None else None}
    stem = f"omniglot-{split}-{image_size or 'orig'}"
    if kind == "folder":
        entries = _select_alphabets(_io.index_tree(tree, str(src), layout="nested"), alphabets, str(src))
        key["source"] = _io.files_fingerprint(src, [f for e in entries for f in e.files])
        cache_file = _io.cache_path(cache_dir, stem, key)
        return _io.load_or_decode(
            cache_file, key, entries,
            read=lambda parts: src.joinpath(*parts).read_bytes(),
            name_of=lambda parts: "/".join((top,) + parts),
            image_size=image_size, progress=progress, desc=f"Omniglot {split}",
        )
    key["source"] = _io.file_fingerprint(src)
    cache_file = _io.cache_path(cache_dir, stem, key)
    hit = _io.load_cache(cache_file, key)
    if hit is not None:
        return hit
    with _io.open_zip(src) as zf:
        names = set(zf.namelist())
        prefix = (top,) if any(n.startswith(top + "/") for n in names) else ()
        entries = _select_alphabets(_io.index_tree(_zip_tree(zf, top), str(src), layout="nested"), alphabets, str(src))
        return _io.load_or_decode(
            cache_file, key, entries,
            *_io.zip_access(zf, prefix, src.name),
            image_size=image_size, progress=progress, desc=f"Omniglot {split}",
        )


def _split_entries(root: Path, split: str) -> tuple[Path, list[_io.ClassEntry]]:
    """(source, class entries) of a split from its folder or zip listing, without decoding any image."""
    kind, src, tree = _split_tree(root, split)
    if kind == "zip":
        with _io.open_zip(src) as zf:
            tree = _zip_tree(zf, _split_name(split))
    return src, _io.index_tree(tree, str(src), layout="nested")


def omniglot_alphabets(root: str | os.PathLike | None, split: str) -> list[str]:
    """Sorted alphabet names of an Omniglot split, read from its listing."""
    return sorted({e.group for e in _split_entries(resolve_data_root(root), split)[1]})


def omniglot_info(root: str | os.PathLike | None) -> list[dict]:
    """Per split present in root: {split, source, alphabets, characters, images}, counted from listings (no
    decoding)."""
    root = resolve_data_root(root)
    out = []
    for split in SPLITS:
        try:
            src, entries = _split_entries(root, split)
        except DataNotFoundError:
            continue
        out.append({
            "split": split,
            "source": str(src),
            "alphabets": len({e.group for e in entries}),
            "characters": len(entries),
            "images": sum(len(e.files) for e in entries),
        })
    return out


def dataset_info(root: str | os.PathLike | None) -> list[dict]:
    """Per split: {kind, split, source, groups, classes, images}. Omniglot splits when root holds any (groups =
    alphabets, classes = characters), else the class-folder dataset's splits: the sub-folders of root, or root
    itself when its sub-folders are the class folders."""
    root = resolve_data_root(root)
    rows = [{"kind": "omniglot", "split": r["split"], "source": r["source"], "groups": r["alphabets"],
             "classes": r["characters"], "images": r["images"]} for r in omniglot_info(root)]
    if rows:
        return rows
    tree = _io.tree_from_folder(root)
    kids = tree.children()
    top = kids[()][0]
    splits = [(".", root)] if any(kids[(d,)][1] for d in top) else [(d, root / d) for d in top]
    if not splits:
        raise DataError(f"{root} holds neither the Omniglot zips nor class folders (expected {root}/<split>/<class>/"
                        "*.png, or the Omniglot zips: run `mnkpipe data download`)")
    for name, path in splits:
        entries = _io.index_tree(_io.tree_from_folder(path), str(path))
        rows.append({"kind": "folder", "split": name, "source": str(path),
                     "groups": len({e.group for e in entries if e.group}),
                     "classes": len(entries), "images": sum(len(e.files) for e in entries)})
    return rows


def _manual_hint(root: Path, base_url: str) -> str:
    """How to place the Omniglot files by hand."""
    return (
        f"Download them by hand from {base_url} (all_runs.zip is under one-shot-classification/) "
        f"or from https://github.com/brendenlake/omniglot/tree/master/python, and copy the zips unchanged into {root} "
        "(or point --data / $MNKPIPE_DATA at a folder that holds them)."
    )


def download_omniglot(
    root: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 30,
    base_url: str = OMNIGLOT_BASE_URL,
    files: Sequence[str] | None = None,
    verify: bool = True,
) -> list[Path]:
    """Download the Omniglot zips (all OMNIGLOT_FILES, or `files`) into root, skipping present ones; returns their
    paths.

    pooch fetches each into a temporary file, checks the official checksum (default base_url, verify=True) and only
    then moves it into place. A network failure or a corrupt download raises DataError naming the URL and how to
    place the files by hand.
    """
    import pooch

    root = Path(root).expanduser()
    names = list(OMNIGLOT_FILES) if files is None else list(files)
    unknown = [n for n in names if n not in OMNIGLOT_FILES]
    if unknown:
        raise DataError(f"unknown Omniglot file(s) {unknown}; known: {', '.join(OMNIGLOT_FILES)}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {root}: {exc}") from exc
    if not base_url.endswith("/"):
        base_url += "/"
    check = verify and base_url == OMNIGLOT_BASE_URL
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout, headers={"User-Agent": "mnkpipe"})
    out = []
    for name in names:
        target = root / name
        out.append(target)
        if target.is_file():  # never re-checked: the offline copy's two full zips are rebuilt, not byte-equal
            continue
        rel, algo, digest = OMNIGLOT_FILES[name]
        url = base_url + rel
        try:
            pooch.retrieve(url, known_hash=f"{algo}:{digest}" if check else None, fname=name, path=root,
                           downloader=downloader, progressbar=progress)
        except ValueError as exc:  # pooch: the file's hash differs (the download was removed)
            raise DataError(f"download of {url} is corrupt ({exc}). {_manual_hint(root, base_url)}") from None
        except Exception as exc:  # noqa: BLE001 - any network or HTTP failure: say where and what to do
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"download of {url} failed ({type(exc).__name__}: {reason}). "
                            f"{_manual_hint(root, base_url)}") from None
    return out
