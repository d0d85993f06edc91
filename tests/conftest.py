import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def data_root() -> Path:
    """Omniglot root: $MNKPIPE_DATA (CI sets it), else ../shared/data/omniglot beside the checkout."""
    env = os.environ.get("MNKPIPE_DATA")
    return Path(env).resolve() if env else SHARED / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = data_root()
    assert (root / "images_background_small1.zip").exists(), f"Omniglot not found at {root}; set MNKPIPE_DATA"
    return root


@pytest.fixture(scope="session")
def golden():
    path = SHARED / "golden" / "cntk_neural_tangents.npz"
    assert path.exists(), f"golden CNTK values missing: {path}"
    return dict(np.load(path))
