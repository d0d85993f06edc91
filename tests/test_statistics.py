"""Intervals of results.json: Student-t quantiles, and paired differences matched by number of training tasks."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnkpipe.evaluation.results import ci95, paired_differences, t975

ROOT = Path(__file__).resolve().parents[1]

# Two-sided 95% quantiles of Student's t (R: qt(0.975, df)), including degrees of freedom between table rows.
KNOWN = {1: 12.7062047, 4: 2.7764451, 11: 2.2009852, 19: 2.0930241, 39: 2.0226909, 99: 1.9842170, 1000: 1.9623391}


@pytest.mark.parametrize("df", sorted(KNOWN))
def test_t975_known_values(df):
    assert t975(df) == pytest.approx(KNOWN[df], rel=1e-7)


def test_ci95_uses_the_exact_quantile():
    x = np.array([0.2, 0.4, 0.6, 0.8, 1.0])  # mean 0.6, sd sqrt(0.1), 4 degrees of freedom
    m, lo, hi = ci95(x)
    h = 2.7764451 * math.sqrt(0.1) / math.sqrt(5)
    assert (m, lo, hi) == pytest.approx((0.6, 0.6 - h, 0.6 + h), rel=1e-7)


def record(counts, per_task):
    return {"n_train_tasks": counts, "per_task": per_task}


def test_paired_differences_match_points_by_count():
    a = record([1, 2, 4], [[0.5, 0.7, 0.9], [0.6, 0.8, 1.0], [0.7, 0.9, 0.9]])
    b = record([4, 2], [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6]])  # other order, no point at 1 task
    d = paired_differences(a, b)
    assert sorted(d) == [2, 4]
    for n, pa, pb in ((2, a["per_task"][1], b["per_task"][1]), (4, a["per_task"][2], b["per_task"][0])):
        diff = np.subtract(pa, pb)
        h = t975(2) * diff.std(ddof=1) / math.sqrt(3)
        assert d[n] == pytest.approx((diff.mean(), diff.mean() - h, diff.mean() + h), rel=1e-12)
    with pytest.raises(ValueError, match="not the same test tasks"):
        paired_differences(a, record([2], [[0.5, 0.5]]))


def test_bench_table_pairs_by_count(tmp_path):
    methods = {"A": record([1, 2, 4], [[0.5, 0.7, 0.9], [0.6, 0.8, 1.0], [0.7, 0.9, 0.9]]),
               "B": record([2, 4], [[0.6, 0.8, 1.0], [0.7, 0.9, 0.9]])}  # B equals A at 2 and 4 tasks
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"methods": methods}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "paired_differences.py"), str(path), "A", "B"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| B |"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["B", "-", "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]"]
