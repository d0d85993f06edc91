"""An image that standardises to all zeros (its normalised kernel is 0/0) is named by its file before a store exists."""

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from mnkpipe.cli import main

CONFIG = """
[data]
dataset = "folder"
train_split = "train"
test_split = "test"
image_size = 10
pad = 12

[tasks]
way = 3
shot = 1
query = 3
train_tasks = 2
test_tasks = 1
val_tasks = 0
seed = 0

[kernel]
depth = 3

[compute]
tile_size = 8
"""


def _dataset(root: Path, blank: Path) -> None:
    """6 training and 3 test classes of 4 images; each training image half 0 and half 254, so the training mean is
    exactly 127/255 and the image `blank` (relative to root), every pixel 127, standardises to exactly 0."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(n):
            (root / split / f"{split}{c}").mkdir(parents=True)
            for i in range(4):
                img = rng.permutation(np.repeat(np.array([0, 254], np.uint8), 50)).reshape(10, 10)
                Image.fromarray(img).save(root / split / f"{split}{c}" / f"{i}.png")
    Image.fromarray(np.full((10, 10), 127, np.uint8)).save(root / blank)


def test_an_image_blank_after_standardisation_is_named_by_its_file(tmp_path):
    blank = Path("test", "test1", "2.png")
    _dataset(tmp_path / "data", blank)
    (tmp_path / "blank.toml").write_text(CONFIG)
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["compute-kernel", "--config", str(tmp_path / "blank.toml"), "--store", str(store),
                                  "--data", str(tmp_path / "data"), "--cpus", "2", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert str(tmp_path / "data" / blank) in r.output and "blank after standardisation" in r.output, r.output
    assert not store.exists() and not Path(f"{store}.lock").exists()
