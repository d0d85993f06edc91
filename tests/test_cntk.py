"""CNTK backends against neural-tangents' golden values, the float64 oracle, and the kernel's properties."""

import numpy as np
import pytest
from support.numerics import golden_case, rel_err

from mnkpipe.kernels import cntk, scale_maps
from mnkpipe.kernels.cntk_reference import aggregate, cntk_reference, relu_step

TOL = {"reference": 1e-8, "cpu": 2e-5}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("depth", [2, 3, 5, 8])
@pytest.mark.parametrize("head", ["gap", "vanilla"])
def test_random12_golden(golden, backend, depth, head):
    x, ref, depth, gap = golden_case(golden, f"random12_d{depth}_{head}")
    assert rel_err(cntk(x, depth=depth, gap=gap, backend=backend), ref) <= TOL[backend]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_channel_golden(golden, backend):
    # neural-tangents divides the input covariance by C = 2; docs/math.md eq. (1) does not (golden_case scales).
    x, ref, depth, gap = golden_case(golden, "random10c2_d4_gap")
    assert rel_err(cntk(x, depth=depth, gap=gap, backend=backend), ref) <= TOL[backend]


@pytest.mark.parametrize("backend,depths", [("reference", [3]), ("cpu", [3, 10])])
def test_omniglot_golden(golden, backend, depths):
    for d in depths:
        x, ref, depth, gap = golden_case(golden, f"omniglot28_d{d}_gap")
        assert rel_err(cntk(x, depth=depth, gap=gap, backend=backend), ref) <= TOL[backend]


def test_scale_maps_are_the_diagonal_of_the_full_recursion():
    x = np.random.default_rng(0).normal(size=(2, 6, 5))
    l = scale_maps(x[None], 4)[0]
    s = aggregate(np.einsum("cab,cde->abde", x, x))
    t = s.copy()
    for h in range(3):
        assert np.allclose(np.sqrt(np.einsum("abab->ab", s)), l[h], rtol=1e-13)
        s, t = relu_step(s, t, l[h], l[h])
        s, t = aggregate(s), aggregate(t)


@pytest.mark.parametrize("gap", [True, False])
@pytest.mark.parametrize("fix", [False, True])
def test_cpu_matches_oracle_odd_sizes_three_channels(gap, fix):
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(3, 3, 7, 9)), rng.normal(size=(4, 3, 7, 9))
    ref = cntk_reference(x1, x2, depth=4, gap=gap, fix=fix)
    assert rel_err(cntk(x1, x2, depth=4, gap=gap, fix=fix, backend="cpu"), ref) <= 2e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_symmetric_psd_and_homogeneous(backend):
    x = np.random.default_rng(2).normal(size=(6, 1, 8, 8))
    k = cntk(x, depth=5, backend=backend)
    assert np.array_equal(k, k.T)
    assert np.linalg.eigvalsh(k).min() > -1e-6 * np.abs(k).max()
    k3 = cntk(3.0 * x, depth=5, backend=backend)
    assert rel_err(k3, 9.0 * k) <= TOL[backend]
    # the cross form agrees with the symmetric form
    assert rel_err(cntk(x[:2], x, depth=5, backend=backend), k[:2]) <= TOL[backend]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_degenerate_zero_neighbourhoods_are_defined(backend):
    x = np.random.default_rng(3).normal(size=(3, 1, 10, 10))
    x[:, :, :4, :] = 0.0  # zero rows: l = 0 on the first layers there, rho = 0/0 in the reference code
    x[2] = 0.0            # an all-zero image
    k = cntk(x, depth=4, backend=backend)
    assert np.isfinite(k).all()
    assert np.all(k[2] == 0) and np.all(k[:, 2] == 0)  # K(0, z) = 0: the limit rho -> 0 with o = 0
    # the limit is continuous: a tiny perturbation of the zero rows changes K by a tiny amount
    xe = x.copy()
    xe[:2, :, :4, :] = 1e-7
    assert rel_err(cntk(xe[:2], depth=4, backend=backend), k[:2, :2]) < 1e-4


def test_bad_input_raises_with_reason():
    good = np.zeros((2, 1, 5, 5))
    with pytest.raises(ValueError, match="ndim=3"):
        cntk(np.zeros((2, 5, 5)), depth=3)
    nan = good.copy()
    nan[1, 0, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 0, 2, 3\)"):
        cntk(nan, depth=3)
    with pytest.raises(ValueError, match="same \\(C, H, W\\)"):
        cntk(good, np.zeros((2, 2, 5, 5)), depth=3)
    with pytest.raises(ValueError, match="depth"):
        cntk(good, depth=1)
    with pytest.raises(ValueError, match="unknown CNTK backend"):
        cntk(good, depth=3, backend="tpu")


MAGNITUDES = [(1e-15, 1e-15), (1e-30, 1e-30), (5e18, 5e18), (1e150, 1e150), (1e-30, 5e18), (1e-200, 1e200),
              (1e160, 1e-160)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("a,b", MAGNITUDES, ids=lambda v: f"{v:g}")
def test_homogeneous_for_any_finite_magnitude(backend, a, b):
    """K(a x, b z) = a b K(x, z) for any finite a, b > 0 (issue 10, item 3): float32 and float64 ranges included."""
    rng = np.random.default_rng(4)
    x, z = rng.normal(size=(3, 2, 7, 6)), rng.normal(size=(2, 2, 7, 6))
    x[0, :, :3] = 0.0  # a zero patch: l = 0 there at the first layers
    for gap, fix in [(True, False), (False, True)]:
        k = cntk(x, z, depth=5, gap=gap, fix=fix, backend=backend)
        kab = cntk(a * x, b * z, depth=5, gap=gap, fix=fix, backend=backend)
        assert np.isfinite(kab).all()
        assert rel_err(kab / (a * b), k) <= {"reference": 1e-12, "cpu": 1e-6}[backend], (gap, fix)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gram_of_images_of_mixed_magnitudes(backend):
    """One symmetric Gram over images scaled by 1e-30 .. 1e150: K_ij = a_i a_j K0_ij."""
    x = np.random.default_rng(5).normal(size=(5, 1, 6, 6))
    a = np.array([1e-30, 1.0, 5e18, 1e150, 3e-20])
    k0 = cntk(x, depth=4, backend=backend)
    k = cntk(a[:, None, None, None] * x, depth=4, backend=backend)
    assert rel_err(k / np.outer(a, a), k0) <= {"reference": 1e-12, "cpu": 1e-6}[backend]


def test_ordinary_inputs_unchanged_by_power_of_two_normalisation():
    """Dividing an image by a power of two is exact: scale maps of 2^k x are 2^k times those of x, bit for bit."""
    x = np.random.default_rng(6).normal(size=(3, 2, 5, 7))
    for k in (-60, -3, 1, 70):
        np.testing.assert_array_equal(scale_maps(np.ldexp(x, k), 4), np.ldexp(scale_maps(x, 4), k))
        np.testing.assert_array_equal(cntk(np.ldexp(x, k), depth=4, backend="cpu"),
                                      np.ldexp(cntk(x, depth=4, backend="cpu"), 2 * k))


EDGE_SHAPES = [(1, 1, 7), (1, 6, 1), (1, 2, 2), (1, 3, 3), (3, 5, 4), (2, 13, 17)]  # (C, H, W)


@pytest.mark.parametrize("c,h,w", EDGE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("gap,fix", [(True, False), (True, True), (False, False), (False, True)])
def test_cpu_tile_edge_cases_match_oracle(c, h, w, gap, fix):
    """Rectangular and symmetric Gram tiles: one-row / one-column / tiny images, channels, fix, vanilla; pair counts
    that leave lanes of a batch empty; a zero patch and an all-zero image."""
    rng = np.random.default_rng(h * 100 + w)
    x = rng.normal(size=(7, c, h, w))
    x[1, :, : h // 2 + 1, : w // 2 + 1] = 0.0
    x[6] = 0.0
    ref = cntk_reference(x, depth=4, gap=gap, fix=fix)
    k = cntk(x, depth=4, gap=gap, fix=fix, backend="cpu")
    assert np.array_equal(k, k.T) and rel_err(k, ref) <= 2e-5
    assert rel_err(cntk(x[:3], x[2:], depth=4, gap=gap, fix=fix, backend="cpu"), ref[:3, 2:]) <= 2e-5
    assert np.all(k[6] == 0.0)


def test_cpu_64x64_matches_oracle():
    """The largest image size of the tests: one pair (the oracle's 4-D tensors are 130 MB each here)."""
    rng = np.random.default_rng(9)
    x1, x2 = rng.normal(size=(1, 1, 64, 64)), rng.normal(size=(1, 1, 64, 64))
    ref = cntk_reference(x1, x2, depth=3)
    assert rel_err(cntk(x1, x2, depth=3, backend="cpu"), ref) <= 2e-5


@pytest.mark.parametrize("shape", [(2, 9, 11), (2, 9, 13), (1, 17, 16)], ids=["64-lanes", "32-lanes", "16-lanes"])
def test_cpu_block_bits_do_not_depend_on_batching(shape):
    """K(x_i, x_j) has the same bits in any block it is computed in (batches, lanes and threads differ), as long as
    x_i stays on the row side (the symmetric Gram computes i <= j and mirrors it)."""
    x = np.random.default_rng(10).normal(size=(21, *shape))
    k = cntk(x, depth=5, backend="cpu")
    np.testing.assert_array_equal(cntk(x[3:5], x[5:19], depth=5, backend="cpu"), k[3:5, 5:19])
    np.testing.assert_array_equal(cntk(x[7:16], depth=5, backend="cpu"), k[7:16, 7:16])
    np.testing.assert_array_equal(cntk(x[:1], x[20:], depth=5, backend="cpu"), k[:1, 20:])


@pytest.mark.parametrize("ring_bytes", [1, 160_000, 230_000], ids=["1 tile", "2 tiles", "3 tiles"])
def test_cpu_bits_do_not_depend_on_the_tile_group(monkeypatch, ring_bytes):
    """However many tiles run side by side (as many as keep their rings within RING_BYTES: 4 here by default), the
    Gram has the same bits."""
    from mnkpipe.kernels import cntk_cpu

    x = np.random.default_rng(12).normal(size=(9, 1, 11, 13))
    assert cntk_cpu.tile_group(13, 8) == 4
    k = cntk(x, depth=8, backend="cpu")
    monkeypatch.setattr(cntk_cpu, "RING_BYTES", ring_bytes)
    assert cntk_cpu.tile_group(13, 8) == {1: 1, 160_000: 2, 230_000: 3}[ring_bytes]
    np.testing.assert_array_equal(cntk(x, depth=8, backend="cpu"), k)


def test_cpu_group_shrinks_at_depth_and_buffers_are_cache_line_aligned():
    """28x28: four tiles side by side up to depth 12, three at 13, two at 20 (their 6 (d - 1) ring rows of 29 x 16
    floats each stay within 512 KB); the kernel's work buffers start on a 64-byte boundary whatever numba allocates."""
    from mnkpipe.kernels.cntk_cpu import _zeros64, tile_group

    assert [tile_group(28, d) for d in (2, 3, 10, 12, 13, 20, 40)] == [4, 4, 4, 4, 3, 2, 1]
    for n in (1, 17, 1000, 123_457):
        z = _zeros64(n)
        assert z.ctypes.data % 64 == 0 and z.shape == (n,) and z.dtype == np.float32 and not z.any()


def test_cpu_lane_maps_are_the_float64_formula_rounded_once():
    """The compiled lane maps have numpy's bits: a = float32(l / sqrt(9 pi)), r = float32(1 / l), 0 where l < L_TINY
    (zero, tiny, huge and infinite l, and a strided slice of the layers)."""
    import math

    from mnkpipe.kernels.cntk_cpu import L_TINY, lane_maps

    l = np.exp(np.random.default_rng(13).normal(0.0, 30.0, size=(5, 11, 7, 6)))
    l[0, 0, 0, :] = [0.0, L_TINY, 0.999 * L_TINY, 1e-300, 1e300, np.inf]
    for v in (l, l[:, :9], l[:, 2:9:2, ::2]):
        a, r = lane_maps(v)
        with np.errstate(divide="ignore", over="ignore"):
            a0 = (v / math.sqrt(9.0 * math.pi)).astype(np.float32)
            r0 = np.where(v >= L_TINY, 1.0 / v, 0.0).astype(np.float32)
        assert a.dtype == r.dtype == np.float32 and a.shape == v.shape
        np.testing.assert_array_equal(a.view(np.uint32), a0.view(np.uint32))
        np.testing.assert_array_equal(r.view(np.uint32), r0.view(np.uint32))


def test_block_from_float32_inputs_of_tiny_magnitude():
    """The worker path: float32 images and float32 scale maps as a store holds them, scaled by 1e-30."""
    from mnkpipe.kernels import cntk_block

    x = np.random.default_rng(11).normal(size=(4, 1, 6, 7))
    k = cntk(x, depth=4, backend="cpu")
    xs = (1e-30 * x).astype(np.float32)
    ls = scale_maps(xs, 4).astype(np.float32)
    kb = cntk_block(xs, ls, xs, ls, depth=4, upper=True, backend="cpu")
    assert rel_err(kb / 1e-60, k) <= 1e-6
