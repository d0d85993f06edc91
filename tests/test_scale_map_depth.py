"""cntk_block refuses scale maps shallower than the depth asked for, on every backend (no shallower kernel)."""

import numpy as np
import pytest

from mnkpipe.kernels import cntk_block, scale_maps


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("which", ["l1", "l2"])
def test_shallow_scale_maps_are_refused(backend, which):
    x = np.random.default_rng(0).normal(size=(3, 1, 6, 6)).astype(np.float32)
    deep, shallow = scale_maps(x, 5), scale_maps(x, 3)
    l1, l2 = (shallow, deep) if which == "l1" else (deep, shallow)
    with pytest.raises(ValueError, match=rf"{which} holds scale maps of 2 layers .*depth 5 needs 4"):
        cntk_block(x, l1, x, l2, depth=5, backend=backend)
    assert np.array_equal(cntk_block(x, deep, x, deep, depth=3, backend=backend)[:1],
                          cntk_block(x, shallow, x, shallow, depth=3, backend=backend)[:1])
