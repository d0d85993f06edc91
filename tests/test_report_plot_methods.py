"""report --plot-methods: the figure draws the chosen methods, the tables keep every method, an unknown key is named."""

import shutil
from pathlib import Path

from click.testing import CliRunner

from mnkpipe.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "omniglot-5w5s-cpu" / "results.json"


def test_plot_methods_choose_the_figure_and_keep_the_tables(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    shutil.copyfile(RESULTS, out / "results.json")
    r = CliRunner().invoke(main, ["report", "--out", str(out), "--plot-methods", "mnk/embedding/K1,r_t/onehot"])
    assert r.exit_code == 0, r.output
    assert (out / "accuracy.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "1-NN on pixels" in md and "MNK meta term alone" in md  # not drawn, still in the table
    r = CliRunner().invoke(main, ["report", "--out", str(out), "--plot-methods", "mnk/embedding/K1,mnk/nope"])
    assert r.exit_code == 1 and "--plot-methods: mnk/nope not in" in r.output and "Traceback" not in r.output
