"""Theorem 3 (Sec. 4, App. E.2): KFC is invariant to pointwise affine reparameterizations.

(a) Lemma 2: N-dagger (Eq. 24, AffineWrapped) with the parameters of Eq. 84 computes the same
    function as N; its backward and forward-mode passes transform as the chain rule says.
(b) Eqs. 98-105: Omega-dagger = [[V]]_H^T Omega [[V]]_H and Gamma-dagger = U Gamma U^T.
(c) One undamped KFC step on N-dagger, mapped back, is the step on N (float64 and float32).
(d) Damped KFC stays invariant for orthogonal U, V without shifts.
(e) Negative controls that must fail by a wide margin: SGD, a diagonal Fisher, damped KFC with
    non-orthogonal U, V; and the padding caveat (d != 0 in front of a zero-padded conv).

Architectures are drawn by hypothesis: one or two tanh convs (kernel, stride, padding drawn),
Flatten, optionally a hidden tanh Dense, and a softmax Dense.  Shifts d are drawn only in front
of unpadded convs and dense layers (the padding caveat); c is drawn everywhere.  The batch size
is chosen so that every Omega has at least twice as many rows as columns, which makes the
factors full rank (undamped KFC needs their inverses); the softmax layer's Gamma is always
singular (Gamma 1 = 0), handled by the pseudo-inverse as explained in kfc_ref.theory.invariance.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.nn.expand import expand_homogeneous, im2col
from kfc_ref.curvature.factors import network_factors
from kfc_ref.theory.invariance import (
    AffineWrapped, PointwiseAffine, Reparameterization, dagger_network, dagger_params,
    expanded_transform, function_discrepancy, invariance_error, layer_transforms,
    original_params, preconditioned_update, random_reparameterization,
)
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, ReLU, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import MaxPool2d

#: N and N-dagger on the same input, float64: a few matmuls and solves with condition numbers
#: <= 16 (U, V have singular values in [1/2, 2]); measured <= 3e-15, so 1e-12 leaves 300x.
SAME_FUNCTION_ATOL = 1e-12
#: Chain-rule identities for gradients / JVPs (same operations as above), relative.
CHAIN_RULE_RTOL = 1e-10
#: Undamped KFC step on N vs on N-dagger, max |log p difference| on fresh inputs, float64.
#: Round-off is amplified by the factors' condition numbers (Omega's kept below
#: MAX_OMEGA_CONDITION); measured <= 4e-10 over 400 drawn cases (typically 1e-13).
KFC_INVARIANCE_ATOL = 1e-8
#: The same in float32 (eps 1.2e-7, times the same amplification): measured <= 1.2e-3 over
#: 400 seeds of the two fixed nets below (`python -m kfc_ref check --dtype float32`).
KFC_INVARIANCE_ATOL_F32 = 5e-3
#: A non-invariant update must move the two networks apart by at least this much (log p units).
#: Measured >= 0.13 for every control on the fixed cases below, i.e. >= 1e10 x the invariant error.
CONTROL_MIN_DISCREPANCY = 1e-2
#: Undamped KFC divides by Omega's eigenvalues: cases where a drawn net makes Omega nearly
#: singular (e.g. one-channel 1x1 convs feeding a dense layer, cond ~1e7) get huge steps whose
#: round-off exceeds any fixed tolerance; the invariance test skips cases above this condition.
MAX_OMEGA_CONDITION = 1e5
LEARNING_RATE = 0.5          # large, so that non-invariant updates differ clearly
DAMPING = 1e-2               # of the order of the factors' small eigenvalues: damping matters


# --------------------------------------------------------------------------- cases
@st.composite
def architectures(draw):
    """(net, batch size): tanh convs with drawn geometry, Flatten, [tanh Dense], softmax Dense."""
    j = draw(st.integers(1, 2))
    h = draw(st.integers(4, 6))
    layers, shape = [], (j, h, h)
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, min(3, shape[1])))
        pad = draw(st.integers(0, (k - 1) // 2))
        stride = draw(st.integers(1, 2))
        conv = Conv2d(shape[0], draw(st.integers(1, 3)), k, stride=stride, padding=pad)
        if min(conv.geom.output_shape(*shape[1:])) < 2:
            break
        layers += [conv, Tanh()]
        shape = conv.output_shape(shape)
    layers.append(Flatten())
    flat = math.prod(shape)
    assume(flat <= 24)
    if draw(st.booleans()):
        hidden = draw(st.integers(2, 4))
        layers += [Dense(flat, hidden), Tanh()]
        flat = hidden
    layers.append(Dense(flat, draw(st.integers(2, 3))))
    net = Sequential(layers, (j, h, h))
    rows_per_example = [net.shapes[i][1] * net.shapes[i][2] if len(net.shapes[i]) == 3 else 1
                        for i in net.param_layers]
    n = max(math.ceil(2 * (1 + net.layers[i].param_shape[1]) / t)
            for i, t in zip(net.param_layers, rows_per_example))
    return net, max(n, 8)


def make_case(net, n, seed, to_xp, dtype="float64", orthogonal=False, shifts=True):
    """Parameters with random biases, batch (x, y), fresh test inputs, a random Eq. 24; drawn
    on the host, returned in the --xp module (``to_xp``)."""
    rng = np.random.default_rng(seed)
    params = net.init(rng, dtype=dtype)
    for p in params:
        if p is not None:
            p[:, 0] = rng.normal(0.0, 0.3, p.shape[0])
    x = rng.normal(size=(n,) + net.input_shape).astype(dtype)
    y = rng.integers(0, net.shapes[-1][0], n)
    x_test = rng.normal(size=(16,) + net.input_shape).astype(dtype)
    params = [to_xp(p) for p in params]
    like = params[net.param_layers[0]]
    reparam = random_reparameterization(net, rng, like, orthogonal=orthogonal, shifts=shifts)
    return params, to_xp(x), to_xp(y), to_xp(x_test), reparam


def valid_net():
    """Unpadded convs: shifts d are allowed everywhere."""
    return Sequential([Conv2d(2, 3, 3), Tanh(), Conv2d(3, 2, 2), Tanh(), Flatten(),
                       Dense(8, 3)], (2, 5, 5)), 20


def padded_net():
    """Zero-padded (and strided) convs: d = 0 in front of them."""
    return Sequential([Conv2d(2, 3, 3, padding=1), Tanh(), Conv2d(3, 2, 3, stride=2, padding=1),
                       Tanh(), Flatten(), Dense(8, 3)], (2, 4, 4)), 24


def _omega_full_rank(net, params, x, seed):
    recs = net.sampled_records(params, x, np.random.default_rng(seed))
    return all(np.linalg.cond(to_numpy(f.Omega)) < MAX_OMEGA_CONDITION
               for f in network_factors(recs))


# --------------------------------------------------------------------------- (a) Lemma 2
@given(architectures(), st.integers(0, 2**31 - 1))
def test_dagger_network_computes_the_same_function(to_xp, arch, seed):
    net, n = arch
    params, x, _, _, reparam = make_case(net, n, seed, to_xp)
    net_d, params_d = dagger_network(net, reparam), dagger_params(net, params, reparam)
    out, out_d = net.forward(params, x).output, net_d.forward(params_d, x).output
    np.testing.assert_allclose(to_numpy(out_d), to_numpy(out), rtol=0, atol=SAME_FUNCTION_ATOL)
    back = original_params(net, params_d, reparam)
    for i in net.param_layers:
        np.testing.assert_allclose(to_numpy(back[i]), to_numpy(params[i]), rtol=0,
                                   atol=SAME_FUNCTION_ATOL)


@given(architectures(), st.integers(0, 2**31 - 1))
def test_gradients_and_jvps_follow_the_chain_rule(to_xp, arch, seed):
    """W_bar = U^T W_bar-dagger [[V]]_H^T + c e^T, so grad-dagger = U grad [[V]]_H, and a
    direction dW maps to U^-T dW [[V]]_H^-T with the same output change (Lemma 3's setting)."""
    net, n = arch
    params, x, y, _, reparam = make_case(net, n, seed, to_xp)
    net_d, params_d = dagger_network(net, reparam), dagger_params(net, params, reparam)
    _, grads, tape = net.loss_and_grads(params, x, y)
    _, grads_d, tape_d = net_d.loss_and_grads(params_d, x, y)
    rng = np.random.default_rng(seed + 1)
    dirs, dirs_d = [None] * len(net.layers), [None] * len(net_d.layers)
    for t in layer_transforms(net, reparam):
        i = t.layer_index
        U, V_H = to_numpy(t.U), to_numpy(t.V_H)
        expected = U @ to_numpy(grads[i]) @ V_H
        np.testing.assert_allclose(to_numpy(grads_d[i + 1]), expected, rtol=CHAIN_RULE_RTOL,
                                   atol=CHAIN_RULE_RTOL * np.abs(expected).max())
        direction = rng.normal(size=params[i].shape)
        dirs[i] = to_xp(direction)
        dirs_d[i + 1] = to_xp(np.linalg.solve(U.T, direction) @ np.linalg.inv(V_H).T)
    jv = to_numpy(net.jvp(params, tape, dirs))
    jv_d = to_numpy(net_d.jvp(params_d, tape_d, dirs_d))
    np.testing.assert_allclose(jv_d, jv, rtol=CHAIN_RULE_RTOL,
                               atol=CHAIN_RULE_RTOL * np.abs(jv).max())


def test_expanded_transform_matches_expanding_the_transformed_activations(to_xp):
    """Eq. 79: [[A V + 1 d^T]]_H = [[A]]_H [[V]]_H for an unpadded conv (column order j|D|+d)."""
    rng = np.random.default_rng(0)
    conv = Conv2d(3, 2, (2, 3))
    a = rng.normal(size=(2, 3, 4, 5))
    V, d = rng.normal(size=(3, 3)), rng.normal(size=3)
    a_t = np.einsum("njhw,jk->nkhw", a, V) + d[None, :, None, None]
    def expanded(act):
        return expand_homogeneous(im2col(to_xp(act), conv.geom))
    np.testing.assert_allclose(to_numpy(expanded(a_t)),
                               to_numpy(expanded(a) @ expanded_transform(to_xp(V), to_xp(d), 6)),
                               rtol=0, atol=SAME_FUNCTION_ATOL)


# --------------------------------------------------------------------------- (b) factors
@given(architectures(), st.integers(0, 2**31 - 1))
def test_transformed_factors(to_xp, arch, seed):
    """Eqs. 98-105 on the same batch with the same sampled targets."""
    net, n = arch
    params, x, _, _, reparam = make_case(net, n, seed, to_xp)
    net_d, params_d = dagger_network(net, reparam), dagger_params(net, params, reparam)
    fac = network_factors(net.sampled_records(params, x, np.random.default_rng(seed)))
    fac_d = network_factors(net_d.sampled_records(params_d, x, np.random.default_rng(seed)))
    for t, f, f_d in zip(layer_transforms(net, reparam), fac, fac_d):
        U, V_H = to_numpy(t.U), to_numpy(t.V_H)
        om = V_H.T @ to_numpy(f.Omega) @ V_H
        ga = U @ to_numpy(f.Gamma) @ U.T
        np.testing.assert_allclose(to_numpy(f_d.Omega), om, rtol=0,
                                   atol=CHAIN_RULE_RTOL * np.abs(om).max())
        np.testing.assert_allclose(to_numpy(f_d.Gamma), ga, rtol=0,
                                   atol=CHAIN_RULE_RTOL * np.abs(ga).max())


# --------------------------------------------------------------------------- (c), (d)
@settings(max_examples=20)
@given(architectures(), st.integers(0, 2**31 - 1))
def test_undamped_kfc_update_is_invariant(to_xp, arch, seed):
    net, n = arch
    params, x, y, x_test, reparam = make_case(net, n, seed, to_xp)
    assume(_omega_full_rank(net, params, x, seed))
    err = invariance_error(net, params, reparam, x, y, x_test, seed=seed, lr=LEARNING_RATE)
    assert err <= KFC_INVARIANCE_ATOL


@pytest.mark.parametrize("case", [valid_net, padded_net])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_undamped_kfc_update_is_invariant_in_float32(to_xp, case, seed):
    net, n = case()
    params, x, y, x_test, reparam = make_case(net, n, seed, to_xp, dtype="float32")
    err = invariance_error(net, params, reparam, x, y, x_test, seed=seed, lr=LEARNING_RATE)
    assert err <= KFC_INVARIANCE_ATOL_F32


@settings(max_examples=15)
@given(architectures(), st.integers(0, 2**31 - 1))
def test_damped_kfc_is_invariant_to_orthogonal_maps_without_shifts(to_xp, arch, seed):
    """(Gamma-dagger + delta I)^-1 = U^-T (Gamma + delta I)^-1 U^-1 when U is orthogonal, the same
    for Omega with [[V]]_H = diag(1, V kron I) orthogonal when d = 0; traces (pi) are unchanged."""
    net, n = arch
    params, x, y, x_test, reparam = make_case(net, n, seed, to_xp, orthogonal=True,
                                              shifts=False)
    err = invariance_error(net, params, reparam, x, y, x_test, seed=seed, lr=LEARNING_RATE,
                           method="kfc-damped", damping=DAMPING)
    assert err <= KFC_INVARIANCE_ATOL


# --------------------------------------------------------------------------- (e) controls
@pytest.mark.parametrize("case", [valid_net, padded_net])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method,damping", [("sgd", None), ("diagonal-fisher", 1e-4),
                                            ("kfc-damped", DAMPING)])
def test_non_invariant_updates_fail(to_xp, case, seed, method, damping):
    net, n = case()
    params, x, y, x_test, reparam = make_case(net, n, seed, to_xp)
    err = invariance_error(net, params, reparam, x, y, x_test, seed=seed, lr=LEARNING_RATE,
                           method=method, damping=damping)
    same = invariance_error(net, params, reparam, x, y, x_test, seed=seed, lr=LEARNING_RATE)
    assert err >= CONTROL_MIN_DISCREPANCY
    assert same <= KFC_INVARIANCE_ATOL      # the same case is invariant under undamped KFC


@pytest.mark.parametrize("padding", [0, 1])
def test_shift_in_front_of_padded_conv_is_rejected_and_really_breaks_eq_79(to_xp, padding):
    """Input shift d_0 != 0 (V_0 = I, nothing else transformed): Lemma 2 changes only the first
    conv, W_bar-dagger = W_bar [[I]]_H^-T.  Exact without padding; with zero padding the border
    patches of N-dagger read 0 where they should read d_j, so the functions differ -- which is
    why dagger_params refuses that case."""
    net = Sequential([Conv2d(2, 2, 3, padding=padding), Tanh(), Flatten(),
                      Dense(2 * (2 + 2 * padding) ** 2, 3)], (2, 4, 4))
    rng = np.random.default_rng(0)
    host_params = net.init(rng, dtype="float64")
    x = to_xp(rng.normal(size=(4, 2, 4, 4)))
    reparam = Reparameterization(PointwiseAffine.identity(2, x), {},
                                 PointwiseAffine.identity(3, x))
    d = np.array([0.5, -0.3])
    reparam.input.d = to_xp(d)
    params = [to_xp(p) for p in host_params]
    params_d = [None] + list(params) + [None]
    params_d[1] = to_xp(host_params[0]
                        @ np.linalg.inv(expanded_transform(np.eye(2), d, 9)).T)
    gap = function_discrepancy(net, params, dagger_network(net, reparam), params_d, x)
    if padding:
        with pytest.raises(ValueError, match="zero-padded conv"):
            dagger_params(net, params, reparam)
        assert gap >= CONTROL_MIN_DISCREPANCY
    else:
        np.testing.assert_allclose(to_numpy(dagger_params(net, params, reparam)[1]),
                                   to_numpy(params_d[1]))
        assert gap <= SAME_FUNCTION_ATOL


# --------------------------------------------------------------------------- errors
def test_unsupported_networks_and_arguments_raise(to_xp):
    like = to_xp(np.zeros(1))
    net = Sequential([Conv2d(1, 2, 3), Tanh(), MaxPool2d(2), Flatten(), Dense(8, 2)], (1, 6, 6))
    reparam = Reparameterization(PointwiseAffine.identity(1, like), {},
                                 PointwiseAffine.identity(2, like))
    with pytest.raises(ValueError, match="layer 2"):
        dagger_network(net, reparam)
    with pytest.raises(ValueError, match="must be an elementwise"):
        AffineWrapped(Flatten(), PointwiseAffine.identity(2, like))
    net, n = valid_net()
    params, x, y, _, reparam = make_case(net, n, 0, to_xp)
    bad = Reparameterization(PointwiseAffine.identity(3, like), reparam.hidden, reparam.output)
    with pytest.raises(ValueError, match="V has shape"):
        dagger_params(net, params, bad)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="method='newton'"):
        preconditioned_update(net, params, x, y, rng, lr=0.1, method="newton")
    with pytest.raises(ValueError, match="needs damping > 0"):
        preconditioned_update(net, params, x, y, rng, lr=0.1, method="kfc-damped")
    with pytest.raises(ValueError, match="is undamped"):
        preconditioned_update(net, params, x, y, rng, lr=0.1, method="kfc", damping=1e-3)
    with pytest.raises(ValueError, match="must directly follow"):
        dagger_network(Sequential([ReLU(), Flatten(), Dense(4, 2)], (4,)),
                       Reparameterization(PointwiseAffine.identity(4, like), {},
                                          PointwiseAffine.identity(2, like)))


def test_diagonal_fisher_control_is_the_diagonal_of_the_one_sample_fisher(to_xp):
    """The negative control's preconditioner is what its name says: diag of the Monte-Carlo
    Fisher with one sampled target per example (same draws), in the W_bar layout."""
    from kfc_ref.curvature.fisher import monte_carlo_fisher
    from kfc_ref.theory.invariance import _diagonal_fisher
    net, n = valid_net()
    params, x, _, _, _ = make_case(net, n, 0, to_xp)
    records = net.sampled_records(params, x, np.random.default_rng(5))
    diag = np.concatenate([to_numpy(_diagonal_fisher(r)).ravel(order="F") for r in records])
    F = to_numpy(monte_carlo_fisher(net, params, x, 1, np.random.default_rng(5)))
    np.testing.assert_allclose(diag, np.diag(F), rtol=CHAIN_RULE_RTOL, atol=1e-14)
