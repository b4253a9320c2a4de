"""Every layer: forward against a slow twin, backward against centred finite differences,
over hypothesis-drawn geometries (float64)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.nn.layers import Context, Conv2d, Dense, Dropout, Flatten, Identity, ReLU, Tanh
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm
from kfc_ref.nn.loops import conv2d_loops, pool_loops, response_norm_loops
from finite_differences import assert_vjp_matches
from guarded_xp import asguarded
from strategies import conv_cases, distinct, normal, pool_cases, seeds

# Same float64 products summed in another order (fast GEMM vs loops).
FORWARD_RTOL = 1e-12


def _conv(case):
    return Conv2d(case["j"], case["i"], (case["kh"], case["kw"]), case["stride"],
                  case["padding"], case["dilation"])


def _on_host(layer, to_xp):
    """The layer's forward as a host function (for finite differences): host in, host out."""
    def f(*host_args):
        return to_numpy(layer.forward(*map(to_xp, host_args))[0])
    return f


@given(conv_cases(), seeds)
def test_conv_forward_equals_loops(to_xp, case, seed):
    layer = _conv(case)
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    W_bar = normal(seed + 1, *layer.param_shape)
    out = to_numpy(layer.forward(to_xp(x), to_xp(W_bar))[0])
    W = W_bar[:, 1:].reshape(case["i"], case["j"], case["kh"], case["kw"])
    ref = conv2d_loops(x, W, W_bar[:, 0], case["stride"], case["padding"], case["dilation"])
    np.testing.assert_allclose(out, ref, rtol=FORWARD_RTOL, atol=FORWARD_RTOL)


@given(conv_cases(max_batch=2, max_size=6), seeds)
def test_conv_backward_matches_finite_differences(to_xp, case, seed):
    layer = _conv(case)
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    W = normal(seed + 1, *layer.param_shape)
    out, cache = layer.forward(to_xp(x), to_xp(W))
    dout = normal(seed + 2, *out.shape)
    dx, dW = map(to_numpy, layer.backward(to_xp(dout), cache, to_xp(W)))
    f = _on_host(layer, to_xp)
    assert_vjp_matches(lambda z: f(z, W), x, dout, dx, seed)
    assert_vjp_matches(lambda w: f(x, w), W, dout, dW, seed)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), seeds)
def test_dense_forward_and_backward(to_xp, n, j, i, seed):
    layer = Dense(j, i)
    x, W = normal(seed, n, j), normal(seed + 1, i, j + 1)
    out, cache = layer.forward(to_xp(x), to_xp(W))
    np.testing.assert_allclose(to_numpy(out), x @ W[:, 1:].T + W[:, 0], rtol=FORWARD_RTOL)
    dout = normal(seed + 2, n, i)
    dx, dW = map(to_numpy, layer.backward(to_xp(dout), cache, to_xp(W)))
    f = _on_host(layer, to_xp)
    assert_vjp_matches(lambda z: f(z, W), x, dout, dx, seed)
    assert_vjp_matches(lambda w: f(x, w), W, dout, dW, seed)


@pytest.mark.parametrize("layer, fn", [
    (ReLU(), lambda x: np.maximum(x, 0)), (Tanh(), np.tanh), (Identity(), lambda x: x)])
@given(seed=seeds)
def test_elementwise_forward_and_backward(layer, fn, seed, to_xp):
    x = distinct(seed, 2, 3, 4, 4)        # no entry within 0.025 of the ReLU kink
    out, cache = layer.forward(to_xp(x))
    np.testing.assert_allclose(to_numpy(out), fn(x), rtol=FORWARD_RTOL)  # tanh: another libm
    dout = normal(seed, *x.shape)
    dx = to_numpy(layer.backward(to_xp(dout), cache)[0])
    assert_vjp_matches(_on_host(layer, to_xp), x, dout, dx, seed)


@pytest.mark.parametrize("kind", ["max", "avg"])
@given(case=pool_cases(), seed=seeds)
def test_pooling_forward_and_backward(kind, case, seed, to_xp):
    cls = MaxPool2d if kind == "max" else AvgPool2d
    layer = cls(case["size"], case["stride"], case["ceil_mode"])
    x = distinct(seed, case["n"], case["c"], case["h"], case["w"])   # no max-pool ties
    out, cache = layer.forward(to_xp(x))
    out = to_numpy(out)
    ref = pool_loops(x, case["size"], case["stride"], case["ceil_mode"], kind)
    np.testing.assert_allclose(out, ref, rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
    assert out.shape[1:] == layer.output_shape(x.shape[1:])
    dout = normal(seed, *out.shape)
    dx = to_numpy(layer.backward(to_xp(dout), cache)[0])
    assert_vjp_matches(_on_host(layer, to_xp), x, dout, dx, seed)


@pytest.mark.host_only("output-shape arithmetic, no arrays")
def test_cuda_convnet_pool_sizes():
    """Overlapping 3x3 stride-2 pools with partial border windows: 32 -> 16 -> 8 -> 4."""
    shapes = [(1, 32, 32)]
    for _ in range(3):
        shapes.append(MaxPool2d(3, 2, ceil_mode=True).output_shape(shapes[-1]))
    assert [s[1] for s in shapes] == [32, 16, 8, 4]


@given(size=st.integers(1, 4), seed=seeds)
def test_response_norm_forward_and_backward(size, seed, to_xp):
    # A large scale makes the normaliser matter (5e-5 would hide a wrong derivative term).
    layer = ResponseNorm(size, scale=2.0, power=0.75)
    x = normal(seed, 2, 2, 5, 4)
    out, cache = layer.forward(to_xp(x))
    np.testing.assert_allclose(to_numpy(out), response_norm_loops(x, size, 2.0, 0.75),
                               rtol=FORWARD_RTOL)
    dout = normal(seed + 1, *x.shape)
    dx = to_numpy(layer.backward(to_xp(dout), cache)[0])
    assert_vjp_matches(_on_host(layer, to_xp), x, dout, dx, seed)


def test_flatten_and_dropout(to_xp):
    x = normal(0, 2, 3, 2, 2)
    dx = to_xp(x)
    out, cache = Flatten().forward(dx)
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(to_numpy(Flatten().backward(out, cache)[0]), x)
    drop = Dropout(0.5)
    y, mask = drop.forward(dx, ctx=Context(train=True, rng=np.random.default_rng(0)))
    y, host_mask = to_numpy(y), to_numpy(mask)
    assert set(np.unique(host_mask)) <= {0.0, 2.0}
    np.testing.assert_array_equal(y, x * host_mask)
    np.testing.assert_array_equal(to_numpy(drop.backward(dx, mask)[0]), x * host_mask)
    np.testing.assert_array_equal(to_numpy(drop.forward(dx)[0]), x)   # evaluation: identity
    y2, _ = drop.forward(x, ctx=Context(train=True, rng=np.random.default_rng(0)))
    np.testing.assert_array_equal(y, y2)                          # same seed, same mask


# ---------------------------------------------------------------- NumPy path vs few-launch path


def _first_maximiser_loops(x, size, stride, ceil_mode):
    """Offset u*size + v of the first maximiser (row-major) of every window, by loops."""
    from kfc_ref.nn.loops import _pool_windows
    n, c, h, w = x.shape
    windows = list(_pool_windows(h, w, size, stride, ceil_mode))
    arg = np.zeros((n, c, windows[0][4], windows[0][5]), dtype=int)
    for oh, ow, rows, cols, _, _ in windows:
        for b in range(n):
            for ch in range(c):
                best = None
                for u, r in enumerate(rows):
                    for v, q in enumerate(cols):
                        if best is None or x[b, ch, r, q] > best:
                            best, arg[b, ch, oh, ow] = x[b, ch, r, q], u * size + v
    return arg


@given(case=pool_cases(), seed=seeds)
def test_max_pool_ties_go_to_the_first_maximiser_on_both_paths(to_xp, case, seed):
    """Integer inputs with many ties: NumPy's separable passes and the gathered-window argmax
    (guarded namespace, the GPU path; and the --xp module, CuPy itself under --xp cupy) all
    pick the row-major first maximiser of the loops."""
    layer = MaxPool2d(case["size"], case["stride"], case["ceil_mode"])
    x = np.random.default_rng(seed).integers(0, 3, (case["n"], case["c"], case["h"],
                                                    case["w"])).astype(np.float64)
    ref = _first_maximiser_loops(x, case["size"], case["stride"], case["ceil_mode"])
    out, cache = layer.forward(x)
    np.testing.assert_array_equal(cache[0], ref)
    dout = normal(seed, *out.shape)
    for move in (asguarded, to_xp):
        g_out, g_cache = layer.forward(move(x))
        np.testing.assert_array_equal(to_numpy(g_cache[0]), ref)
        np.testing.assert_array_equal(to_numpy(g_out), out)
        np.testing.assert_array_equal(to_numpy(layer.backward(move(dout), g_cache)[0]),
                                      layer.backward(dout, cache)[0])


@pytest.mark.parametrize("make", [
    lambda c: MaxPool2d(c["size"], c["stride"], c["ceil_mode"]),
    lambda c: AvgPool2d(c["size"], c["stride"], c["ceil_mode"]),
    lambda c: ResponseNorm(c["size"] + 1, 2.0, 0.75)])
@given(case=pool_cases(), seed=seeds)
def test_gather_path_equals_the_numpy_path(to_xp, make, case, seed):
    """forward, backward, jvp and the tape-free ``infer`` of the pools and rnorm: the
    few-launch formulation (gathers and scatter-adds, run here on the guarded namespace and
    on the --xp module, CuPy itself under --xp cupy) equals the separable NumPy formulation."""
    layer = make(case)
    x = distinct(seed, case["n"], case["c"], case["h"], case["w"])
    out, cache = layer.forward(x)
    np.testing.assert_array_equal(layer.infer(x), out)
    dout, dx = normal(seed + 1, *out.shape), normal(seed + 2, *x.shape)
    for move in (asguarded, to_xp):
        g_out, g_cache = layer.forward(move(x))
        np.testing.assert_allclose(to_numpy(g_out), out, rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
        np.testing.assert_allclose(to_numpy(layer.infer(move(x))), out, rtol=FORWARD_RTOL,
                                   atol=FORWARD_RTOL)
        np.testing.assert_allclose(to_numpy(layer.backward(move(dout), g_cache)[0]),
                                   layer.backward(dout, cache)[0], rtol=FORWARD_RTOL,
                                   atol=FORWARD_RTOL)
        np.testing.assert_allclose(to_numpy(layer.jvp(move(dx), g_cache)),
                                   layer.jvp(dx, cache), rtol=FORWARD_RTOL, atol=FORWARD_RTOL)


@given(conv_cases(max_batch=2, max_size=6), seeds)
def test_conv_channel_major_equals_nchw_and_skips_the_input_gradient(to_xp, case, seed):
    """The network's channel-major layout gives the same output, weight gradient, input
    gradient and jvp as the public (N, J, H, W) layout; ``input_grad=False`` drops only dx.
    Both layouts run on the --xp module; compared on the host."""
    layer = _conv(case)
    x = normal(seed, case["n"], case["j"], case["h"], case["w"])
    W = to_xp(normal(seed + 1, *layer.param_shape))

    def channel_major(a):
        return to_xp(np.ascontiguousarray(a.transpose(1, 0, 2, 3)))

    def from_channel_major(a):
        return to_numpy(a).transpose(1, 0, 2, 3)

    out, cache = layer.forward(to_xp(x), W)
    out_cm, cache_cm = layer.forward(channel_major(x), W, Context(channel_major=True))
    np.testing.assert_allclose(from_channel_major(out_cm), to_numpy(out), rtol=FORWARD_RTOL,
                               atol=FORWARD_RTOL)
    np.testing.assert_array_equal(to_numpy(Conv2d.patches(cache_cm)),
                                  to_numpy(Conv2d.patches(cache)))
    dout = normal(seed + 2, *out.shape)
    dx, dW = layer.backward(to_xp(dout), cache, W)
    dx_cm, dW_cm = layer.backward(channel_major(dout), cache_cm, W)
    np.testing.assert_allclose(from_channel_major(dx_cm), to_numpy(dx), rtol=FORWARD_RTOL,
                               atol=FORWARD_RTOL)
    np.testing.assert_allclose(to_numpy(dW_cm), to_numpy(dW), rtol=FORWARD_RTOL,
                               atol=FORWARD_RTOL)
    none, dW_only = layer.backward(to_xp(dout), cache, W, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(to_numpy(dW_only), to_numpy(dW))
    v = normal(seed + 3, *x.shape)
    np.testing.assert_allclose(
        from_channel_major(layer.jvp(channel_major(v), cache_cm, W, dW)),
        to_numpy(layer.jvp(to_xp(v), cache, W, dW)), rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
