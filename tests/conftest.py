import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def data_root() -> Path:
    """$MNKPIPE_DATA (relative to cwd or to the repo root; CI sets it), else ../shared/data/omniglot beside the repo."""
    env = os.environ.get("MNKPIPE_DATA")
    candidates = [Path(env), REPO / env] if env else [SHARED / "data" / "omniglot"]
    for c in candidates:
        if (c / "images_background_small1.zip").is_file():
            return c.resolve()
    pytest.fail(f"Omniglot data not found; tried {[str(c) for c in candidates]} (set MNKPIPE_DATA)")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def golden():
    path = SHARED / "golden" / "cntk_neural_tangents.npz"
    assert path.exists(), f"golden CNTK values missing: {path}"
    return dict(np.load(path))
