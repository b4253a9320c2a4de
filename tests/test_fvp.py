"""Tests for the forward-mode passes and kfc_ref.curvature.fvp (exact Fisher quadratic forms,
K-FAC App. J).

(a) every layer's ``jvp`` equals centred finite differences of its ``forward`` (float64, drawn
    shapes; kinks of ReLU and ties of max-pooling are kept away from the perturbation);
(b) fisher_quadratic equals u^T F v with the dense Fisher F = mean_n J_n^T (diag p - p p^T) J_n,
    J built column by column by finite differences of the logits (no forward-mode code used);
(c) v^T F v equals the second derivative of KL(p_theta || p_theta+eps v) (finite differences);
(d) fisher_gram is the symmetric PSD matrix of pairwise fisher_quadratic values;
(e) negative control: dropping the -p p^T part of F_R is detected; bad directions are rejected.
"""
import numpy as np
import pytest
from finite_differences import EPS, FD_RTOL, directional_fd
from hypothesis import given, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.curvature.fisher import kl_divergence, true_fisher
from kfc_ref.curvature.fvp import fisher_gram, fisher_quadratic
from kfc_ref.nn.layers import Context, Conv2d, Dense, Dropout, Flatten, ReLU, Tanh
from kfc_ref.nn.losses import softmax
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm

#: Step of the centred differences (tests/finite_differences.py, which explains its size):
#: piecewise-linear layers are exact up to rounding ~1e-16 |f| / FD_EPS ~ 1e-10, smooth ones
#: add O(FD_EPS^2) truncation.
FD_EPS = EPS
#: Absolute floor of the jvp comparison (entries near 0): 100x the rounding estimate above.
FD_ATOL = 1e-8
#: fisher_quadratic vs the dense J^T F_R J with J from finite differences: J has entry errors
#: ~1e-10 (see FD_EPS), giving relative errors ~1e-9 in u^T F v.
DENSE_RTOL = 1e-7
#: KL second difference at step KL_EPS: truncation O(KL_EPS^2) ~ 1e-8 relative, rounding
#: ~1e-16 / KL_EPS^2 ~ 1e-8 relative.
KL_EPS = 1e-4
KL_RTOL = 1e-5


def check_jvp(to_xp, layer, x, dx, W=None, dW=None, ctx_factory=lambda: None):
    """layer.jvp(dx, dW) vs d/dt forward(x + t dx, W + t dW) at t = 0 (centred differences).
    The layer runs on the --xp module (``to_xp``); the differences are taken on the host."""
    def along(t):
        return to_numpy(layer.forward(to_xp(x + t * dx), None if W is None else to_xp(W + t * dW),
                                      ctx_factory())[0])

    _, cache = layer.forward(to_xp(x), to_xp(W), ctx_factory())
    got = to_numpy(layer.jvp(to_xp(dx), cache, to_xp(W), to_xp(dW)))
    want = directional_fd(along, 0.0, 1.0)
    np.testing.assert_allclose(got, want, rtol=FD_RTOL, atol=FD_ATOL)


# --------------------------------------------------------------------------- (a) layer jvps
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 2), st.integers(0, 3), st.integers(0, 2**31))
def test_conv2d_jvp_matches_finite_differences(to_xp, n, j, i, k, stride, padding, extra,
                                               seed):
    rng = np.random.default_rng(seed)
    h = max(k - 2 * padding, 1) + extra
    layer = Conv2d(j, i, k, stride=stride, padding=padding)
    x, dx = rng.standard_normal((2, n, j, h, h + 1))
    W, dW = rng.standard_normal((2,) + layer.param_shape)
    check_jvp(to_xp, layer, x, dx, W, dW)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31))
def test_dense_jvp_matches_finite_differences(to_xp, n, j, i, seed):
    rng = np.random.default_rng(seed)
    layer = Dense(j, i)
    x, dx = rng.standard_normal((2, n, j))
    W, dW = rng.standard_normal((2,) + layer.param_shape)
    check_jvp(to_xp, layer, x, dx, W, dW)


@given(st.integers(0, 2**31))
def test_relu_and_tanh_jvp_match_finite_differences(to_xp, seed):
    rng = np.random.default_rng(seed)
    # |x| >= 0.1 keeps every entry 1e5 perturbation steps away from the kink at 0.
    x = rng.choice([-1.0, 1.0], size=(2, 3, 4, 4)) * (0.1 + rng.random((2, 3, 4, 4)))
    dx = rng.uniform(-1, 1, x.shape)
    check_jvp(to_xp, ReLU(), x, dx)
    check_jvp(to_xp, Tanh(), x, dx)


@given(st.integers(1, 3), st.integers(1, 3), st.booleans(), st.integers(0, 3),
       st.integers(0, 2**31))
def test_pool_jvps_match_finite_differences(to_xp, size, stride, ceil_mode, extra, seed):
    rng = np.random.default_rng(seed)
    h = size + extra
    shape = (2, 2, h, h + 1)
    # Distinct values 0.01 apart: no ties, and no perturbation of size FD_EPS reorders them.
    x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01
    dx = rng.uniform(-1, 1, shape)
    check_jvp(to_xp, MaxPool2d(size, stride, ceil_mode=ceil_mode), x, dx)
    check_jvp(to_xp, AvgPool2d(size, stride, ceil_mode=ceil_mode), x, dx)


@given(st.integers(1, 4), st.floats(0.1, 2.0), st.floats(0.5, 1.0), st.integers(0, 2**31))
def test_response_norm_jvp_matches_finite_differences(to_xp, size, scale, power, seed):
    rng = np.random.default_rng(seed)
    x, dx = rng.standard_normal((2, 2, 3, 5, 4))
    check_jvp(to_xp, ResponseNorm(size, scale, power), x, dx)


@given(st.floats(0.0, 0.9), st.integers(0, 2**31))
def test_flatten_and_dropout_jvp_match_finite_differences(to_xp, rate, seed):
    rng = np.random.default_rng(seed)
    x, dx = rng.standard_normal((2, 2, 3, 4, 4))
    check_jvp(to_xp, Flatten(), x, dx)
    # A fixed mask: every forward pass draws it from a fresh generator with the same seed.
    check_jvp(to_xp, Dropout(rate), x, dx,
              ctx_factory=lambda: Context(train=True, rng=np.random.default_rng(seed)))


# --------------------------------------------------------------------------- (b)-(e) Fisher
def fisher_test_net():
    """Every layer kind on the exact-F path: conv (stride 1 and 2), max-pool (ceil mode),
    tanh, response norm, avg-pool, flatten, dense.  65 parameters."""
    layers = [Conv2d(1, 2, 3, padding=1), MaxPool2d(3, 2, ceil_mode=True), Tanh(),
              ResponseNorm(3, 1.0, 0.75), Conv2d(2, 2, 2, stride=1), Tanh(),
              AvgPool2d(2, 1, ceil_mode=True), Flatten()]
    net = Sequential(layers, (1, 6, 6))
    return Sequential(layers + [Dense(net.shapes[-1][0], 3)], (1, 6, 6))


def setup(seed, n=5):
    rng = np.random.default_rng(seed)
    net = fisher_test_net()
    params = net.init(rng, dtype="float64")
    for i in net.param_layers:                       # non-zero biases too
        params[i] = params[i] + 0.3 * rng.standard_normal(params[i].shape)
    x = rng.standard_normal((n, 1, 6, 6))
    u = net.unflatten(rng.standard_normal(net.num_params))
    v = net.unflatten(rng.standard_normal(net.num_params))
    return net, params, x, u, v


def dense_fisher(net, params, x):
    """F = mean_n J_n^T (diag p_n - p_n p_n^T) J_n with J from centred differences (P x P)."""
    theta = net.flatten(params)
    logits = net.forward(params, x).output
    jac = np.empty(logits.shape + (theta.size,))
    for k in range(theta.size):
        e = np.zeros_like(theta)
        e[k] = FD_EPS
        plus = net.forward(net.unflatten(theta + e), x).output
        minus = net.forward(net.unflatten(theta - e), x).output
        jac[:, :, k] = (plus - minus) / (2 * FD_EPS)
    p = softmax(logits)
    F_R = np.stack([np.diag(pn) - np.outer(pn, pn) for pn in p])
    return np.einsum("ncp,ncd,ndq->pq", jac, F_R, jac) / x.shape[0]


def _on(to_xp, *lists):
    return [[to_xp(a) for a in arrays] for arrays in lists]


@pytest.mark.parametrize("seed", [0, 1])
def test_fisher_quadratic_equals_dense_fisher(to_xp, seed):
    """fisher_quadratic on the --xp module; the dense references on the host."""
    net, params, x, u, v = setup(seed)
    F = dense_fisher(net, params, x)
    fu, fv = net.flatten(u), net.flatten(v)
    d_params, d_u, d_v = _on(to_xp, params, u, v)
    d_x = to_xp(x)
    np.testing.assert_allclose(float(fisher_quadratic(net, d_params, d_x, d_u, d_v)),
                               fu @ F @ fv, rtol=DENSE_RTOL)
    np.testing.assert_allclose(float(fisher_quadratic(net, d_params, d_x, d_u)), fu @ F @ fu,
                               rtol=DENSE_RTOL)
    # The backprop-built true Fisher (one backward pass per class, kfc_ref.curvature.fisher)
    # agrees too.
    np.testing.assert_allclose(float(fisher_quadratic(net, d_params, d_x, d_u, d_v)),
                               fu @ to_numpy(true_fisher(net, d_params, d_x)) @ fv,
                               rtol=DENSE_RTOL)
    # Negative control: F_R = diag(p) alone (dropping -p p^T) is a different quadratic form.
    tape = net.forward(d_params, d_x)
    p = to_numpy(softmax(tape.output))
    ju = to_numpy(net.jvp(d_params, tape, d_u))
    wrong = float(np.sum(p * ju * ju)) / x.shape[0]
    assert abs(wrong - fu @ F @ fu) > 1e3 * DENSE_RTOL * abs(fu @ F @ fu)


def kl(net, params_a, params_b, x):
    return float(kl_divergence(net.forward(params_a, x).output, net.forward(params_b, x).output))


@pytest.mark.parametrize("seed", [2, 3])
def test_quadratic_form_is_second_derivative_of_kl(to_xp, seed):
    net, params, x, u, _ = setup(seed)
    params, u = _on(to_xp, params, u)
    x = to_xp(x)
    theta, fu = net.flatten(params), net.flatten(u)
    plus = kl(net, params, net.unflatten(theta + KL_EPS * fu), x)
    minus = kl(net, params, net.unflatten(theta - KL_EPS * fu), x)
    np.testing.assert_allclose((plus + minus) / KL_EPS**2,
                               float(fisher_quadratic(net, params, x, u)), rtol=KL_RTOL)


def test_fisher_gram_is_symmetric_psd_and_pairwise(to_xp):
    net, params, x, u, v = setup(4)
    w = [None if a is None else a + 2 * b for a, b in zip(u, v)]
    d_params, d_u, d_v, d_w = _on(to_xp, params, u, v, w)
    G = to_numpy(fisher_gram(net, d_params, to_xp(x), [d_u, d_v, d_w]))
    np.testing.assert_array_equal(G, G.T)
    assert np.linalg.eigvalsh(G).min() > -1e-12 * np.abs(G).max()   # w is in span(u, v)
    dirs = [d_u, d_v, d_w]
    for a in range(3):
        for b in range(3):
            np.testing.assert_allclose(
                G[a, b], float(fisher_quadratic(net, d_params, to_xp(x), dirs[a], dirs[b])),
                rtol=1e-12)


def test_partial_directions_and_bad_directions(to_xp):
    net, params, x, u, _ = setup(5)
    params, u = _on(to_xp, params, u)
    x = to_xp(x)
    only_last = [None] * len(u)
    only_last[net.param_layers[-1]] = u[net.param_layers[-1]]
    full = [None if a is None else to_xp(np.zeros(a.shape)) for a in u]
    full[net.param_layers[-1]] = u[net.param_layers[-1]]
    np.testing.assert_allclose(float(fisher_quadratic(net, params, x, only_last)),
                               float(fisher_quadratic(net, params, x, full)), rtol=1e-12)
    assert float(fisher_quadratic(net, params, x, [None] * len(u))) == 0.0
    with pytest.raises(ValueError, match="direction has 2 entries"):
        fisher_quadratic(net, params, x, u[:2])
    bad = list(u)
    bad[0] = to_xp(np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"direction\[0\] has shape \(1, 1\)"):
        fisher_quadratic(net, params, x, bad)
    with pytest.raises(ValueError, match="at least one"):
        fisher_gram(net, params, x, [])
