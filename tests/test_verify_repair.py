"""verify and its repair: resumable, refused before writing, with the store's backend; inputs and plan checked;
temporary files of killed writers cleaned."""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import kill_ray_tree

from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import compute_kernel, prepare_store
from mnkpipe.pipeline.inspect import store_status, verify_store
from mnkpipe.pipeline.local import compute_local
from mnkpipe.store import RECORD_FILL, StoreError, open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=600, env=env or ENV)


ENV = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, omniglot_root):
    """A complete smoke store computed by the driver (CPU workers) and its Gram."""
    ENV["MNKPIPE_DATA"] = str(omniglot_root)
    path = tmp_path_factory.mktemp("repair") / "smoke.zarr"
    compute_kernel(SMOKE, path, data=str(omniglot_root), cpus=2, progress=False)
    return path, open_store(path).read_gram()


@pytest.fixture
def store(finished, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(finished[0], path)
    return path


def damage(store, tiles) -> None:
    """Overwrite the chunks of `tiles` with other bytes of the same size (only their checksums can tell)."""
    rng = np.random.default_rng(1)
    for bi, bj in tiles:
        chunk = store / "gram" / "c" / str(bi) / str(bj)
        chunk.write_bytes(rng.bytes(chunk.stat().st_size))


def snapshot(store) -> dict:
    """Every file of the store with its bytes (to show that nothing was written)."""
    return {p.relative_to(store): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def flip_byte(path: Path, at: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if at is None else at
    raw[i] ^= 0x10
    path.write_bytes(bytes(raw))


# -- the backend record and the repair -------------------------------------------------------------------------
def test_the_manifest_records_the_backend(finished, tmp_path, omniglot_root):
    assert open_store(finished[0]).manifest["backend"] == "cpu"
    local = tmp_path / "local.zarr"
    st = prepare_store(load_config(SMOKE), local, data=str(omniglot_root), backend="cupy")
    assert st.manifest["backend"] == "cupy"


def test_repair_killed_midway_is_finished_by_the_same_command(store, finished):
    tiles = open_store(store).planned_tiles()[::2]
    damage(store, tiles)
    before = open_store(store).records().copy()
    p = subprocess.Popen([sys.executable, "-m", "mnkpipe.cli", "verify", "--repair", "--cpus", "2", str(store)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        end = time.time() + 120
        rows, cols = np.array(tiles).T
        while time.time() < end and (open_store(store).records()[rows, cols] == before[rows, cols]).any():
            time.sleep(0.01)
        kill_ray_tree(p.pid)  # once the repair changed the records of all bad tiles: before it recomputed them
        p.wait(timeout=30)
    finally:
        kill_ray_tree(p.pid)
    os.unlink(f"{store}.lock")  # the killed repair's lock (its pid is gone: stale)
    r = cli("verify", "--repair", "--cpus", "2", store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"repaired: {len(tiles)} tiles recomputed" in r.stdout, r.stdout
    assert open_store(store).missing_tiles() == []
    assert np.array_equal(open_store(store).read_gram(), finished[1], equal_nan=True)
    assert verify_store(store)["bad"] == []


def test_a_refused_repair_writes_nothing(store):
    damage(store, [(0, 0)])
    before = snapshot(store)
    r = cli("verify", "--repair", "--cpus", "64", store)
    assert r.returncode != 0 and "--cpus 64" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(store) == before and not Path(f"{store}.lock").exists()


def test_repair_of_a_gpu_store_without_gpus_is_refused(store):
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["manifest"] = dict(g.attrs["manifest"], backend="cupy")
    damage(store, [(0, 1)])
    before = snapshot(store)
    r = cli("verify", "--repair", "--cpus", "2", store)
    assert r.returncode != 0 and "cupy" in r.stderr and "--gpus" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(store) == before


def test_repair_of_a_store_without_a_backend_record_says_so(store, finished):
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["manifest"] = {k: v for k, v in g.attrs["manifest"].items() if k != "backend"}
    damage(store, [(0, 2)])
    r = cli("verify", "--repair", "--cpus", "2", store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "does not record the backend" in r.stdout + r.stderr and "repaired: 1 tiles recomputed" in r.stdout
    assert np.array_equal(open_store(store).read_gram(), finished[1], equal_nan=True)


def test_resuming_with_another_backend_is_refused(store, omniglot_root):
    with pytest.raises(StoreError, match="backend: store has \"cpu\", now \"cupy\""):
        prepare_store(load_config(SMOKE), store, data=str(omniglot_root), backend="cupy")


# -- inputs checked before any tile is computed ----------------------------------------------------------------
@pytest.mark.parametrize("array, chunk", [("images", "images/c/1/0/0/0"), ("scales", "scales/c/2/0/0/0"),
                                          ("episodes/test/query", "episodes/test/query/c/0/0")])
def test_flipped_input_bytes_are_found_and_nothing_is_computed_from_them(store, omniglot_root, array, chunk):
    flip_byte(store / chunk)
    r = cli("verify", store)
    assert r.returncode != 0 and array in r.stdout + r.stderr, r.stdout + r.stderr
    st = open_store(store, mode="r+")
    st.clear_record(0, 1)  # a tile to compute
    before = snapshot(store)
    r = cli("verify", "--repair", "--cpus", "2", store)
    assert r.returncode != 0 and array in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(StoreError, match=array):
        compute_kernel(SMOKE, store, data=str(omniglot_root), cpus=1, progress=False)
    with pytest.raises(StoreError, match=array):
        compute_local(load_config(SMOKE), store, data=str(omniglot_root), progress=False)
    assert snapshot(store) == before and int(open_store(store).records()[0, 1]) == RECORD_FILL


# -- the tile plan -----------------------------------------------------------------------------------------------
def test_a_lost_or_damaged_plan_is_found_and_rebuilt(tmp_path, omniglot_root):
    path = tmp_path / "unfinished.zarr"
    prepare_store(load_config(SMOKE), path, data=str(omniglot_root))
    assert store_status(path)["tiles_total"] == 59
    for how in ("lost", "changed"):
        if how == "lost":
            (path / "gram_plan" / "c" / "0" / "0").unlink()
        else:
            plan = zarr.open_group(str(path), mode="r+")["gram_plan"]
            plan[0, :] = False  # a valid chunk with other tiles
        r = cli("status", path)
        assert r.returncode != 0 and "gram_plan" in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
        with pytest.raises(StoreError, match="gram_plan"):
            verify_store(path)
        r = cli("verify", "--repair", "--cpus", "1", path)
        assert r.returncode == 0 and "gram_plan rebuilt" in r.stdout, r.stdout + r.stderr
        assert store_status(path)["tiles_total"] == 59
    (path / "gram_plan" / "c" / "0" / "0").unlink()
    s = compute_kernel(SMOKE, path, data=str(omniglot_root), cpus=2, progress=False)  # rebuilt under its lock
    assert s["tiles_planned"] == s["tiles_computed"] == 59


# -- temporary files of killed writers ---------------------------------------------------------------------------
def killed_writer_file(chunk: Path) -> Path:
    """The temporary file zarr's LocalStore writes a chunk into before renaming it (what a killed writer leaves)."""
    tmp = chunk.with_suffix(f".{uuid.uuid4().hex}.partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"\0" * 100)
    return tmp


def test_temporary_files_of_killed_writers_are_removed_and_nothing_else(store, omniglot_root):
    ours = [killed_writer_file(store / "gram" / "c" / "0" / "1"), killed_writer_file(store / "gram_crc32" / "c" /
            "3" / "4"), killed_writer_file(store / "scales" / "c" / "0" / "0" / "0" / "0"),
            killed_writer_file(store / "zarr.json")]
    theirs = [store / "gram" / "c" / "0" / "notes.partial", store.parent / f"x.{uuid.uuid4().hex}.partial"]
    for f in theirs:
        f.write_text("keep")
    r = cli("verify", store)
    assert r.returncode == 0 and all(f.exists() for f in ours)  # verify alone only reads
    compute_kernel(SMOKE, store, data=str(omniglot_root), cpus=1, progress=False)
    assert not any(f.exists() for f in ours) and all(f.read_text() == "keep" for f in theirs)
    again = killed_writer_file(store / "gram" / "c" / "2" / "2")
    r = cli("verify", "--repair", "--cpus", "1", store)
    assert r.returncode == 0, r.stderr
    assert not again.exists() and all(f.read_text() == "keep" for f in theirs)
