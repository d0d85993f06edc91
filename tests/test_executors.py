"""The executor seam: the same tile job run in this process (LocalExecutor) and by Ray workers (RayExecutor)."""

from pathlib import Path

import numpy as np

from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import compute_kernel, prepare_store, run_tiles
from mnkpipe.pipeline.executors import LocalExecutor
from mnkpipe.store import open_store

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def test_local_and_ray_executors_give_the_same_gram_and_counts(tmp_path, omniglot_root):
    here = compute_kernel(SMOKE, tmp_path / "local.zarr", data=str(omniglot_root), progress=False,
                          executor=LocalExecutor("cpu"))
    ray = compute_kernel(SMOKE, tmp_path / "ray.zarr", data=str(omniglot_root), cpus=1, progress=False)
    assert set(here) == set(ray)
    for key in ("tiles_planned", "tiles_computed", "tiles_skipped", "pairs_computed", "pairs_done"):
        assert here[key] == ray[key], key
    a, b = open_store(tmp_path / "local.zarr"), open_store(tmp_path / "ray.zarr")
    assert np.array_equal(a.read_gram(), b.read_gram(), equal_nan=True)  # bit for bit
    assert a.backend == b.backend == "cpu"
    for store, summary in ((a, here), (b, ray)):
        progress = store.progress()
        assert progress["pairs_done"] == progress["pairs_total"] == summary["pairs_done"]
        assert progress["rate_pairs_per_s"] == summary["pairs_computed"] / summary["seconds"]


def test_run_tiles_computes_only_the_tiles_it_is_given(tmp_path, omniglot_root):
    path = tmp_path / "some.zarr"
    prepare_store(load_config(SMOKE), path, data=str(omniglot_root))
    chosen = open_store(path).planned_tiles()[3:6]
    s = run_tiles(path, tiles=chosen, progress=False, executor=LocalExecutor())
    assert s["tiles_computed"] == 3 and open_store(path).done_tiles() == set(chosen)
