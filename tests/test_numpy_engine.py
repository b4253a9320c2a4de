"""NumPy engine speed paths: the threaded copy of kfc_ref.backend must give exactly the
single-threaded result (it only splits a copy; host NumPy only); the blockwise conv products
(cache-sized blocks of [[A]]^T on parallel threads, one BLAS thread each) must equal the
loop twins for every geometry and every block size; and the transposed-convolution input
gradient must equal col2im(W^T DS^T) (on the --xp module)."""
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kfc_ref.backend as backend
import kfc_ref.nn.conv_products as conv_products
from kfc_ref.backend import to_numpy
from kfc_ref.nn.conv_products import (
    col2im_of_product,
    conv_product,
    patch_gradient,
    patch_moments,
    row_lag_moments,
    transposed_padding,
)
from kfc_ref.nn.expand import (
    ConvGeometry,
    col2im_matrix,
    im2col_matrix,
    im2col_matrix_slices,
    padded_input,
)
from kfc_ref.nn.layers import Conv2d, Context
from kfc_ref.nn.loops import conv2d_loops, im2col_loops
from strategies import conv_cases, normal, seeds

#: float64 products summed in another order (blocks, threads) than the loops
BLOCKWISE_RTOL = 1e-12


THREADED_COPY = pytest.mark.host_only("the threaded copy is the NumPy engine's (host threads)")


@THREADED_COPY
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_parallel_copy_equals_copyto(monkeypatch, threads):
    monkeypatch.setattr(backend, "PARALLEL_MIN_SIZE", 1)
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
    monkeypatch.setattr(backend, "PARALLEL_MIN_SIZE", 1)
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


def _force_blocks(monkeypatch, chunk_bytes, threads):
    """Every size runs threaded (``threads`` host threads) and blockwise (``chunk_bytes``
    per block: 1 gives one example per block)."""
    monkeypatch.setattr(backend, "PARALLEL_MIN_SIZE", 1)
    monkeypatch.setattr(backend, "host_threads", lambda: threads)
    monkeypatch.setattr(conv_products, "CHUNK_BYTES", chunk_bytes)


@THREADED_COPY
@given(case=conv_cases(max_batch=5), seed=seeds, chunk_bytes=st.sampled_from([1, 700, 1 << 20]),
       threads=st.integers(1, 3))
def test_blockwise_conv_product_and_gradient_equal_the_loops(monkeypatch, case, seed,
                                                              chunk_bytes, threads):
    """conv_product (forward, Eq. 26), patch_gradient (Eq. 28) and patch_moments (Omega's
    sums, Eq. 23; blockwise and from row products) built block by block on threads equal the
    loop twins: the convolution loops,
    and DS^T [[A]], the column sums and [[A]]^T [[A]] from the im2col loops; with and without
    an already built [[A]]^T."""
    with monkeypatch.context() as m:
        _force_blocks(m, chunk_bytes, threads)
        c = case
        geom = ConvGeometry(c["kh"], c["kw"], c["stride"], c["padding"], c["dilation"])
        x = normal(seed, c["n"], c["j"], c["h"], c["w"])
        W = normal(seed + 1, c["i"], c["j"] * geom.num_offsets)
        b = normal(seed + 2, c["i"])
        ho, wo = geom.output_shape(c["h"], c["w"])
        xpad = padded_input(x, geom)
        s = conv_product(xpad, W, geom, bias=b)                      # (I, N, Ho, Wo)
        ref = conv2d_loops(x, W.reshape(c["i"], c["j"], c["kh"], c["kw"]), b, c["stride"],
                           c["padding"], c["dilation"])
        np.testing.assert_allclose(s.transpose(1, 0, 2, 3), ref, rtol=BLOCKWISE_RTOL,
                                   atol=BLOCKWISE_RTOL)
        ds = normal(seed + 3, c["i"], c["n"] * ho * wo)
        patches = im2col_loops(x, c["kh"], c["kw"], c["stride"], c["padding"], c["dilation"])
        want = ds @ patches.reshape(-1, patches.shape[-1])              # DS^T [[A]]
        flat = patches.reshape(-1, patches.shape[-1])                    # (N|T|, K)
        for matrix in (None, im2col_matrix(x, geom)):
            np.testing.assert_allclose(patch_gradient(xpad, geom, ds, matrix), want,
                                       rtol=BLOCKWISE_RTOL, atol=BLOCKWISE_RTOL)
            sums, gram = patch_moments(xpad, geom, matrix)                # Omega's two sums
            np.testing.assert_allclose(sums, flat.sum(axis=0), rtol=BLOCKWISE_RTOL,
                                       atol=BLOCKWISE_RTOL)
            np.testing.assert_allclose(gram, flat.T @ flat, rtol=BLOCKWISE_RTOL,
                                       atol=BLOCKWISE_RTOL)
            np.testing.assert_array_equal(gram, gram.T)                 # exactly symmetric
        sums, gram = row_lag_moments(xpad, geom)                  # from products of input rows
        np.testing.assert_allclose(sums, flat.sum(axis=0), rtol=BLOCKWISE_RTOL,
                                   atol=BLOCKWISE_RTOL)
        np.testing.assert_allclose(gram, flat.T @ flat, rtol=BLOCKWISE_RTOL, atol=BLOCKWISE_RTOL)
        np.testing.assert_array_equal(gram, gram.T)


@THREADED_COPY
def test_blockwise_product_negative_control(monkeypatch):
    """A block loop that skipped the last example would leave its outputs unwritten: with
    one example per block and fresh arrays filled with NaN (not whatever memory held), the
    comparison with the loops catches it."""
    _force_blocks(monkeypatch, 1, 2)
    geom = ConvGeometry(3, 3, 1, 1)
    x, W = normal(0, 4, 2, 5, 5), normal(1, 3, 18)
    ref = conv2d_loops(x, W.reshape(3, 2, 3, 3), np.zeros(3), 1, 1, 1).transpose(1, 0, 2, 3)
    real_parallel, real_empty = backend.parallel_rows, np.empty
    monkeypatch.setattr(np, "empty", lambda shape, dtype=float: np.full(shape, np.nan, dtype))
    np.testing.assert_allclose(conv_product(padded_input(x, geom), W, geom), ref, rtol=1e-12)
    monkeypatch.setattr(conv_products, "parallel_rows",
                        lambda fn, rows, size, **kw: real_parallel(fn, rows - 1, size, **kw))
    skipped = conv_product(padded_input(x, geom), W, geom)
    monkeypatch.setattr(np, "empty", real_empty)
    assert np.isnan(skipped[:, -1]).all() and not np.isnan(skipped[:, :-1]).any()


@THREADED_COPY
@given(case=conv_cases(max_batch=4), seed=seeds)
def test_conv_layer_gradient_with_and_without_the_built_patches(monkeypatch, case, seed):
    """Conv2d.backward takes DS^T [[A]] from [[A]]^T when the KFC statistics built it
    (ConvCache.matrix) and blockwise from the cached input otherwise: same dW_bar and dx."""
    with monkeypatch.context() as m:
        _force_blocks(m, 1, 2)
        c = case
        layer = Conv2d(c["j"], c["i"], (c["kh"], c["kw"]), c["stride"], c["padding"],
                       c["dilation"])
        W = layer.init_param(None, np.random.default_rng(seed), "float64")
        x = normal(seed + 1, c["n"], c["j"], c["h"], c["w"])
        for cm in (False, True):
            xin = x.transpose(1, 0, 2, 3).copy() if cm else x
            out, cache = layer.forward(xin, W, Context(channel_major=cm))
            dout = normal(seed + 2, *out.shape)
            lazy = layer.backward(dout, cache, W)
            assert cache.built is None                      # the backward built nothing
            np.testing.assert_array_equal(cache.matrix, im2col_matrix(xin, layer.geom, cm))
            built = layer.backward(dout, cache, W)
            for a, b in zip(lazy, built):
                np.testing.assert_allclose(a, b, rtol=BLOCKWISE_RTOL, atol=BLOCKWISE_RTOL)


@THREADED_COPY
def test_one_blas_thread_per_block_and_restored(monkeypatch):
    """Inside parallel_rows(gemm=True) called from the main thread, BLAS runs one thread in
    every block, nested regions included; the caller's setting comes back afterwards.  From
    another thread (where OpenBLAS ignores a new count) the setting is left alone."""
    libs = backend._ONE_BLAS_THREAD._controllers()
    if not libs:
        pytest.skip("threadpoolctl sees no BLAS library to limit")
    monkeypatch.setattr(backend, "PARALLEL_MIN_SIZE", 1)
    before = [lib.get_num_threads() for lib in libs]
    seen = []

    def inner(r0, r1):
        seen.append(libs[0].get_num_threads())

    def outer(r0, r1):
        seen.append(libs[0].get_num_threads())
        if r0 == 0:                       # a nested region on the main thread
            backend.parallel_rows(inner, 2, 10, threads=2, gemm=True)
    backend.parallel_rows(outer, 2, 10, threads=2, gemm=True)
    assert len(seen) == 4 and (before == [1] or set(seen) == {1})
    assert [lib.get_num_threads() for lib in libs] == before
    worker = threading.Thread(
        target=lambda: backend.parallel_rows(inner, 2, 10, threads=2, gemm=True))
    worker.start()
    worker.join()
    assert seen[-2:] == [before[0]] * 2
    assert [lib.get_num_threads() for lib in libs] == before


@pytest.mark.host_only("glibc malloc settings of this process")
def test_retain_freed_memory_applies_on_linux():
    import sys
    applied = backend.retain_freed_memory()
    assert applied is (sys.platform.startswith("linux") and _has_glibc())


def _has_glibc() -> bool:
    import ctypes
    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@THREADED_COPY
def test_row_lag_moments_negative_control(monkeypatch):
    """Row patches paired with the wrong input rows (shifted by one) give a wrong Gram
    matrix: the comparison above can fail."""
    geom = ConvGeometry(3, 3, 1, 1)
    x = normal(3, 2, 4, 6, 6)
    xpad = padded_input(x, geom)
    flat = im2col_matrix(x, geom)
    np.testing.assert_allclose(row_lag_moments(xpad, geom)[1], flat @ flat.T, rtol=1e-12)
    monkeypatch.setattr(backend, "strided_gather",
                        lambda a, shape, strides, offset=0: np.roll(
                            np.asarray(backend.strided_view(a, shape, strides, offset)), 1,
                            axis=0).copy())
    monkeypatch.setattr(conv_products, "strided_gather", backend.strided_gather)
    shifted = row_lag_moments(xpad, geom)[1]
    assert not np.allclose(shifted, flat @ flat.T)
