"""Checkpoints of the baselines and the label-embedding extractor: written whole or not at all."""

from pathlib import Path

import torch

from ..files import atomic_write


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save whole or not at all (files.atomic_write: no temporary file is left when it fails)."""
    atomic_write(path, lambda f: torch.save(state, f))
