"""im2col / col2im (Eq. 25, 29): loop twin, exact adjoint, output size, homogeneous column."""
import numpy as np
import pytest
from hypothesis import given

from kfc_ref.backend import to_numpy
from kfc_ref.nn.conv_products import col2im_of_product
from kfc_ref.nn.expand import (ConvGeometry, col2im, col2im_matrix, expand_homogeneous, im2col,
                             im2col_matrix, im2col_matrix_slices, output_size)
from kfc_ref.nn.loops import im2col_loops
from guarded_xp import asguarded
from strategies import conv_cases, seeds, normal

# Both sides sum the same float64 products in a different order: the difference is at most
# ~(number of terms) * 2.2e-16 * sum|terms|, below 1e-12 * sum|terms| for these sizes.
EXACT_RTOL = 1e-12


def _geom(c):
    return ConvGeometry(c["kh"], c["kw"], c["stride"], c["padding"], c["dilation"])


@given(conv_cases(), seeds)
def test_im2col_equals_loop_twin(to_xp, case, seed):
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    fast = to_numpy(im2col(to_xp(x), _geom(case)))
    slow = im2col_loops(x, case["kh"], case["kw"], case["stride"], case["padding"],
                        case["dilation"])
    np.testing.assert_array_equal(fast, slow)   # pure copies: bit-exact


@given(conv_cases(), seeds)
def test_col2im_is_exact_adjoint(to_xp, case, seed):
    geom = _geom(case)
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    cols = to_numpy(im2col(to_xp(x), geom))
    y = normal(seed + 1, *cols.shape)
    lhs = float(np.sum(cols * y))
    rhs = float(np.sum(x * to_numpy(col2im(to_xp(y), x.shape, geom))))
    # Summation round-off is bounded by (number of terms) * u * sum |terms|.
    assert abs(lhs - rhs) <= EXACT_RTOL * float(np.sum(np.abs(cols * y))) + 1e-300


@pytest.mark.host_only("output-size arithmetic on Python ints, checked against the host loop twin")
@given(conv_cases())
def test_output_size_matches_loop_twin(case):
    geom = _geom(case)
    ho, wo = geom.output_shape(case["h"], case["w"])
    x = np.zeros((1, 1, case["h"], case["w"]))
    assert im2col_loops(x, case["kh"], case["kw"], case["stride"], case["padding"],
                        case["dilation"]).shape[1] == ho * wo
    assert ho == output_size(case["h"], case["kh"], case["stride"], case["padding"],
                             case["dilation"])


def test_homogeneous_column_is_all_ones_also_at_the_border(to_xp):
    x = to_xp(np.zeros((2, 1, 3, 3)))    # all-zero input: every patch entry is 0
    A_H = to_numpy(expand_homogeneous(im2col(x, ConvGeometry(3, 3, padding=1))))
    assert A_H.shape == (2, 9, 10)
    np.testing.assert_array_equal(A_H[:, :, 0], 1.0)
    np.testing.assert_array_equal(A_H[:, :, 1:], 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kh=0, kw=3), "kernel height"),
    (dict(kh=3, kw=3, stride=0), "stride"),
    (dict(kh=3, kw=3, padding=-1), "padding"),
    (dict(kh=3, kw=3, dilation=0), "dilation"),
])
@pytest.mark.host_only("ConvGeometry argument validation, no arrays")
def test_bad_geometry_is_rejected_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvGeometry(**kwargs)


@pytest.mark.host_only("ConvGeometry argument validation, no arrays")
def test_kernel_larger_than_padded_input_is_rejected():
    with pytest.raises(ValueError, match="larger than the padded input 4x4"):
        ConvGeometry(5, 5, padding=1).output_shape(2, 2)


# ---------------------------------------------------------------- the fast kernels' own twins


@given(conv_cases(), seeds)
def test_one_gather_equals_the_slice_loop_in_both_layouts(to_xp, case, seed):
    """im2col as one strided gather (NumPy's as_strided, the guarded namespace's take of a
    cached index, and the --xp module's: CuPy under --xp cupy) equals the |Delta| slice
    copies, bit for bit, for (N, J, H, W) input and for the network's channel-major
    (J, N, H, W) input."""
    geom = _geom(case)
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    for cm, arr in ((False, x), (True, np.ascontiguousarray(x.transpose(1, 0, 2, 3)))):
        twin = im2col_matrix_slices(arr, geom, channel_major=cm)
        np.testing.assert_array_equal(im2col_matrix(arr, geom, channel_major=cm), twin)
        for move in (asguarded, to_xp):
            np.testing.assert_array_equal(
                to_numpy(im2col_matrix(move(arr), geom, channel_major=cm)), twin)


@given(conv_cases(), seeds)
def test_col2im_scatter_equals_the_slice_loop(to_xp, case, seed):
    """col2im as one scatter-add (np.add.at here, a weighted bincount on the guarded
    namespace, cupyx.scatter_add on CuPy: the --xp module) equals the slice-add loop; both are
    the adjoint."""
    geom = _geom(case)
    ho, wo = geom.output_shape(case["h"], case["w"])
    shape_cm = (case["j"], case["n"], case["h"], case["w"])
    y = normal(seed, case["j"] * geom.num_offsets, case["n"] * ho * wo)
    slices = col2im_matrix(y, shape_cm, geom, method="slices")
    np.testing.assert_allclose(col2im_matrix(y, shape_cm, geom, method="scatter"), slices,
                               rtol=EXACT_RTOL, atol=EXACT_RTOL)
    for move in (asguarded, to_xp):
        np.testing.assert_allclose(to_numpy(col2im_matrix(move(y), shape_cm, geom)), slices,
                                   rtol=EXACT_RTOL, atol=EXACT_RTOL)


def test_col2im_rejects_an_unknown_method(to_xp):
    with pytest.raises(ValueError, match="method='loop' is not allowed"):
        col2im_matrix(to_xp(np.zeros((9, 4))), (1, 1, 2, 2), ConvGeometry(3, 3, padding=1),
                      method="loop")


@given(conv_cases(), seeds)
def test_per_offset_input_gradient_equals_col2im_of_the_product(to_xp, case, seed):
    """NumPy's fused input gradient (one GEMM per offset, added into its slice) and the
    few-launch one (guarded, and the --xp module: one GEMM, one scatter-add) both equal
    col2im(W^T DS^T)."""
    geom = _geom(case)
    ho, wo = geom.output_shape(case["h"], case["w"])
    shape_cm = (case["j"], case["n"], case["h"], case["w"])
    W = normal(seed, case["i"], case["j"] * geom.num_offsets)
    ds = normal(seed + 1, case["i"], case["n"] * ho * wo)
    ref = col2im_matrix(W.T @ ds, shape_cm, geom, method="slices")
    np.testing.assert_allclose(col2im_of_product(W, ds, shape_cm, geom), ref,
                               rtol=EXACT_RTOL, atol=EXACT_RTOL)
    for move in (asguarded, to_xp):
        np.testing.assert_allclose(to_numpy(col2im_of_product(move(W), move(ds), shape_cm, geom)),
                                   ref, rtol=EXACT_RTOL, atol=EXACT_RTOL)
