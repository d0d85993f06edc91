"""A disk that fills while a store is created: one line naming the store and the full disk, no lock file left, and
the half-made store (its creation marker still there) rebuilt by the same command once there is room."""

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.store import CREATION_MARKER, open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (the smoke store's images alone are larger), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_while_creating_a_store_names_it_and_a_rerun_rebuilds(small_disk, omniglot_root):
    store = small_disk / "smoke.zarr"
    args = ["compute-kernel", "--config", str(SMOKE), "--store", str(store), "--data", str(omniglot_root),
            "--cpus", "2", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"the disk holding {store} is full" in r.output and "--store" in r.output, r.output
    assert (store / CREATION_MARKER).exists() and not Path(f"{store}.lock").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert not (store / CREATION_MARKER).exists() and open_store(store).missing_tiles() == []


@pytest.mark.parametrize("command", [["evaluate", "--augment", "1,2", "--cpus", "2"],
                                     ["baselines", "--meta-steps", "4", "--methods", "maml"]])
def test_disk_full_while_writing_results_names_the_folder(small_disk, shared_smoke_store, command):
    out = small_disk / "results"
    r = CliRunner().invoke(main, [command[0], "--store", str(shared_smoke_store), "--out", str(out), "--no-progress",
                                  *command[1:]])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "is full" in r.output and str(small_disk) in r.output, r.output
    left = [p for p in small_disk.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert left == [], left
