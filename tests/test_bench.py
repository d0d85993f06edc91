"""The benchmarks that rewrite the kernel's text still find that text (they stop when it changed)."""

import inspect
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cntk_cpu_ceiling as ceiling  # noqa: E402

from mnkpipe.kernels import cntk_cpu  # noqa: E402


@pytest.mark.parametrize("name", ceiling.KERNEL_VARIANTS)
def test_ceiling_kernel_variants_match_the_kernel(name):
    src = inspect.getsource(cntk_cpu)
    assert ceiling.replaced(src, ceiling.KERNEL_VARIANTS[name], name) != src


@pytest.mark.parametrize("name", [n for n, c in ceiling.V_VARIANTS.items() if c])
def test_ceiling_v_variants_match_v(name):
    src = inspect.getsource(cntk_cpu._v)
    assert ceiling.replaced(src, ceiling.V_VARIANTS[name], name) != src


def test_ceiling_names_a_variant_whose_text_is_gone():
    with pytest.raises(SystemExit, match="'gone'.*no longer in mnkpipe/kernels/cntk_cpu.py"):
        ceiling.replaced("kernel text", [("not there", "x")], "gone")
