"""Nothing lost or mixed up (issue 10): store modes, creation marker, lock takeover, checked reads, status, xarray."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.pipeline.config import load_config
from mnkpipe.pipeline.driver import compute_kernel, prepare_store
from mnkpipe.pipeline.inspect import format_status, store_status
from mnkpipe.store import CREATION_MARKER, StoreError, StoreLock, add_tiled_array, open_store
from mnkpipe.store.lock import LOCK_FORMAT

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, omniglot_root):
    """A complete smoke store (computed by the driver on a private Ray instance, no progress bar) and its Gram."""
    path = tmp_path_factory.mktemp("safety") / "smoke.zarr"
    summary = compute_kernel(SMOKE, path, data=str(omniglot_root), cpus=2, progress=False)
    assert summary["tiles_computed"] == 59
    return path, open_store(path).read_gram(), summary


@pytest.fixture
def store(finished, tmp_path):
    """A private copy of the finished store."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(finished[0], path)
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock_text(pid: int) -> str:
    """An mnkpipe lock file of pid on this host."""
    return json.dumps({"format": LOCK_FORMAT, "host": os.uname().nodename, "pid": pid, "started": "x",
                       "command": "c", "token": uuid.uuid4().hex})


def test_open_store_accepts_only_read_modes(store):
    before = open_store(store).records().copy()
    for mode in ("w", "a", "w-"):
        with pytest.raises(ValueError, match=f"not '{mode}'"):
            open_store(store, mode=mode)
    assert np.array_equal(open_store(store).records(), before)


def test_a_zarr_group_not_made_by_mnkpipe_is_refused_untouched(tmp_path, omniglot_root):
    user = tmp_path / "mine.zarr"
    g = zarr.open_group(str(user), mode="w")
    g.create_array("images", data=np.arange(12.0).reshape(3, 4))
    before = sorted(p.relative_to(user) for p in user.rglob("*"))
    r = CliRunner().invoke(main, ["compute-kernel", "--config", str(SMOKE), "--store", str(user),
                                  "--data", str(omniglot_root), "--no-progress"])
    assert r.exit_code != 0 and "not an mnkpipe store" in r.output and "Traceback" not in r.output
    assert sorted(p.relative_to(user) for p in user.rglob("*")) == before
    assert np.array_equal(zarr.open_group(str(user), mode="r")["images"][...], np.arange(12.0).reshape(3, 4))
    assert not Path(f"{user}.lock").exists()


def test_a_folder_not_made_by_mnkpipe_is_refused_untouched(tmp_path, omniglot_root):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not made by mnkpipe"):
        prepare_store(load_config(SMOKE), user, data=str(omniglot_root))
    assert [p.name for p in user.iterdir()] == ["todo.txt"]


def test_only_a_folder_with_the_creation_marker_is_rebuilt(tmp_path, omniglot_root):
    cfg = load_config(SMOKE)
    # an interrupted creation: marker, group, some arrays, no manifest -> rebuilt into a full store
    crashed = tmp_path / "crashed.zarr"
    crashed.mkdir()
    (crashed / CREATION_MARKER).write_text("")
    zarr.create_group(str(crashed)).create_array("images", data=np.zeros((2, 2)))
    with pytest.raises(StoreError, match="creation was interrupted: rerun the compute-kernel command"):
        open_store(crashed)
    store = prepare_store(cfg, crashed, data=str(omniglot_root))
    assert store.manifest["n_images"] == 84 and not (crashed / CREATION_MARKER).exists()
    # the same entries without the marker (a user's group that merely looks like ours) are refused, untouched
    lookalike = tmp_path / "lookalike.zarr"
    zarr.create_group(str(lookalike)).create_array("images", data=np.ones((2, 2)))
    with pytest.raises(StoreError, match="not an mnkpipe store"):
        prepare_store(cfg, lookalike, data=str(omniglot_root))
    assert np.array_equal(zarr.open_group(str(lookalike), mode="r")["images"][...], np.ones((2, 2)))


RACER = str(REPO / "tests" / "support" / "lock_racer.py")


def test_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    store = tmp_path / "race.zarr"
    lock = Path(f"{store}.lock")
    lock.write_text(_lock_text(_dead_pid()))
    go, release = tmp_path / "go", tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, RACER, str(store), str(go), str(release)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    assert [p.stdout.readline().strip() for p in procs] == ["READY"] * 4
    go.touch()
    outs = [p.stdout.readline().strip() for p in procs]
    release.touch()
    for p in procs:
        p.wait(timeout=60)
    assert sorted(o.split()[0] for o in outs) == ["LOCKED"] * 3 + ["WON"], outs
    assert not lock.exists()


def test_status_says_whether_the_lock_owner_is_alive(store):
    lock = Path(f"{store}.lock")
    lock.write_text(_lock_text(_dead_pid()))
    s = store_status(store)
    assert s["lock"]["state"] == "dead" and "NOT running" in format_status(s)
    lock.unlink()
    with StoreLock(store):
        s = store_status(store)
        assert s["lock"]["state"] == "alive" and s["lock"]["pid"] == os.getpid()
        assert ": running" in format_status(s)


def test_verify_without_repair_runs_while_a_driver_holds_the_lock(store):
    with StoreLock(store, command="a driver"):
        r = CliRunner().invoke(main, ["verify", str(store)])
        assert r.exit_code == 0, r.output
        assert "59 done tiles checked, 0 bad" in r.output
        r = CliRunner().invoke(main, ["verify", "--repair", str(store)])
        assert r.exit_code != 0 and "being computed by another driver" in r.output


def test_missing_or_truncated_chunk_is_not_counted_done(store):
    total = store_status(store)["tiles_done"]
    (store / "gram" / "c" / "0" / "0").unlink()
    chunk = store / "gram" / "c" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    s = store_status(store)
    assert s["tiles_done"] == total - 2
    assert set(open_store(store).missing_tiles()) == {(0, 0), (0, 1)}


def test_reading_a_damaged_tile_names_it_and_says_how_to_repair(store, finished):
    chunk = store / "gram" / "c" / "1" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[8:16] = np.float64(123.0).tobytes()
    chunk.write_bytes(bytes(raw))  # same size: only the checksum can tell
    st = open_store(store)
    assert st.gram_block([0, 1], [0, 1]).shape == (2, 2)  # other tiles still read
    for read in (lambda: st.gram_block([9], [17]), lambda: st.gram_block([17], [9]), st.read_gram):
        with pytest.raises(StoreError, match=r"gram tile \(1, 2\) of .* missing or damaged .*"
                                             r"mnkpipe verify --repair"):
            read()
    (store / "gram" / "c" / "3" / "3").unlink()  # a missing chunk whose record is still set
    with pytest.raises(StoreError, match=r"gram tile \(3, 3\)"):
        open_store(store).gram_block([25], [25])
    gram = finished[1]
    assert np.array_equal(open_store(finished[0]).gram_block([0, 50, 3], [60, 2]),
                          gram[np.ix_([0, 50, 3], [60, 2])])


def test_status_pairs_done_is_right_without_a_progress_bar(finished):
    s = store_status(finished[0])
    assert s["pairs_done"] == s["pairs_total"] == 3218 and s["tiles_done"] == 59
    prog = open_store(finished[0]).progress()
    assert prog["pairs_done"] == prog["pairs_total"] == 3218  # was 0: counted by the disabled tqdm bar
    assert s["rate_pairs_per_s"] == prog["rate_pairs_per_s"] > 0
    summary = finished[2]  # compute-kernel prints pairs_computed / seconds: the same rate
    assert summary["pairs_computed"] / summary["seconds"] == pytest.approx(s["rate_pairs_per_s"], rel=1e-12)


def test_status_lists_meta_kernel_groups_outside_the_store(store):
    phi = store.with_name(store.name + "-results") / "phi" / "ridge1e-5-eta-inf"
    g = zarr.create_group(str(phi))
    plan = np.triu(np.ones((3, 3), bool))
    add_tiled_array(g, "phi", 20, 8, "float64", plan)
    from mnkpipe.store import TiledArray
    ta = TiledArray(phi, "phi", group=g)
    ta.write_tile(0, 0, np.eye(8))
    ta.write_tile(0, 2, np.ones((8, 4)))
    s = store_status(store)
    [m] = s["meta_kernels"]
    assert (m["array"], m["tiles_done"], m["tiles_total"]) == ("phi", 2, 6)
    assert (m["pairs_done"], m["pairs_total"]) == (36 + 32, 20 * 21 // 2)
    assert str(phi) in format_status(s) and "  tiles      2 / 6 done" in format_status(s)


def test_xarray_opens_the_store(finished):
    xr = pytest.importorskip("xarray")
    path, gram, _ = finished
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["images"].dims == ("image", "channel", "y", "x") and ds["scales"].dims[0] == "image"
    assert ds.sizes["image"] == 84 and ds["gram"].dims == ("gram_i", "gram_j")
    g = ds["gram"].values
    upper = ~np.isnan(g)
    assert np.array_equal(g[upper], gram[upper])
    for name, arr in zarr.open_group(str(path), mode="r").arrays():
        assert len(set(arr.metadata.dimension_names)) == arr.ndim, name
