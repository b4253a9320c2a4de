"""The conventions stated in kfc_ref/__init__.py, each tested once against explicit indexing.

1. bias column first: Conv2d forward = sum_{j,u,v} W[i,j,u,v] x[...] + b_i with W_bar[:, 0] = b
   and W = W_bar[:, 1:].reshape(I, J, kh, kw);
2. im2col column j|Delta| + u kw + v (offset fastest), row oh Wo + ow;
3. Omega[0, 0] == |T| exactly (no 1/|T| in Omega);
4. Gamma = (1/(N|T|)) sum_n DS_n^T DS_n (the 1/|T| lives in Gamma);
5. net.flatten is the column-stacking vec of each W_bar, layer after layer; unflatten inverts it;
6. the per-example gradient vec(DW_bar) = sum_t a_t kron d_t (a_t row t of [[A]]_H, d_t row t
   of DS) is the flat gradient of that example's loss, in the flat order of 5.

Geometries (channels, kernel, stride, padding, dilation, sizes) are drawn by hypothesis.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.nn.expand import ConvGeometry, im2col
from kfc_ref.curvature.factors import gamma_from_derivatives, omega_from_patches
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.nn.network import Sequential

#: float64 sums of at most J*kh*kw <= 27 products of O(1) numbers: round-off ~1e-15.
EXPLICIT_ATOL = 1e-12


@st.composite
def geometries(draw):
    """(N, J, I, H, W, kh, kw, stride, padding, dilation) with the kernel inside the input."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 1)), \
        draw(st.integers(1, 2))
    h = draw(st.integers(max(1, dilation * (kh - 1) + 1 - 2 * padding), 6))
    w = draw(st.integers(max(1, dilation * (kw - 1) + 1 - 2 * padding), 6))
    return dict(n=draw(st.integers(1, 3)), j=draw(st.integers(1, 3)), i=draw(st.integers(1, 3)),
                h=h, w=w, kh=kh, kw=kw, stride=stride, padding=padding, dilation=dilation,
                seed=draw(st.integers(0, 2**31 - 1)))


def input_pixel(x, n, j, row, col):
    """x[n, j, row, col], or 0 outside the input (zero padding)."""
    inside = 0 <= row < x.shape[2] and 0 <= col < x.shape[3]
    return x[n, j, row, col] if inside else 0.0


@given(geometries())
def test_conv_forward_is_bias_plus_weights_with_bias_in_column_0(to_xp, g):
    rng = np.random.default_rng(g["seed"])
    conv = Conv2d(g["j"], g["i"], (g["kh"], g["kw"]), g["stride"], g["padding"], g["dilation"])
    x = rng.normal(size=(g["n"], g["j"], g["h"], g["w"]))
    W_bar = rng.normal(size=conv.param_shape)
    b, W = W_bar[:, 0], W_bar[:, 1:].reshape(g["i"], g["j"], g["kh"], g["kw"])
    out = to_numpy(conv.forward(to_xp(x), to_xp(W_bar))[0])
    s, p, d = g["stride"], g["padding"], g["dilation"]
    expected = np.empty(out.shape)
    for n, i, oh, ow in np.ndindex(*out.shape):
        expected[n, i, oh, ow] = b[i] + sum(
            W[i, j, u, v] * input_pixel(x, n, j, s * oh + d * u - p, s * ow + d * v - p)
            for j in range(g["j"]) for u in range(g["kh"]) for v in range(g["kw"]))
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXPLICIT_ATOL)


@given(geometries())
def test_im2col_columns_are_offset_fastest(to_xp, g):
    rng = np.random.default_rng(g["seed"])
    geom = ConvGeometry(g["kh"], g["kw"], g["stride"], g["padding"], g["dilation"])
    x = rng.normal(size=(g["n"], g["j"], g["h"], g["w"]))
    P = to_numpy(im2col(to_xp(x), geom))
    ho, wo = geom.output_shape(g["h"], g["w"])
    s, p, d, kh, kw = g["stride"], g["padding"], g["dilation"], g["kh"], g["kw"]
    assert P.shape == (g["n"], ho * wo, g["j"] * kh * kw)
    for n, oh, ow, j, u, v in np.ndindex(g["n"], ho, wo, g["j"], kh, kw):
        assert P[n, oh * wo + ow, j * kh * kw + u * kw + v] == \
            input_pixel(x, n, j, s * oh + d * u - p, s * ow + d * v - p)


@given(geometries())
def test_omega_00_is_the_number_of_locations_and_gamma_has_one_over_T(to_xp, g):
    rng = np.random.default_rng(g["seed"])
    geom = ConvGeometry(g["kh"], g["kw"], g["stride"], g["padding"], g["dilation"])
    patches = im2col(to_xp(rng.normal(size=(g["n"], g["j"], g["h"], g["w"]))), geom)
    t = patches.shape[1]
    assert to_numpy(omega_from_patches(patches))[0, 0] == t       # exactly |T|, no 1/|T|
    DS = rng.normal(size=(g["n"], t, g["i"]))
    expected = sum(DS[n].T @ DS[n] for n in range(g["n"])) / (g["n"] * t)
    np.testing.assert_allclose(to_numpy(gamma_from_derivatives(to_xp(DS))), expected, rtol=0,
                               atol=EXPLICIT_ATOL)
    # the 1/|T|: repeating one location's derivatives |T| times leaves Gamma unchanged
    one = DS[:, :1, :]
    np.testing.assert_allclose(gamma_from_derivatives(np.repeat(one, t, axis=1)),
                               gamma_from_derivatives(one), rtol=1e-13, atol=EXPLICIT_ATOL)


def small_net(g):
    conv = Conv2d(g["j"], g["i"], (g["kh"], g["kw"]), g["stride"], g["padding"], g["dilation"])
    ho, wo = conv.geom.output_shape(g["h"], g["w"])
    return Sequential([conv, Tanh(), Flatten(), Dense(g["i"] * ho * wo, 3)],
                      (g["j"], g["h"], g["w"]))


@given(geometries())
def test_flatten_is_column_stacking_and_unflatten_inverts_it(to_xp, g):
    net = small_net(g)
    params = net.init(g["seed"], dtype="float64")
    d_params = [None if p is None else to_xp(p) for p in params]
    theta = net.flatten(d_params)
    expected = np.concatenate([params[i].ravel(order="F") for i in net.param_layers])
    np.testing.assert_array_equal(to_numpy(theta), expected)
    back = net.unflatten(theta)
    for i in range(len(net.layers)):
        if params[i] is None:
            assert back[i] is None
        else:
            np.testing.assert_array_equal(to_numpy(back[i]), params[i])
    other = to_xp(np.random.default_rng(g["seed"]).normal(size=net.num_params))
    np.testing.assert_array_equal(to_numpy(net.flatten(net.unflatten(other))), to_numpy(other))
    with pytest.raises(ValueError, match="theta must have shape"):
        net.unflatten(other[:-1])


@given(geometries())
def test_per_example_gradient_is_sum_of_kronecker_products_in_flat_order(to_xp, g):
    """Records come from the batch (DS scaled by N to per-example derivatives); the reference is
    the gradient of each example's own loss, computed on that example alone."""
    net = small_net(g)
    rng = np.random.default_rng(g["seed"])
    params = [None if p is None else to_xp(p) for p in net.init(rng, dtype="float64")]
    x = to_xp(rng.normal(size=(g["n"],) + net.input_shape))
    y = to_xp(rng.integers(0, 3, g["n"]))
    tape = net.forward(params, x)
    _, dlogits = softmax_cross_entropy(tape.output, y)
    _, douts = net.backward(params, tape, dlogits)
    records = net.records(tape, douts)
    for n in range(g["n"]):
        _, grads, _ = net.loss_and_grads(params, x[n:n + 1], y[n:n + 1])
        flat = to_numpy(net.flatten(grads))
        for rec, block in zip(records, net.param_slices()):
            a, ds = to_numpy(rec.A_H[n]), to_numpy(rec.DS[n])   # (|T|, K), (|T|, I)
            vec_dw = sum(np.kron(a[t], ds[t]) for t in range(a.shape[0]))
            np.testing.assert_allclose(flat[block], vec_dw, rtol=1e-10, atol=EXPLICIT_ATOL)
