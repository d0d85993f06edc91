"""In-memory labelled image datasets (the common currency of all data loaders) and the data error types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DataError", "DataNotFoundError", "ImageDataset", "concat"]

_ROTATIONS = (90, 180, 270)


class DataError(ValueError):
    """Any problem with input data: missing, malformed, or unsuitable for the requested operation."""


class DataNotFoundError(DataError, FileNotFoundError):
    """Data (a root folder, a zip, a split) that was asked for does not exist; the message says what was tried."""


@dataclass
class ImageDataset:
    """Labelled images: (N, C, H, W) float32 in [0, 1] with int64 class labels, class names, groups and sources."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    groups: list[str]
    paths: list[str]

    def __post_init__(self) -> None:
        """Coerce dtypes and check that all fields agree in length."""
        self.images = np.asarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.classes = list(self.classes)
        self.groups = list(self.groups)
        self.paths = list(self.paths)
        if self.images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {self.images.shape}")
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise DataError(f"labels must have shape ({n},), got {self.labels.shape}")
        if len(self.paths) != n:
            raise DataError(f"paths has {len(self.paths)} entries for {n} images")
        if len(self.groups) != len(self.classes):
            raise DataError(f"groups has {len(self.groups)} entries for {len(self.classes)} classes")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(f"labels must lie in [0, {len(self.classes)}), "
                            f"got [{self.labels.min()}, {self.labels.max()}]")

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        """Number of images per class, shape (n_classes,)."""
        return np.bincount(self.labels, minlength=self.n_classes)

    def subset_classes(self, class_ids: Sequence[int]) -> "ImageDataset":
        """Keep only the given classes, relabelled 0..k-1 in the given order (images keep their relative order)."""
        ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_classes):
            raise DataError(f"class ids must lie in [0, {self.n_classes}), got {ids.min()}..{ids.max()}")
        if len(np.unique(ids)) != len(ids):
            raise DataError("subset_classes: class ids contain duplicates")
        new_label = np.full(self.n_classes, -1, dtype=np.int64)
        new_label[ids] = np.arange(len(ids))
        mapped = new_label[self.labels]
        keep = np.flatnonzero(mapped >= 0)
        return ImageDataset(
            images=self.images[keep],
            labels=mapped[keep],
            classes=[self.classes[i] for i in ids],
            groups=[self.groups[i] for i in ids],
            paths=[self.paths[i] for i in keep],
        )

    def with_rotations(self) -> "ImageDataset":
        """Four times the classes: originals keep ids 0..C-1, then rot90, rot180, rot270 copies (counter-clockwise) as
        new classes."""
        c, h, w = self.image_shape
        if h != w:
            raise DataError(f"with_rotations needs square images, got {h}x{w}")
        k = self.n_classes
        images = [self.images] + [np.ascontiguousarray(np.rot90(self.images, r // 90, axes=(2, 3))) for r in _ROTATIONS]
        labels = [self.labels + i * k for i in range(4)]
        classes = list(self.classes) + [f"{name}/rot{r}" for r in _ROTATIONS for name in self.classes]
        groups = list(self.groups) * 4
        paths = list(self.paths) + [f"{p}#rot{r}" for r in _ROTATIONS for p in self.paths]
        return ImageDataset(np.concatenate(images), np.concatenate(labels), classes, groups, paths)


def concat(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    """Stack two datasets: images of b after a, b's labels shifted by len(a.classes); class names must not collide."""
    if a.image_shape != b.image_shape:
        raise DataError(f"concat: image shapes differ, {a.image_shape} vs {b.image_shape}")
    clash = sorted(set(a.classes) & set(b.classes))
    if clash:
        raise DataError(f"concat: {len(clash)} class names occur in both datasets, e.g. {clash[:3]}")
    return ImageDataset(
        images=np.concatenate([a.images, b.images]),
        labels=np.concatenate([a.labels, b.labels + a.n_classes]),
        classes=a.classes + b.classes,
        groups=a.groups + b.groups,
        paths=a.paths + b.paths,
    )
