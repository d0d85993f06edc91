"""Checkpoints of the baselines and the label-embedding extractor: written whole or not at all."""

import os
from pathlib import Path

import torch


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save: write a temporary file in the same folder, then os.replace it over `path`."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
