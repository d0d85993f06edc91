"""Checkpoints of the baselines and the label-embedding extractor: written whole or not at all."""

import os
from pathlib import Path

import torch


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save: write a temporary file in the same folder, then os.replace it over `path`; the temporary
    file is removed when the write fails or is interrupted."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
