"""Host-side speed helpers of kfc_ref.backend: the threaded copy must give exactly the
single-threaded result (it only splits a copy), and the allocator setting must be harmless."""
import numpy as np
import pytest

import kfc_ref.backend as backend
from kfc_ref.nn.expand import ConvGeometry, im2col_matrix, im2col_matrix_slices


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_parallel_copy_equals_copyto(monkeypatch, threads):
    monkeypatch.setattr(backend, "PARALLEL_COPY_MIN_SIZE", 1)
    x = np.random.default_rng(0).normal(size=(5, 4, 9, 11)).astype("float32")
    src = x[:, :, ::2, 1::3]                   # a strided view, as im2col copies
    out = np.full(src.shape, np.nan, dtype=src.dtype)
    backend.parallel_copy(out, src, threads)
    np.testing.assert_array_equal(out, src)


def test_parallel_copy_negative_control(monkeypatch):
    """A copy that skipped a part would leave NaN: the check above can fail."""
    out = np.full((4, 3), np.nan)
    backend.parallel_copy(out[:2], np.ones((2, 3)), 2)
    assert np.isnan(out).any()


def test_threaded_im2col_equals_slice_twin(monkeypatch):
    monkeypatch.setattr(backend, "PARALLEL_COPY_MIN_SIZE", 1)
    x = np.random.default_rng(1).normal(size=(3, 4, 7, 6))
    geom = ConvGeometry(3, 2, stride=2, padding=1, dilation=1)
    np.testing.assert_array_equal(im2col_matrix(x, geom, channel_major=True),
                                  im2col_matrix_slices(x, geom, channel_major=True))


def test_host_threads_and_allocator():
    assert 1 <= backend.host_threads() <= 4
    assert backend.keep_freed_host_memory() in (True, False)
    big = np.ones(1 << 22)                       # still allocates and frees normally
    assert big.sum() == 1 << 22
