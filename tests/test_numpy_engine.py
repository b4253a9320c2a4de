"""NumPy engine speed paths: the threaded copy of kfc_ref.backend must give exactly the
single-threaded result (it only splits a copy; host NumPy only), and the
transposed-convolution input gradient must equal col2im(W^T DS^T) (on the --xp module)."""
import numpy as np
import pytest

import kfc_ref.backend as backend
from kfc_ref.backend import to_numpy
from kfc_ref.nn.expand import (
    ConvGeometry,
    col2im_matrix,
    col2im_of_product,
    im2col_matrix,
    im2col_matrix_slices,
    transposed_padding,
)


THREADED_COPY = pytest.mark.host_only("the threaded copy is the NumPy engine's (host threads)")


@THREADED_COPY
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_parallel_copy_equals_copyto(monkeypatch, threads):
    monkeypatch.setattr(backend, "PARALLEL_COPY_MIN_SIZE", 1)
    x = np.random.default_rng(0).normal(size=(5, 4, 9, 11)).astype("float32")
    src = x[:, :, ::2, 1::3]                   # a strided view, as im2col copies
    out = np.full(src.shape, np.nan, dtype=src.dtype)
    backend.parallel_copy(out, src, threads)
    np.testing.assert_array_equal(out, src)


@THREADED_COPY
def test_parallel_copy_negative_control(monkeypatch):
    """A copy that skipped a part would leave NaN: the check above can fail."""
    out = np.full((4, 3), np.nan)
    backend.parallel_copy(out[:2], np.ones((2, 3)), 2)
    assert np.isnan(out).any()


@THREADED_COPY
def test_threaded_im2col_equals_slice_twin(monkeypatch):
    monkeypatch.setattr(backend, "PARALLEL_COPY_MIN_SIZE", 1)
    x = np.random.default_rng(1).normal(size=(3, 4, 7, 6))
    geom = ConvGeometry(3, 2, stride=2, padding=1, dilation=1)
    np.testing.assert_array_equal(im2col_matrix(x, geom, channel_major=True),
                                  im2col_matrix_slices(x, geom, channel_major=True))


@THREADED_COPY
def test_host_threads():
    assert 1 <= backend.host_threads() <= 4


@pytest.mark.parametrize("k,padding,dilation,i,j", [
    (5, 2, 1, 3, 4), (3, 1, 1, 4, 4), (3, 0, 1, 2, 3), (3, 2, 2, 2, 2), (1, 0, 1, 3, 2),
    (3, 2, 1, 2, 2)])
def test_transposed_input_gradient_equals_col2im_of_the_product(k, padding, dilation, i, j,
                                                                to_xp):
    """The stride-1 input gradient as a convolution with flipped kernels equals
    col2im(W^T DS^T) (float64; the sums differ only in order)."""
    geom = ConvGeometry(k, k, 1, padding, dilation)
    n, h, w = 2, 6, 5
    ho, wo = geom.output_shape(h, w)
    rng = np.random.default_rng(k + padding + dilation)
    W = to_xp(rng.normal(size=(i, j * k * k)))
    ds = to_xp(rng.normal(size=(i, n * ho * wo)))
    shape_cm = (j, n, h, w)
    ref = to_numpy(col2im_matrix(W.T @ ds, shape_cm, geom, method="slices"))
    if transposed_padding(geom) is None:
        with pytest.raises(ValueError, match="method='transposed' needs stride 1"):
            col2im_of_product(W, ds, shape_cm, geom, method="transposed")
        return
    got = to_numpy(col2im_of_product(W, ds, shape_cm, geom, method="transposed"))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)   # float64 rounding only
    # negative control: the same gather with unflipped kernels is wrong when k > 1
    if k > 1:
        unflipped = W.reshape(i, j, k * k).transpose(1, 0, 2).reshape(j, -1)
        cols = im2col_matrix(ds.reshape(i, n, ho, wo),
                             ConvGeometry(k, k, 1, transposed_padding(geom), dilation),
                             channel_major=True)
        assert not np.allclose(to_numpy((unflipped @ cols).reshape(j, n, h, w)), ref)


@pytest.mark.host_only("geometry arithmetic, no arrays")
def test_transposed_is_refused_for_strided_convs():
    geom = ConvGeometry(3, 3, stride=2, padding=1)
    assert transposed_padding(geom) is None
    assert transposed_padding(ConvGeometry(3, 3, 1, 1)) == 1
    assert transposed_padding(ConvGeometry(3, 5, 1, 1)) is None
