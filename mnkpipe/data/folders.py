"""Generic class-folder datasets "in the form of Omniglot": root/class/*.png or root/group/class/*.png (or a .zip of
that)."""

from __future__ import annotations

import os
from pathlib import Path

from . import _io
from .dataset import DataError, DataNotFoundError, ImageDataset

__all__ = ["load_image_folder"]


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | None = 28,
    grayscale: bool = True,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = False,
    layout: str = "auto",
) -> ImageDataset:
    """A class-folder dataset (png/jpg/jpeg/bmp) as an ImageDataset, LANCZOS-resized to image_size^2, .npz-cached.

    Layouts: root/<class>/* (groups "") or root/<group>/<class>/* (classes "<group>/<class>"); root may be a .zip
    of either (optionally inside one top folder named like the zip). Hidden files and files directly in root are
    ignored; anything else odd raises DataError naming it. cache_dir: None = default, False = no cache.
    """
    _io.check_image_size(image_size)
    if layout not in ("auto", "flat", "nested"):
        raise DataError(f"layout must be 'auto', 'flat' or 'nested', got {layout!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"image folder {root} does not exist")
    key = {"kind": "image_folder", "version": _io.CACHE_VERSION, "image_size": image_size,
           "grayscale": bool(grayscale), "layout": layout}
    stem = f"folder-{root.stem}-{image_size or 'orig'}"
    if root.is_dir():
        entries = _io.index_tree(_io.tree_from_folder(root), str(root), layout=layout)
        key["source"] = _io.files_fingerprint(root, [f for e in entries for f in e.files])
        return _io.load_or_decode(
            _io.cache_path(cache_dir, stem, key), key, entries,
            read=lambda parts: root.joinpath(*parts).read_bytes(),
            name_of=lambda parts: str(root.joinpath(*parts)),
            image_size=image_size, grayscale=grayscale, progress=progress, desc=f"images {root.name}",
        )
    if root.suffix.lower() != ".zip":
        raise DataError(f"{root} is neither a folder nor a .zip file")
    key["source"] = _io.file_fingerprint(root)
    cache_file = _io.cache_path(cache_dir, stem, key)
    hit = _io.load_cache(cache_file, key)
    if hit is not None:
        return hit
    with _io.open_zip(root) as zf:
        names = zf.namelist()
        # a zip made by zipping the folder itself holds one top folder named like the zip: look inside it
        prefix: tuple[str, ...] = (root.stem,) if _io.tree_from_zip(names).children()[()] == ([root.stem], []) else ()
        entries = _io.index_tree(_io.tree_from_zip(names, prefix), str(root), layout=layout)
        return _io.load_or_decode(
            cache_file, key, entries,
            *_io.zip_access(zf, prefix, root.name),
            image_size=image_size, grayscale=grayscale, progress=progress, desc=f"images {root.name}",
        )
