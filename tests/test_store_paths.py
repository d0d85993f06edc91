"""--store names a new folder: `~` is the home folder; system folders and the home folder itself are refused."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from mnkpipe.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"

COMMANDS = {  # each command that takes a store, with the store given as it takes it
    "compute-kernel": lambda s: ["compute-kernel", "--config", str(SMOKE), "--store", s, "--no-progress"],
    "status": lambda s: ["status", s],
    "verify": lambda s: ["verify", s],
    "evaluate": lambda s: ["evaluate", "--store", s],
    "baselines": lambda s: ["baselines", "--store", s],
    "report": lambda s: ["report", "--store", s],
}


@pytest.mark.parametrize("folder", ["/", "/usr", "/etc", "/bin", "~", "HOME"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_system_folders_and_the_home_folder_are_refused_as_stores(command, folder, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    store = str(home) if folder == "HOME" else folder
    r = CliRunner().invoke(main, COMMANDS[command](store), env={"HOME": str(home)})
    assert r.exit_code not in (0, None) and "Traceback" not in r.output and r.exception is not None
    assert "system folder or your home folder" in r.output and "--store" in r.output, r.output
    assert list(home.iterdir()) == []  # nothing written beside or inside the home folder
    assert not Path("/.lock").exists() and not Path("/usr.lock").exists()


def test_a_tilde_in_store_is_the_home_folder(tmp_path, omniglot_root, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, ["compute-kernel", "--config", str(SMOKE), "--store", "~/smoke.zarr",
                                  "--data", str(omniglot_root), "--cpus", "2", "--no-progress"],
                           env={"HOME": str(home)})
    assert r.exit_code == 0, r.output
    assert (home / "smoke.zarr" / "zarr.json").exists() and list(work.iterdir()) == []
    r = CliRunner().invoke(main, ["status", "~/smoke.zarr"], env={"HOME": str(home)})
    assert r.exit_code == 0 and "59" in r.output, r.output
