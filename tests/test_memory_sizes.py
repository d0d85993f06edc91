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
