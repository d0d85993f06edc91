"""A damaged or truncated JSON document mnkpipe reads is named by its file: one line, exit 1, no traceback."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.files import read_json
from mnkpipe.pipeline.driver import compute_kernel

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "key.json"
    path.write_text('{"format": "mnkpipe')
    with pytest.raises(ValueError, match=f"key.json at {path} is not valid JSON"):
        read_json(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="the meta-kernel key at .* is not valid JSON"):
        read_json(path, "the meta-kernel key")


def test_a_truncated_results_json_is_named_by_report_and_evaluate(tmp_path, omniglot_root):
    store = tmp_path / "smoke.zarr"
    compute_kernel(SMOKE, store, data=str(omniglot_root), cpus=2, progress=False)
    out = tmp_path / "results"
    evaluate = ["evaluate", "--store", str(store), "--out", str(out), "--seeds", "1", "--methods", "mnk"]
    r = CliRunner().invoke(main, evaluate)
    assert r.exit_code == 0, r.output
    results = out / "results.json"
    results.write_bytes(results.read_bytes()[:100])
    cut = results.read_bytes()
    for args in (["report", "--out", str(out)], evaluate):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"results.json at {results} is not valid JSON" in r.output, r.output
        assert results.read_bytes() == cut  # left as it was for the user to restore
