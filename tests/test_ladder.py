"""Tests for kfc_ref.theory.ladder: the approximation ladder (docs/ladder.md).

(a) the exact rung is the layer's block of the true Fisher (kfc_ref.curvature.fisher);
(b) the KFC rung (built from the location moments) equals kfc_ref.curvature.factors'
    Omega kron Gamma with Gamma from the exact expectation over y;
(c) the IAD and IAD+SUD rungs equal explicit loops over examples, classes and locations;
(d) exact identities: N = 1 makes IAD exact; |T| = 1 collapses IAD, IAD+SUD and KFC; a 1x1
    kernel with "same" padding makes KFC-SUA equal to KFC;
(e) every rung is symmetric PSD; rows are well formed; bad arguments raise clear errors.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.curvature.factors import kron_block
from kfc_ref.curvature.fisher import class_records, exact_layer_factors, fisher_blocks, true_fisher
from kfc_ref.theory.ladder import RUNGS, approximation_ladder, format_ladder
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.network import Sequential

#: Every identity below compares float64 sums of <= ~10^4 O(1) products in different orders.
EXACT_RTOL = 1e-10
#: PSD up to round-off: eigenvalues >= -PSD_TOL * largest eigenvalue.
PSD_TOL = 1e-10


def conv_net(J=1, I=2, k=3, padding=1, stride=1, size=4, C=3, second=False):
    layers = [Conv2d(J, I, k, stride=stride, padding=padding), Tanh()]
    geom = layers[0].geom
    h, w = geom.output_shape(size, size)
    c = I
    if second:
        layers += [Conv2d(I, 2, 3, padding=1), Tanh()]
        c = 2
    layers += [Flatten(), Dense(c * h * w, C)]
    return Sequential(layers, (J, size, size))


def _data(net, n, seed, to_xp):
    """Parameters with non-zero biases and a batch, drawn on the host, in the --xp module."""
    rng = np.random.default_rng(seed)
    params = net.init(rng, "float64")
    for p in params:
        if p is not None:
            p[:, 0] = 0.3 * rng.normal(size=p.shape[0])
    x = rng.normal(size=(n,) + net.input_shape) + 0.5
    y = rng.integers(0, net.shapes[-1][0], n)
    return [to_xp(p) for p in params], to_xp(x), to_xp(y)


def _rel(a, b):
    """Relative Frobenius error, on the host (arguments from any array module)."""
    a, b = to_numpy(a), to_numpy(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _matrices(ladder):
    """The ladder's rungs brought to the host."""
    return {name: to_numpy(M) for name, M in ladder.matrices.items()}


@st.composite
def ladder_cases(draw, to_xp):
    k = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 1))
    size = draw(st.integers(max(1, k - 2 * padding), 4))
    net = conv_net(J=draw(st.integers(1, 2)), I=draw(st.integers(1, 2)), k=k, padding=padding,
                   stride=draw(st.integers(1, 2)), size=size, C=draw(st.integers(2, 3)),
                   second=draw(st.booleans()) and size >= 1)
    params, x, y = _data(net, draw(st.integers(1, 4)), draw(st.integers(0, 2**31 - 1)), to_xp)
    layer_index = draw(st.sampled_from(net.param_layers))
    return net, params, x, y, layer_index


# --------------------------------------------------------------------------- (a), (b), (e)
@given(data=st.data())
def test_exact_and_kfc_rungs_match_fisher_and_factors(to_xp, data):
    net, params, x, y, index = data.draw(ladder_cases(to_xp))
    ladder = approximation_ladder(net, params, x, y, index)
    matrices = _matrices(ladder)
    F = matrices["exact"]
    block = fisher_blocks(true_fisher(net, params, x), net)[net.param_layers.index(index)]
    assert _rel(F, block) < EXACT_RTOL
    assert _rel(matrices["KFC"],
                kron_block(exact_layer_factors(net, params, x, index))) < EXACT_RTOL
    for name, M in matrices.items():
        assert _rel(M, M.T) < EXACT_RTOL, name
        eig = np.linalg.eigvalsh(0.5 * (M + M.T))
        assert eig.min() >= -PSD_TOL * eig.max(), name
    names = [row.name for row in ladder.rows]
    assert names == [r for r in RUNGS if r in matrices]
    exact_row = ladder.rows[0]
    assert exact_row.name == "exact" and exact_row.rel_error == 0.0
    assert exact_row.angle_deg < 1e-3
    for _name, rel, angle in ladder.rows:
        assert rel >= 0 and 0 <= angle <= 180


# --------------------------------------------------------------------------- (c)
def test_iad_rungs_equal_explicit_loops(to_xp):
    net = conv_net(J=1, I=2, k=3, padding=1, size=3)
    params, x, y = _data(net, 2, 0, to_xp)
    matrices = _matrices(approximation_ladder(net, params, x, y, 0))
    p, per_class = class_records(net, params, x)
    p = to_numpy(p)
    DS = [to_numpy(records[0].DS) for records in per_class]
    A_H = to_numpy(per_class[0][0].A_H)
    N, T, K = A_H.shape
    I = DS[0].shape[2]
    EAA = np.zeros((T, T, K, K))
    EDD = np.zeros((T, T, I, I))
    for n in range(N):
        for t in range(T):
            for s in range(T):
                EAA[t, s] += np.outer(A_H[n, t], A_H[n, s]) / N
                for c in range(p.shape[1]):
                    d = DS[c][n]
                    EDD[t, s] += p[n, c] * np.outer(d[t], d[s]) / N
    F1 = sum(np.kron(EAA[t, s], EDD[t, s]) for t in range(T) for s in range(T))
    F2 = sum(np.kron(EAA[t, t], EDD[t, t]) for t in range(T))
    F3 = np.kron(sum(EAA[t, t] for t in range(T)), sum(EDD[t, t] for t in range(T)) / T)
    assert _rel(matrices["IAD"], F1) < EXACT_RTOL
    assert _rel(matrices["IAD+SUD"], F2) < EXACT_RTOL
    assert _rel(matrices["KFC"], F3) < EXACT_RTOL
    np.testing.assert_array_equal(matrices["diagonal"], np.diag(np.diag(matrices["exact"])))


# --------------------------------------------------------------------------- (d)
@given(data=st.data())
def test_one_example_makes_iad_exact(to_xp, data):
    """N = 1: the activations are fixed given x, so independence of A and DS holds trivially."""
    net, params, x, y, index = data.draw(ladder_cases(to_xp))
    ladder = approximation_ladder(net, params, x[:1], y[:1], index)
    assert _rel(ladder.matrices["IAD"], ladder.matrices["exact"]) < EXACT_RTOL


@pytest.mark.parametrize("n", [1, 5])
def test_one_location_collapses_the_spatial_rungs(to_xp, n):
    net = conv_net(J=2, I=2, k=3, padding=0, size=3)                       # |T| = 1
    params, x, y = _data(net, n, 1, to_xp)
    m = approximation_ladder(net, params, x, y, 0).matrices
    assert _rel(m["IAD+SUD"], m["IAD"]) < EXACT_RTOL
    assert _rel(m["KFC"], m["IAD"]) < EXACT_RTOL


def test_sua_equals_kfc_for_a_1x1_kernel(to_xp):
    """|Delta| = 1, stride 1: Omega_SUA's weight block is |T| (Sigma + M M^T), which is the
    pooled uncentred second moment sum_t E[a_t a_t^T]; the bias row is |T| M.  So SUA = KFC."""
    net = conv_net(J=2, I=2, k=1, padding=0, size=3)
    params, x, y = _data(net, 4, 2, to_xp)
    m = approximation_ladder(net, params, x, y, 0).matrices
    assert _rel(m["KFC-SUA"], m["KFC"]) < EXACT_RTOL


def test_sua_differs_from_kfc_on_correlated_inputs(to_xp):
    """Negative control: spatially smooth inputs (SUA false) give a clearly different rung."""
    net = conv_net(J=1, I=2, k=3, padding=1, size=4)
    params, _, y = _data(net, 4, 3, to_xp)
    x = to_xp(np.cumsum(np.cumsum(np.random.default_rng(3).normal(size=(4, 1, 4, 4)), 2), 3))
    m = approximation_ladder(net, params, x, y, 0).matrices
    assert _rel(m["KFC-SUA"], m["KFC"]) > 1e-2


def test_dense_layer_has_no_sua_rung_and_errors_are_clear(to_xp):
    net = conv_net()
    params, x, y = _data(net, 3, 4, to_xp)
    ladder = approximation_ladder(net, params, x, y, net.param_layers[-1])
    assert "KFC-SUA" not in ladder.matrices
    assert "KFC" in format_ladder(ladder)
    with pytest.raises(ValueError, match="layer_index=1"):
        approximation_ladder(net, params, x, y, 1)
    with pytest.raises(ValueError, match="damping"):
        approximation_ladder(net, params, x, y, 0, damping=0.0)
