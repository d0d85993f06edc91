"""Internal helpers: directory/zip trees of class folders, PNG decoding, and the .npz decode cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..files import atomic_write
from ..keys import settings_key
from ..memory import check_fits
from .dataset import DataError, ImageDataset

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
CACHE_VERSION = 2  # part of every decode-cache key: raised whenever decoding changes

# Number of images decoded by this process so far (tests use it to prove a cache hit decodes nothing).
_decode_count = 0


def decode_count() -> int:
    """Number of image files decoded so far in this process."""
    return _decode_count


def is_hidden(name: str) -> bool:
    """True for names skipped everywhere: dot-files/dot-folders and macOS '__MACOSX' folders."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension this package decodes."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def check_image_size(image_size: int | None) -> None:
    """Raise DataError unless image_size is None or a positive int."""
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")


# --------------------------------------------------------------------------------------------- trees


@dataclass
class Tree:
    """The files and folders below a root (relative path tuples), hidden entries already removed."""

    files: set[tuple[str, ...]] = field(default_factory=set)
    dirs: set[tuple[str, ...]] = field(default_factory=set)

    def add_file(self, parts: tuple[str, ...]) -> None:
        """Record a file and all of its parent folders."""
        self.files.add(parts)
        for i in range(1, len(parts)):
            self.dirs.add(parts[:i])

    def add_dir(self, parts: tuple[str, ...]) -> None:
        """Record a folder and all of its parents."""
        for i in range(1, len(parts) + 1):
            self.dirs.add(parts[:i])

    def children(self) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
        """Map each folder (root = ()) to its sorted (sub-folder names, file names)."""
        out: dict[tuple[str, ...], tuple[list[str], list[str]]] = {(): ([], [])}
        for d in self.dirs:
            out.setdefault(d, ([], []))
        for d in self.dirs:
            out[d[:-1]][0].append(d[-1])
        for f in self.files:
            out[f[:-1]][1].append(f[-1])
        for subdirs, files in out.values():
            subdirs.sort()
            files.sort()
        return out


def tree_from_folder(root: Path) -> Tree:
    """Walk a folder into a Tree, skipping hidden files and folders; symlinked folders are followed (a class
    folder may live elsewhere), and one that leads back to a folder above it is a DataError naming it."""
    tree = Tree()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for d in dirnames:
            link = Path(dirpath) / d
            if link.is_symlink() and link.resolve() in (link.parent.resolve(), *link.parent.resolve().parents):
                raise DataError(f"{link} is a symlink to {link.resolve()}, a folder above it: it would loop")
        rel = Path(dirpath).relative_to(root).parts
        if rel:
            tree.add_dir(tuple(rel))
        for f in filenames:
            if not is_hidden(f):
                tree.add_file(tuple(rel) + (f,))
    return tree


def tree_from_zip(names: Iterable[str], prefix: tuple[str, ...] = ()) -> Tree:
    """Build a Tree from zip member names, keeping only those under `prefix` (stripped), hidden entries skipped."""
    tree = Tree()
    n = len(prefix)
    for name in names:
        is_dir = name.endswith("/")
        parts = tuple(p for p in name.split("/") if p)
        if parts[:n] != prefix:
            continue
        parts = parts[n:]
        if not parts or any(is_hidden(p) for p in parts):
            continue
        if is_dir:
            tree.add_dir(parts)
        else:
            tree.add_file(parts)
    return tree


@dataclass
class ClassEntry:
    """One class found in a tree: its group, its name, and its image files (relative path tuples, sorted by name)."""

    group: str
    name: str
    files: list[tuple[str, ...]]


def index_tree(tree: Tree, where: str, layout: str = "auto") -> list[ClassEntry]:
    """Classes of a flat root/class/img or nested root/group/class/img tree; DataError naming any malformed entry."""
    kids = tree.children()
    top_dirs, top_files = kids[()]
    if not top_dirs:
        extra = f"; it holds {len(top_files)} files directly, e.g. {top_files[0]!r}" if top_files else ""
        raise DataError(f"no class folders found in {where}{extra} "
                        f"(expected {where}/<class>/*.png or {where}/<group>/<class>/*.png)")
    if layout == "auto":
        grouped = [d for d in top_dirs if kids[(d,)][0]]
        flat = [d for d in top_dirs if not kids[(d,)][0] and kids[(d,)][1]]
        if grouped and flat:
            raise DataError(
                f"mixed folder layout in {where}: {grouped[0]!r} holds sub-folders (group/class layout) "
                f"but {flat[0]!r} holds files (class layout)"
            )
        layout = "nested" if grouped else "flat"

    def class_files(parts: tuple[str, ...]) -> list[tuple[str, ...]]:
        subdirs, files = kids[parts]
        label = "/".join(parts)
        if subdirs:
            raise DataError(f"unexpected folder {where}/{label}/{subdirs[0]} inside class folder {where}/{label}")
        bad = [f for f in files if not is_image_name(f)]
        if bad:
            raise DataError(
                f"non-image file {where}/{label}/{bad[0]} in class folder {where}/{label} "
                f"(allowed: {', '.join(sorted(IMAGE_EXTS))}; hidden files are skipped)"
            )
        if not files:
            raise DataError(f"empty class folder {where}/{label}: it contains no images")
        return [parts + (f,) for f in files]

    out: list[ClassEntry] = []
    if layout == "flat":
        for d in top_dirs:
            out.append(ClassEntry("", d, class_files((d,))))
    elif layout == "nested":
        for g in top_dirs:
            subdirs, files = kids[(g,)]
            if files:
                raise DataError(f"unexpected file {where}/{g}/{files[0]} in group folder {where}/{g} "
                                "(expected only class folders)")
            if not subdirs:
                raise DataError(f"empty group folder {where}/{g}: it contains no class folders")
            for c in subdirs:
                out.append(ClassEntry(g, f"{g}/{c}", class_files((g, c))))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out


# ------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, name: str, image_size: int | None, grayscale: bool = True) -> np.ndarray:
    """Decode one image file's bytes to a (C, H, W) uint8 array ('L' or 'RGB'), LANCZOS-resized to image_size^2."""
    global _decode_count
    _decode_count += 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = _eight_bit_on_white(img).convert("L" if grayscale else "RGB")
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise DataError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _eight_bit_on_white(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale scaled by its bit depth to 8 bits (PIL's convert would clip at 255); an image with
    transparency composited on white, so a drawing held in the alpha channel shows dark strokes on white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        bits = 16 if img.mode.startswith("I;16") or np.asarray(img).max() <= 65535 else 32
        scaled = np.asarray(img, dtype=np.float64) * (255.0 / (2 ** bits - 1))
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (x / 255)."""
    return images_u8.astype(np.float32) / np.float32(255.0)


def decode_classes(
    entries: Sequence[ClassEntry],
    read: Callable[[tuple[str, ...]], bytes],
    name_of: Callable[[tuple[str, ...]], str],
    *,
    image_size: int | None,
    grayscale: bool = True,
    progress: bool = False,
    desc: str = "decoding",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every file of every class: returns (uint8 images (N,C,H,W), int64 labels, per-image source names)."""
    from tqdm.auto import tqdm

    jobs = [(label, f) for label, e in enumerate(entries) for f in e.files]
    labels = np.fromiter((j[0] for j in jobs), dtype=np.int64, count=len(jobs))
    names = [name_of(f) for _, f in jobs]
    images: np.ndarray | None = None
    for i, (_, f) in enumerate(tqdm(jobs, desc=desc, unit="img", disable=not progress)):
        arr = decode_image(read(f), names[i], image_size, grayscale)
        if images is None:
            images = np.empty((len(jobs),) + arr.shape, dtype=np.uint8)
        elif arr.shape != images.shape[1:]:
            raise DataError(
                f"image {names[i]} has shape {arr.shape[1:]} but {names[0]} has {images.shape[2:]}; "
                "pass image_size=<int> to resize all images to one size"
            )
        images[i] = arr
    if images is None:
        raise DataError(f"no images found ({desc})")
    return images, labels, names


# --------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$MNKPIPE_CACHE, else ~/.cache/mnkpipe."""
    env = os.environ.get("MNKPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mnkpipe"


def file_fingerprint(path: Path) -> dict:
    """Absolute path, size and mtime of one file (cache key part)."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def files_fingerprint(root: Path, files: Iterable[tuple[str, ...]]) -> dict:
    """Absolute root plus a hash of (relative path, size, mtime) of every listed file (cache key part)."""
    h = hashlib.sha256()
    for parts in sorted(files):
        st = root.joinpath(*parts).stat()
        h.update(f"{'/'.join(parts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(Path(root).resolve()), "files_sha256": h.hexdigest()}


def cache_path(cache_dir: str | os.PathLike | None | bool, stem: str, key: dict) -> Path | None:
    """Cache file for this key (None when cache_dir is False: caching disabled)."""
    if cache_dir is False:
        return None
    base = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser()
    return base / f"{stem}-{settings_key(key, 20)}.npz"


def load_cache(path: Path | None, key: dict) -> ImageDataset | None:
    """The cached dataset stored at path under exactly this key, or None (missing, unreadable or stale)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != json.loads(json.dumps(key)):
                return None
            return ImageDataset(
                images=to_float(z["images_u8"]),
                labels=z["labels"].astype(np.int64),
                classes=[str(s) for s in z["classes"]],
                groups=[str(s) for s in z["groups"]],
                paths=[str(s) for s in z["paths"]],
            )
    except Exception as exc:  # a corrupt cache file must never break loading: rebuild it
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None


def _str_array(items: Sequence[str]) -> np.ndarray:
    """Unicode numpy array that also works for an empty list."""
    return np.array(list(items), dtype=str) if len(items) else np.zeros(0, dtype="<U1")


def save_cache(path: Path | None, key: dict, images_u8: np.ndarray, labels: np.ndarray,
               classes: Sequence[str], groups: Sequence[str], paths: Sequence[str]) -> None:
    """Atomically write the decoded arrays to path (warn, do not fail, when the cache is not writable)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez_compressed(
            f, key=np.array(json.dumps(key, sort_keys=True)), images_u8=images_u8, labels=labels,
            classes=_str_array(classes), groups=_str_array(groups), paths=_str_array(paths)))
    except OSError as exc:
        warnings.warn(f"could not write cache file {path}: {exc}", stacklevel=3)


def load_or_decode(
    cache_file: Path | None,
    key: dict,
    entries: Sequence[ClassEntry],
    read: Callable[[tuple[str, ...]], bytes],
    name_of: Callable[[tuple[str, ...]], str],
    *,
    image_size: int | None,
    grayscale: bool = True,
    progress: bool = False,
    desc: str = "decoding",
) -> ImageDataset:
    """Return the cached dataset for key, or decode all class entries, cache them and return the dataset."""
    if image_size is not None:  # uint8 pixels, their float32 copy and the float64 temporaries of standardising them
        n = sum(len(e.files) for e in entries)
        check_fits(n * image_size ** 2 * (1 if grayscale else 3) * (1 + 4 + 8),
                   f"image_size {image_size}: {n} images of {image_size}x{image_size} pixels")
    hit = load_cache(cache_file, key)
    if hit is not None:
        return hit
    images_u8, labels, names = decode_classes(
        entries, read, name_of, image_size=image_size, grayscale=grayscale, progress=progress, desc=desc
    )
    classes = [e.name for e in entries]
    groups = [e.group for e in entries]
    save_cache(cache_file, key, images_u8, labels, classes, groups, names)
    return ImageDataset(to_float(images_u8), labels, classes, groups, names)


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip file, turning a damaged archive into a DataError naming it."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"cannot open zip file {path}: {exc}") from exc


def read_zip_member(zf: zipfile.ZipFile, member: str, label: str) -> bytes:
    """Read one zip member, turning CRC/format errors into a DataError naming it."""
    try:
        return zf.read(member)
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as exc:
        raise DataError(f"cannot read {label}: {exc}") from exc


def zip_access(zf: zipfile.ZipFile, prefix: tuple[str, ...], label: str):
    """(read, name_of) for load_or_decode over the members prefix/parts of an open zip, named '<label>:<member>'."""
    def member(parts: tuple[str, ...]) -> str:
        return "/".join(prefix + parts)

    return (lambda parts: read_zip_member(zf, member(parts), f"{label}:{member(parts)}"),
            lambda parts: f"{label}:{member(parts)}")
