"""The 20 official 20-way 1-shot Omniglot runs of Lake et al. (all_runs.zip) as an ImageDataset plus one TaskSet."""

from __future__ import annotations

import os
import re

import numpy as np

from . import _io
from .dataset import DataError, DataNotFoundError, ImageDataset
from .episodes import TaskSet
from .omniglot import resolve_data_root

__all__ = ["load_lake_runs", "N_RUNS", "RUN_WAY"]

N_RUNS = 20
RUN_WAY = 20
_LINE = re.compile(r"^(run\d\d)/test/(item\d\d\.png)\s+(run\d\d)/training/(class(\d\d)\.png)$")


def _parse_labels(text: str, run: str, where: str) -> list[tuple[str, int]]:
    """class_labels.txt -> [(test item file, 0-based training class index)] in file order."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m or m.group(1) != run or m.group(3) != run:
            raise DataError(f"{where}/{run}/class_labels.txt line {n} is malformed: {line!r}")
        out.append((m.group(2), int(m.group(5)) - 1))
    items = sorted(i for i, _ in out)
    if (items != [f"item{i:02d}.png" for i in range(1, RUN_WAY + 1)]
            or sorted(c for _, c in out) != list(range(RUN_WAY))):
        raise DataError(f"{where}/{run}/class_labels.txt must map item01..item{RUN_WAY} one-to-one "
                        f"onto class01..class{RUN_WAY}")
    return out


def load_lake_runs(
    root: str | os.PathLike | None,
    *,
    image_size: int | None = 28,
    cache_dir: str | os.PathLike | None | bool = None,
) -> tuple[ImageDataset, TaskSet]:
    """Lake's 20 one-shot runs: 800 images (per run class01-20 then item01-20; 400 classes "runNN/classMM") and their
    TaskSet.

    Task r: support = run r's training images (label MM - 1), query = its test items in class_labels.txt order,
    labelled with their matching training class. Source: root/all_runs.zip or extracted root/[all_runs/]runNN.
    """
    _io.check_image_size(image_size)
    root = resolve_data_root(root)
    zpath = root / "all_runs.zip"
    folder = next((d for d in (root / "all_runs", root) if (d / "run01" / "class_labels.txt").is_file()), None)
    if folder is None and not zpath.is_file():
        raise DataNotFoundError(f"Lake runs not found: tried {zpath}, {root / 'all_runs'}/run01 and {root}/run01")

    if folder is not None:
        where = str(folder)
        listed = [(f"run{r:02d}", sub, f"{stem}{i:02d}.png") for r in range(1, N_RUNS + 1)
                  for sub, stem in (("training", "class"), ("test", "item")) for i in range(1, RUN_WAY + 1)]
        listed += [(f"run{r:02d}", "class_labels.txt") for r in range(1, N_RUNS + 1)]
        try:
            key_source = _io.files_fingerprint(folder, listed)
        except OSError as exc:
            raise DataError(f"incomplete Lake runs folder {folder}: {exc}") from exc

        def read(parts: tuple[str, ...]) -> bytes:
            try:
                return folder.joinpath(*parts).read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {folder.joinpath(*parts)}: {exc}") from exc

        def name_of(parts: tuple[str, ...]) -> str:
            return str(folder.joinpath(*parts))

        zf = None
    else:
        where = zpath.name
        key_source = _io.file_fingerprint(zpath)
        zf = _io.open_zip(zpath)

        def read(parts: tuple[str, ...]) -> bytes:
            return _io.read_zip_member(zf, "/".join(parts), f"{zpath.name}:{'/'.join(parts)}")

        def name_of(parts: tuple[str, ...]) -> str:
            return f"{zpath.name}:{'/'.join(parts)}"

    runs = [f"run{r:02d}" for r in range(1, N_RUNS + 1)]
    try:
        labels_of = {run: _parse_labels(read((run, "class_labels.txt")).decode("utf-8"), run, where) for run in runs}
        key = {"kind": "lake_runs", "version": _io.CACHE_VERSION, "image_size": image_size, "source": key_source}
        cache_file = _io.cache_path(cache_dir, f"lake-runs-{image_size or 'orig'}", key)
        ds = _io.load_cache(cache_file, key)
        if ds is None:
            # image order: per run, training class01..20 then test item01..20; label = run * 20 + training class
            files, labels = [], []
            for r, run in enumerate(runs):
                files += [(run, "training", f"class{c:02d}.png") for c in range(1, RUN_WAY + 1)]
                labels += [r * RUN_WAY + c for c in range(RUN_WAY)]
                item_class = dict(labels_of[run])
                files += [(run, "test", f"item{i:02d}.png") for i in range(1, RUN_WAY + 1)]
                labels += [r * RUN_WAY + item_class[f"item{i:02d}.png"] for i in range(1, RUN_WAY + 1)]
            # decode_classes decodes class by class: one pseudo-class per file keeps this order
            flat = [_io.ClassEntry(f[0], "/".join(f), [f]) for f in files]
            images_u8, _, names = _io.decode_classes(flat, read, name_of, image_size=image_size, desc="Lake runs")
            labels_arr = np.array(labels, dtype=np.int64)
            classes = [f"{run}/class{c:02d}" for run in runs for c in range(1, RUN_WAY + 1)]
            groups = [run for run in runs for _ in range(RUN_WAY)]
            _io.save_cache(cache_file, key, images_u8, labels_arr, classes, groups, names)
            ds = ImageDataset(_io.to_float(images_u8), labels_arr, classes, groups, names)
    finally:
        if zf is not None:
            zf.close()

    per_run = 2 * RUN_WAY
    support = np.array([[r * per_run + c for c in range(RUN_WAY)] for r in range(N_RUNS)], dtype=np.int64)
    support_labels = np.tile(np.arange(RUN_WAY, dtype=np.int64), (N_RUNS, 1))
    query = np.empty((N_RUNS, RUN_WAY), dtype=np.int64)
    query_labels = np.empty((N_RUNS, RUN_WAY), dtype=np.int64)
    for r, run in enumerate(runs):
        for j, (item, c) in enumerate(labels_of[run]):
            query[r, j] = r * per_run + RUN_WAY + int(item[4:6]) - 1
            query_labels[r, j] = c
    classes = np.arange(N_RUNS * RUN_WAY, dtype=np.int64).reshape(N_RUNS, RUN_WAY)
    return ds, TaskSet(support, support_labels, query, query_labels, classes)
