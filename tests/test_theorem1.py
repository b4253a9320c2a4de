"""Tests for kfc_ref.theory.theorem1: beta (Eqs. 17, 48 and the general-stride form), the synthetic
Gaussian fields, and Theorem 1 itself (Eqs. 16-19, 47) checked *exactly*.

E[vec(DW_bar) vec(DW_bar)^T] is computed without sampling (``exact_gradient_second_moment``:
the weight gradient is bilinear in (A, DS), so for Gaussian A and DS with a known square root of
their covariances the second moment is a finite sum over basis pairs).  Where IAD, SH and SUD
hold by construction it must equal Omega kron Gamma(0) to round-off; where SUD or IAD is broken
it must not (negative controls).  A seeded Monte-Carlo check ties the "exact" moment to samples.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfc_ref.backend import to_numpy
from kfc_ref.nn.expand import ConvGeometry, expand_homogeneous, im2col
from kfc_ref.curvature.fisher import layer_gradient_vectors
from kfc_ref.nn.layers import Conv2d
from kfc_ref.theory.theorem1 import (
    StationaryGaussianField,
    beta,
    beta_axis,
    beta_matrix,
    beta_vector,
    crop_autocovariance,
    empirical_autocovariance,
    exact_gradient_second_moment,
    omega_from_autocovariance,
    theorem1_prediction,
)
from strategies import conv_cases

#: Theorem 1 is an identity; both sides are float64 sums of at most ~10^4 products of O(1)
#: numbers, so they agree to ~1e-14 relative.  1e-10 is a wide margin that any real mistake
#: (a wrong beta, a missing bias term: O(1) relative) cannot pass.
THEOREM1_RTOL = 1e-10
#: When SUD or IAD is broken the mismatch is O(0.1-1) relative (0.32-0.84 in the cases below);
#: the negative controls require more than this.
BROKEN_MIN_REL_ERROR = 1e-2
#: Monte-Carlo check of the exact moment with MC_SAMPLES draws: relative Frobenius error
#: ~ c / sqrt(MC_SAMPLES) with c ~ 2-5 here (0.013-0.033 observed over 8 seeds; the field's
#: mean and autocovariance 0.0002-0.015).  A wrong term in the exact sum is O(0.1-1).
MC_SAMPLES = 20000
MC_REL_BOUND = 0.06


def _rel(a, b):
    """Relative Frobenius error, on the host (arguments from any array module)."""
    a, b = to_numpy(a), to_numpy(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def field_on(to_xp, field):
    """The field with its filter and mean in the --xp module (its methods follow them)."""
    return StationaryGaussianField(to_xp(field.filt), to_xp(field.mean), field.grid)


def _fields(case, seed, noise_channels=2, filter_size=(2, 3), der_filter=(1, 1)):
    """Activations on the input grid (SH by construction); derivatives white across locations
    (SUD) on the output grid with a random cross-map covariance, unless der_filter > 1x1.
    Host fields; tests move them with :func:`field_on`."""
    rng = np.random.default_rng(seed)
    geom = ConvGeometry(case["kh"], case["kw"], case["stride"], case["padding"],
                        case["dilation"])
    act = StationaryGaussianField.random(rng, case["j"], (case["h"], case["w"]), noise_channels,
                                         filter_size)
    out_grid = geom.output_shape(case["h"], case["w"])
    der = StationaryGaussianField.random(rng, case["i"], out_grid, case["i"], der_filter,
                                         mean_scale=0.0)
    return geom, act, der


# --------------------------------------------------------------------------- beta
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2))
def test_beta_eq17_is_the_location_count_and_beta_matrix(to_xp, T1, T2, R):
    geom = ConvGeometry(2 * R + 1, 2 * R + 1, 1, R)
    like = to_xp(np.zeros(1))
    B = to_numpy(beta_matrix(geom, T1, T2, like))
    B_vec = to_numpy(beta_vector(geom, T1, T2, like))
    offsets = [(u - R, v - R) for u in range(2 * R + 1) for v in range(2 * R + 1)]
    for a, d in enumerate(offsets):
        for b, dp in enumerate(offsets):
            count = sum(1 for t1 in range(T1) for t2 in range(T2)
                        if 0 <= t1 + d[0] < T1 and 0 <= t2 + d[1] < T2
                        and 0 <= t1 + dp[0] < T1 and 0 <= t2 + dp[1] < T2)
            assert beta(d, dp, T1, T2) == count == B[a, b]
        # bias weight: Eq. 48's beta(delta) = beta(delta, 0) = (T1-|d1|)(T2-|d2|), clipped
        assert B_vec[a] == beta(d, (0, 0), T1, T2) \
            == max(0, T1 - abs(d[0])) * max(0, T2 - abs(d[1]))
    # Eq. 17 as printed (no clip) is T - 2R on the extreme pair: 0 at 2R = T (the right
    # count), negative only for 2R > T, where the clipped beta counts 0 locations
    if 2 * R >= T1 and R > 0:
        assert beta((-R, 0), (R, 0), T1, T2) == 0
        printed = (T1 - R - R) * T2
        assert (printed < 0) == (2 * R > T1) and (printed == 0) == (2 * R == T1)


@given(conv_cases(max_batch=1, max_channels=2, max_size=6))
def test_beta_matrix_is_the_gram_of_the_patch_mask(to_xp, case):
    """beta(delta, delta') = #{t: both offsets read inside the grid} = (P^T P) for the patches P
    of an all-ones input (im2col puts 0 where a patch leaves the grid), any stride/padding."""
    geom = ConvGeometry(case["kh"], case["kw"], case["stride"], case["padding"],
                        case["dilation"])
    mask = im2col(to_xp(np.ones((1, 1, case["h"], case["w"]))), geom)[0]  # (|T|, |Delta|)
    host_mask = to_numpy(mask)
    np.testing.assert_array_equal(to_numpy(beta_matrix(geom, case["h"], case["w"], mask)),
                                  host_mask.T @ host_mask)
    np.testing.assert_array_equal(to_numpy(beta_vector(geom, case["h"], case["w"], mask)),
                                  host_mask.sum(axis=0))


@pytest.mark.host_only("beta_axis counts locations with Python ints")
def test_beta_axis_examples_and_errors():
    # stride 2, no padding, T_in = 5, kernel 3: t in {0, 1}, rows read 2t + u
    assert beta_axis(0, 2, 5, 2, stride=2, padding=0, kernel=3) == 2
    # padding 1, stride 1, T_in = 3: u = 0 misses t = 0, u = 2 misses t = 2
    assert beta_axis(0, 2, 3, 3, stride=1, padding=1, kernel=3) == 1
    with pytest.raises(ValueError, match="kernel offsets"):
        beta_axis(3, 0, 5, 3, kernel=3)


# --------------------------------------------------------------------------- the fields
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_field_is_spatially_homogeneous(to_xp, H, W, J, seed):
    """SH by construction: E[a_t a_t'^T] depends only on t' - t, E[a_t] = M for every t."""
    field = field_on(to_xp, StationaryGaussianField.random(np.random.default_rng(seed), J,
                                                            (H, W), 2, (2, 2)))
    b = to_numpy(field.basis())
    M = to_numpy(field.mean)
    for t in np.ndindex(H, W):
        for s in np.ndindex(H, W):
            second = b[:, :, t[0], t[1]].T @ b[:, :, s[0], s[1]] + np.outer(M, M)
            np.testing.assert_allclose(
                second, to_numpy(field.second_moment((s[0] - t[0], s[1] - t[1]))),
                rtol=1e-12, atol=1e-12)


def test_field_samples_have_the_stated_moments(to_xp):
    field = field_on(to_xp, StationaryGaussianField.random(np.random.default_rng(0), 2, (3, 3),
                                                            1, (2, 2)))
    x = field.sample(MC_SAMPLES, np.random.default_rng(1))
    geom = ConvGeometry(3, 3, 1, 1)
    full, M = empirical_autocovariance(x)
    assert _rel(M, field.mean) < MC_REL_BOUND
    assert _rel(crop_autocovariance(full, geom), field.autocovariance(geom)) < MC_REL_BOUND


# --------------------------------------------------------------------------- plug-in estimator
def test_empirical_autocovariance_equals_loop_twin(to_xp):
    x = np.random.default_rng(3).normal(size=(2, 2, 3, 4))
    full, M = map(to_numpy, empirical_autocovariance(to_xp(x)))
    n, J, H, W = x.shape
    for d1 in range(-(H - 1), H):
        for d2 in range(-(W - 1), W):
            for j in range(J):
                for k in range(J):
                    vals = [x[e, j, t1, t2] * x[e, k, t1 + d1, t2 + d2]
                            for e in range(n) for t1 in range(H) for t2 in range(W)
                            if 0 <= t1 + d1 < H and 0 <= t2 + d2 < W]
                    assert full[j, k, d1 + H - 1, d2 + W - 1] == pytest.approx(np.mean(vals))
    np.testing.assert_allclose(M, x.mean(axis=(0, 2, 3)))


def test_omega_from_autocovariance_rejects_bad_shapes(to_xp):
    geom = ConvGeometry(3, 3, 1, 1)
    with pytest.raises(ValueError, match="Omega_fn must have shape"):
        omega_from_autocovariance(to_xp(np.zeros((2, 2, 3, 3))), to_xp(np.zeros(2)), geom, 4, 4)


# --------------------------------------------------------------------------- Theorem 1
@given(conv_cases(max_batch=1, max_channels=2, max_size=4), st.integers(0, 2**31 - 1),
       st.integers(1, 2))
def test_theorem1_exact_under_iad_sh_sud(to_xp, case, seed, noise_channels):
    """Eqs. 16-19 and 47: E[vec(DW_bar) vec(DW_bar)^T] = Omega kron Gamma(0) exactly, for any
    stride, padding and dilation (beta in the general per-axis form of theorem1.beta_axis)."""
    geom, act, der = _fields(case, seed, noise_channels)
    act, der = field_on(to_xp, act), field_on(to_xp, der)
    exact = exact_gradient_second_moment(act, der, geom)
    assert _rel(theorem1_prediction(act, der, geom), exact) < THEOREM1_RTOL


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2), st.integers(0, 2**31 - 1))
def test_theorem1_same_padding_bias_entries(to_xp, H, W, R, seed):
    """The paper's own setting (stride 1, padding R, kernel 2R+1): the bias block is
    |T| Gamma(0) and the bias/weight blocks are beta(delta) M(j) Gamma(0) (Eq. 47)."""
    case = dict(j=2, i=2, h=H, w=W, kh=2 * R + 1, kw=2 * R + 1, stride=1, padding=R,
                dilation=1)
    geom, host_act, der = _fields(case, seed)
    act, der = field_on(to_xp, host_act), field_on(to_xp, der)
    exact = to_numpy(exact_gradient_second_moment(act, der, geom))
    gamma0 = to_numpy(der.second_moment((0, 0)))
    I = gamma0.shape[0]
    np.testing.assert_allclose(exact[:I, :I], H * W * gamma0, rtol=THEOREM1_RTOL)
    for j in range(2):
        for a, (u, v) in enumerate((u, v) for u in range(2 * R + 1) for v in range(2 * R + 1)):
            col = (1 + j * (2 * R + 1) ** 2 + a) * I
            expected = beta((u - R, v - R), (0, 0), H, W) * host_act.mean[j] * gamma0
            np.testing.assert_allclose(exact[:I, col:col + I], expected, rtol=THEOREM1_RTOL,
                                       atol=THEOREM1_RTOL * np.abs(gamma0).max())


NEGATIVE_CASES = [
    dict(j=2, i=2, h=4, w=4, kh=3, kw=3, stride=1, padding=1, dilation=1),
    dict(j=1, i=2, h=5, w=4, kh=2, kw=3, stride=2, padding=0, dilation=1),
]


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_theorem1_fails_when_derivatives_are_spatially_correlated(to_xp, case):
    """SUD broken: DS = a 3x3 positive box-like filter of white noise (still IAD and SH)."""
    geom, act, der = _fields(case, 0)
    der.filt = np.abs(der.filt) + 0.5                       # strong positive neighbours
    der.filt = np.repeat(np.repeat(der.filt, 3, axis=2), 3, axis=3)
    act, der = field_on(to_xp, act), field_on(to_xp, der)
    exact = exact_gradient_second_moment(act, der, geom)
    assert _rel(theorem1_prediction(act, der, geom), exact) > BROKEN_MIN_REL_ERROR


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_theorem1_fails_when_activations_and_derivatives_are_dependent(to_xp, case):
    """IAD broken: a two-component mixture (probability 1/2 each).  In component s the
    activations are scaled by 1 + s and the derivatives by 1 + 2s; each component satisfies
    IAD + SH + SUD, so the exact moment is the average of the exact per-component moments, but
    the scales are shared, so A and DS are dependent.  The marginal statistics are still SH and
    SUD; Omega kron Gamma of the marginals must miss."""
    geom, act, der = _fields(case, 1)
    comps = [(field_on(to_xp, StationaryGaussianField(act.filt * (1 + s), act.mean * (1 + s),
                                                       act.grid)),
              field_on(to_xp, StationaryGaussianField(der.filt * (1 + 2 * s), der.mean, der.grid)))
             for s in (0, 1)]
    exact = sum(exact_gradient_second_moment(a, d, geom) for a, d in comps) / 2
    Omega = sum(omega_from_autocovariance(a.autocovariance(geom), a.mean, geom, *a.grid)
                for a, _ in comps) / 2
    Gamma = sum(d.second_moment((0, 0)) for _, d in comps) / 2
    assert _rel(np.kron(to_numpy(Omega), to_numpy(Gamma)), exact) > BROKEN_MIN_REL_ERROR
    # positive control: each component alone satisfies Theorem 1
    for a, d in comps:
        assert _rel(theorem1_prediction(a, d, geom), exact_gradient_second_moment(a, d, geom)) \
            < THEOREM1_RTOL


@pytest.mark.parametrize("der_filter", [(1, 1), (2, 2)])
def test_exact_second_moment_matches_monte_carlo(to_xp, der_filter):
    """The basis-pair sum is the expectation: compare with MC_SAMPLES sampled gradients
    computed by the conv layer's own expansion (im2col) and weight-gradient code."""
    case = dict(j=1, i=2, h=3, w=3, kh=3, kw=3, stride=1, padding=1, dilation=1)
    geom, act, der = _fields(case, 4, noise_channels=1, filter_size=(2, 2),
                             der_filter=der_filter)
    act, der = field_on(to_xp, act), field_on(to_xp, der)
    rng = np.random.default_rng(5)
    A_H = expand_homogeneous(im2col(act.sample(MC_SAMPLES, rng), geom))
    DS = Conv2d.derivatives(der.sample(MC_SAMPLES, rng))
    G = layer_gradient_vectors(A_H, DS)
    assert _rel(G.T @ G / MC_SAMPLES, exact_gradient_second_moment(act, der, geom)) \
        < MC_REL_BOUND
