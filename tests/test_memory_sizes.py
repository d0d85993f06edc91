"""Sizes whose arrays would not fit in memory are refused before anything is allocated, naming the option.

Run only in a child process whose address space is capped (RLIMIT_AS), so that a failure cannot exhaust the host."""

import resource
import subprocess
import sys

LIMIT = 4 * 2 ** 30


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def test_gram_with_a_size_too_big_for_memory_is_refused_naming_size(omniglot_root):
    r = subprocess.run([sys.executable, "-m", "mnkpipe.cli", "gram", "--size", "2000", "--n", "40", "--data",
                        str(omniglot_root), "--backend", "cpu"], preexec_fn=_capped, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out
    assert "--size 2000" in out and "GiB" in out and "address-space limit" in out, out


PHI_READ = """
import resource, sys, numpy as np, zarr
from mnkpipe.evaluation.phi import read_phi
from mnkpipe.memory import TooBigError
from mnkpipe.pipeline.plan import plan_full
from mnkpipe.store import add_tiled_array
root = zarr.create_group(sys.argv[1])
add_tiled_array(root, "mnk", 30000, 1000, "float64", plan_full(30000, 1000))  # 7.2 GB once read, 14.4 mirrored
resource.setrlimit(resource.RLIMIT_AS, (%d, %d))
try:
    read_phi(sys.argv[1])
except TooBigError as e:
    print(e)
""" % (LIMIT, LIMIT)


def test_a_meta_kernel_array_too_big_for_memory_is_refused_before_it_is_read(tmp_path):
    r = subprocess.run([sys.executable, "-c", PHI_READ, str(tmp_path / "phi")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"the meta-kernel array {tmp_path / 'phi'} (30000 x 30000" in r.stdout and "GiB" in r.stdout, r.stdout
