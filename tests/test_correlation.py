"""Tests for kfc_ref.theory.correlation: the SUD-analysis estimators (App. D.1, Figures 3 and 4).

(a) equality with slow Python-loop twins on drawn shapes and values;
(b) white noise -> off-centre correlations are O(1/sqrt(#pairs));
(c) box-filtered white noise -> the closed-form autocorrelation; constant-over-space -> 1;
(d) correlated Gaussian maps -> the known cross-map correlation matrix;
(e) degenerate maps -> NaN, without warnings;
(f) bad inputs -> errors naming the argument.

All statistical tests use fixed seeds; the bounds are ~5 standard deviations of the estimator,
and each was checked to hold for 200 other seeds (the worst case is quoted next to the bound).
"""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from kfc_ref.backend import to_numpy
from kfc_ref.theory.correlation import (
    DEFAULT_MAX_OFFSET,
    cross_map_correlation,
    mean_offcentre_correlation,
    spatial_autocorrelation,
)

#: Fast estimator vs slow loop twin, float64.  Rounding error of a ratio of sums of at most
#: ~200 products is bounded (Cauchy-Schwarz) by ~ n_terms * eps * H*W / pairs ~ 1e-12.
TWIN_ATOL = 1e-10
TWIN_RTOL = 1e-10
#: Number of standard deviations allowed in the seeded statistical tests.
N_SIGMA = 5.0


# --------------------------------------------------------------------------- slow twins

def slow_autocorrelation(field, max_offset, centered=False):
    """Plain loop over maps, offsets, examples and locations (the definition, written out)."""
    f = np.asarray(field, dtype=np.float64)
    if centered:  # same expression as the implementation, so ill-conditioned cases agree
        f = f - np.mean(f, axis=(0, 2, 3), keepdims=True)
    n, c, h, w = f.shape
    r1, r2 = min(max_offset, h - 1), min(max_offset, w - 1)
    out = np.empty((c, 2 * r1 + 1, 2 * r2 + 1))
    for ci in range(c):
        den = 0.0
        for ni in range(n):
            for t1 in range(h):
                for t2 in range(w):
                    den += f[ni, ci, t1, t2] ** 2
        den /= n * h * w
        for d1 in range(-r1, r1 + 1):
            for d2 in range(-r2, r2 + 1):
                total, count = 0.0, 0
                for ni in range(n):
                    for t1 in range(h):
                        for t2 in range(w):
                            s1, s2 = t1 + d1, t2 + d2
                            if 0 <= s1 < h and 0 <= s2 < w:
                                total += f[ni, ci, t1, t2] * f[ni, ci, s1, s2]
                                count += 1
                out[ci, r1 + d1, r2 + d2] = (total / count) / den if den > 0 else np.nan
    return out


def slow_cross_map(field, location, centered=False):
    f = np.asarray(field, dtype=np.float64)
    n, c, h, w = f.shape
    row, col = (h // 2, w // 2) if location is None else location
    x = f[:, :, row, col]
    if centered:
        x = x - np.mean(x, axis=0, keepdims=True)
    out = np.empty((c, c))
    for i in range(c):
        for j in range(c):
            mij = sum(x[k, i] * x[k, j] for k in range(n)) / n
            mii = sum(x[k, i] ** 2 for k in range(n)) / n
            mjj = sum(x[k, j] ** 2 for k in range(n)) / n
            out[i, j] = mij / math.sqrt(mii * mjj) if mii > 0 and mjj > 0 else np.nan
    return out


def pair_counts(n, h, w, r1, r2):
    """N (H - |d1|)(W - |d2|): the number of products averaged at each offset."""
    d1 = np.arange(-r1, r1 + 1)
    d2 = np.arange(-r2, r2 + 1)
    return n * (h - np.abs(d1))[:, None] * (w - np.abs(d2))[None, :]


def box_filtered_noise(rng, n, c, h, w, k1, k2):
    """White noise summed over a k1 x k2 box (a 'valid' moving sum, so the field is stationary).

    Its autocorrelation is separable and exact: (1 - |d1|/k1)_+ (1 - |d2|/k2)_+.
    """
    z = rng.standard_normal((n, c, h + k1 - 1, w + k2 - 1))
    f = np.zeros((n, c, h, w))
    for i in range(k1):
        for j in range(k2):
            f += z[:, :, i:i + h, j:j + w]
    return f


def box_theory(k1, k2, r1, r2):
    d1 = np.arange(-r1, r1 + 1)
    d2 = np.arange(-r2, r2 + 1)
    return (np.clip(1 - np.abs(d1) / k1, 0, None)[:, None]
            * np.clip(1 - np.abs(d2) / k2, 0, None)[None, :])


# --------------------------------------------------------------------------- (a) twins

# Values away from underflow (tiny magnitudes -> exact zeros, which also makes degenerate maps).
_values = st.floats(-10, 10, allow_nan=False, allow_subnormal=False).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v)


@st.composite
def fields(draw, max_n=3, max_c=2, max_hw=6):
    shape = (draw(st.integers(1, max_n)), draw(st.integers(1, max_c)),
             draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)))
    return draw(arrays(np.float64, shape, elements=_values))


@given(field=fields(), max_offset=st.integers(0, 8), centered=st.booleans())
def test_autocorrelation_matches_slow_twin(to_xp, field, max_offset, centered):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_numpy(spatial_autocorrelation(to_xp(field), max_offset, centered=centered))
    want = slow_autocorrelation(field, max_offset, centered=centered)
    n, c, h, w = field.shape
    assert got.shape == (c, 2 * min(max_offset, h - 1) + 1, 2 * min(max_offset, w - 1) + 1)
    assert got.dtype == field.dtype
    np.testing.assert_allclose(got, want, rtol=TWIN_RTOL, atol=TWIN_ATOL, equal_nan=True)
    # Exact properties: centre 1 (or NaN), symmetry under d -> -d.
    r1, r2 = (got.shape[1] - 1) // 2, (got.shape[2] - 1) // 2
    finite = ~np.isnan(got[:, r1, r2])
    assert np.all(got[finite, r1, r2] == 1.0)
    np.testing.assert_array_equal(got, got[:, ::-1, ::-1])


@given(field=fields(max_n=5, max_c=4, max_hw=4), centered=st.booleans(), data=st.data())
def test_cross_map_matches_slow_twin(to_xp, field, centered, data):
    n, c, h, w = field.shape
    location = data.draw(st.none() | st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_numpy(cross_map_correlation(to_xp(field), location, centered=centered))
    want = slow_cross_map(field, location, centered=centered)
    assert got.shape == (c, c) and got.dtype == field.dtype
    np.testing.assert_allclose(got, want, rtol=TWIN_RTOL, atol=TWIN_ATOL, equal_nan=True)
    np.testing.assert_array_equal(got, got.T)
    d = np.diag(got)
    assert np.all((d == 1.0) | np.isnan(d))


def _auto(to_xp, f, *args, **kwargs):
    """spatial_autocorrelation on the --xp module, brought back to the host."""
    return to_numpy(spatial_autocorrelation(to_xp(f), *args, **kwargs))


def _cross(to_xp, f, *args, **kwargs):
    """cross_map_correlation on the --xp module, brought back to the host."""
    return to_numpy(cross_map_correlation(to_xp(f), *args, **kwargs))


def _summary(to_xp, a):
    """mean_offcentre_correlation of a host panel, computed on the --xp module, as a float."""
    return float(mean_offcentre_correlation(to_xp(a)))


def test_float32_close_to_float64(to_xp):
    rng = np.random.default_rng(1)
    f = box_filtered_noise(rng, 20, 3, 9, 7, 2, 3)
    a64 = _auto(to_xp, f, 4)
    a32 = _auto(to_xp, f.astype(np.float32), 4)
    assert a32.dtype == np.float32
    np.testing.assert_allclose(a32, a64, atol=1e-5)
    c32 = _cross(to_xp, f.astype(np.float32))
    assert c32.dtype == np.float32
    np.testing.assert_allclose(c32, _cross(to_xp, f), atol=1e-5)


def test_default_window_is_13_by_13(to_xp):
    f = np.random.default_rng(2).standard_normal((2, 1, 10, 10))
    assert DEFAULT_MAX_OFFSET == 6
    assert spatial_autocorrelation(to_xp(f)).shape == (1, 13, 13)


def test_window_clipped_per_axis_for_small_maps(to_xp):
    f = to_xp(np.random.default_rng(3).standard_normal((4, 2, 3, 8)))
    assert spatial_autocorrelation(f, 6).shape == (2, 5, 13)     # R1 = 2, R2 = 6
    assert spatial_autocorrelation(f[:, :, :1, :1], 6).shape == (2, 1, 1)
    assert spatial_autocorrelation(f, 0).shape == (2, 1, 1)


# --------------------------------------------------------------------------- (b) white noise

@pytest.mark.parametrize("n", [50, 800])
def test_white_noise_offcentre_is_small(to_xp, n):
    """Each off-centre entry averages N(H-|d1|)(W-|d2|) uncorrelated unit-variance products
    (E[f_t f_{t+d} f_s f_{s+d}] = 0 for s != t when d != 0), so its std is ~ 1/sqrt(#pairs)."""
    h = w = 12
    rng = np.random.default_rng(10 + n)
    f = rng.standard_normal((n, 2, h, w))
    a = _auto(to_xp, f)
    pairs = pair_counts(n, h, w, 6, 6)
    z = a * np.sqrt(pairs)
    z[:, 6, 6] = 0
    assert np.max(np.abs(z)) < N_SIGMA           # worst over 200 seeds: 4.3
    # Summary: mean |corr| ~ E|Z| * mean(1/sqrt(pairs)) = 0.80 * ...; the ratio stayed within
    # 1 +- 0.23 over 200 seeds, allow 1 +- 0.5.
    m = _summary(to_xp, a)
    expected = math.sqrt(2 / math.pi) * np.mean(np.delete(1 / np.sqrt(pairs).ravel(), 84))
    assert 0.5 * expected < m < 1.5 * expected


def test_white_noise_summary_shrinks_like_one_over_sqrt_n(to_xp):
    rng = np.random.default_rng(11)
    small = float(mean_offcentre_correlation(
        spatial_autocorrelation(to_xp(rng.standard_normal((25, 2, 10, 10))))))
    large = float(mean_offcentre_correlation(
        spatial_autocorrelation(to_xp(rng.standard_normal((400, 2, 10, 10))))))
    ratio = small / large          # sqrt(400 / 25) = 4 in expectation; 3.04..5.01 over 200 seeds
    assert 2.5 < ratio < 6.0


# --------------------------------------------------------------------------- (c) known fields

@pytest.mark.parametrize("centered, shift", [(False, 0.0), (True, 3.0)])
def test_box_filtered_noise_recovers_closed_form(to_xp, centered, shift):
    """k1 x k2 box sum of white noise: rho(d) = (1 - |d1|/k1)_+ (1 - |d2|/k2)_+ exactly.

    Statistical tolerance per offset: N_SIGMA * sqrt(S / #pairs(d)), with S = sum_k rho(k)^2
    = (1 + 2 sum_j (1 - j/k1)^2)(1 + 2 sum_j (1 - j/k2)^2): Bartlett's variance of a sample
    autocorrelation at lags beyond the filter support (about 0.016 at d = 0 here).  Over 200
    seeds the largest |error| / tolerance was 0.81 (i.e. about 4 sigma).
    The shifted + centred case checks that centring removes a constant mean.
    """
    n, c, h, w, k1, k2 = 300, 2, 12, 16, 3, 5          # k1 != k2 and H != W catch axis swaps
    rng = np.random.default_rng(20)
    f = box_filtered_noise(rng, n, c, h, w, k1, k2) + shift
    a = _auto(to_xp, f, centered=centered)
    theory = box_theory(k1, k2, 6, 6)
    s = float(np.sum(box_theory(k1, k2, k1, k2) ** 2))
    tol = N_SIGMA * np.sqrt(s / pair_counts(n, h, w, 6, 6))
    assert np.all(np.abs(a - theory) < tol), np.max(np.abs(a - theory) / tol)
    # The SUD summary of this strongly correlated field is far from 0 (0.096 in theory; the
    # error was <= 0.017 over 200 seeds).
    off = np.delete(np.abs(theory).ravel(), theory.size // 2).mean()
    assert abs(_summary(to_xp, a) - off) < 0.03


def test_uncentred_constant_mean_dominates(to_xp):
    """Uncentred (the paper's Omega-style) correlation of a field with a large mean is ~1."""
    rng = np.random.default_rng(21)
    f = rng.standard_normal((50, 1, 8, 8)) + 20.0
    a = _auto(to_xp, f)
    assert np.all(a > 0.99)


def test_constant_over_space_gives_one_everywhere(to_xp):
    rng = np.random.default_rng(22)
    amp = rng.standard_normal((7, 3, 1, 1))
    f = np.broadcast_to(amp, (7, 3, 6, 9)).copy()
    for centered in (False, True):
        a = _auto(to_xp, f, 6, centered=centered)
        np.testing.assert_allclose(a, 1.0, rtol=1e-12)
        assert _summary(to_xp, a) == pytest.approx(1.0, rel=1e-12)


def test_checkerboard_gives_alternating_sign(to_xp):
    """f_t = (-1)^(t1+t2) a_n: correlation (-1)^(d1+d2) exactly (signed output)."""
    amp = np.random.default_rng(23).standard_normal((5, 1, 1, 1))
    t = np.add.outer(np.arange(5), np.arange(7))
    f = amp * ((-1.0) ** t)[None, None]
    a = _auto(to_xp, f, 3)
    d = np.add.outer(np.arange(-3, 4), np.arange(-3, 4))
    np.testing.assert_allclose(a[0], (-1.0) ** d, rtol=1e-12)
    assert _summary(to_xp, a) == pytest.approx(1.0)


# --------------------------------------------------------------------------- (d) cross-map

def _mixed_maps(rng, mixing, n, mean=None):
    """(n, C) samples x = z A^T (+ mean): correlation D^-1/2 A A^T D^-1/2 with D = diag(A A^T)."""
    x = rng.standard_normal((n, mixing.shape[1])) @ mixing.T
    return x if mean is None else x + mean


def _theory_corr(mixing):
    cov = mixing @ mixing.T
    s = np.sqrt(np.diag(cov))
    return cov / np.outer(s, s)


def test_cross_map_recovers_known_matrix_at_chosen_location(to_xp):
    """std of a sample correlation is (1 - rho^2)/sqrt(N) <= 1/sqrt(N); tolerance 5/sqrt(N)
    (worst over 200 seeds: 3.7/sqrt(N))."""
    rng = np.random.default_rng(30)
    n, h, w = 10_000, 5, 4
    a_centre = np.array([[1.0, 0.0, 0.0, 0.0],
                         [0.8, 0.6, 0.0, 0.0],
                         [-0.5, 0.2, 2.0, 0.0],          # unequal scales: normalisation matters
                         [0.0, 0.0, 0.3, 0.1]])
    a_other = np.array([[1.0, 0.0, 0.0, 0.0],
                        [-0.9, 0.3, 0.0, 0.0],
                        [0.0, 0.0, 1.0, 0.0],
                        [0.0, 0.0, 0.0, 5.0]])
    f = rng.standard_normal((n, 4, h, w))              # independent maps elsewhere
    f[:, :, h // 2, w // 2] = _mixed_maps(rng, a_centre, n)
    f[:, :, 1, 3] = _mixed_maps(rng, a_other, n)
    tol = N_SIGMA / math.sqrt(n)
    np.testing.assert_allclose(_cross(to_xp, f), _theory_corr(a_centre), atol=tol)
    np.testing.assert_allclose(_cross(to_xp, f, (1, 3)), _theory_corr(a_other), atol=tol)
    np.testing.assert_allclose(_cross(to_xp, f, (0, 0)), np.eye(4), atol=tol)


def test_cross_map_centered_removes_mean(to_xp):
    rng = np.random.default_rng(31)
    n = 10_000
    mixing = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, -0.7, 0.7]])
    x = _mixed_maps(rng, mixing, n, mean=np.array([4.0, -3.0, 2.0]))
    f = x[:, :, None, None]
    tol = N_SIGMA / math.sqrt(n)
    np.testing.assert_allclose(_cross(to_xp, f, centered=True), _theory_corr(mixing),
                               atol=tol)
    # Uncentred: dominated by the means, E[x x^T] normalised (checked against the twin only).
    uncentred = _cross(to_xp, f)
    np.testing.assert_allclose(uncentred, slow_cross_map(f, None), atol=1e-12)
    assert abs(uncentred[0, 1] - _theory_corr(mixing)[0, 1]) > 0.1


# --------------------------------------------------------------------------- (e) degenerate

@pytest.mark.filterwarnings("error")
def test_zero_map_gives_nan_without_warnings(to_xp):
    rng = np.random.default_rng(40)
    f = rng.standard_normal((10, 3, 6, 6))
    f[:, 1] = 0.0
    a = _auto(to_xp, f, 3)
    assert np.all(np.isnan(a[1]))
    assert np.all(np.isfinite(a[[0, 2]]))
    # The summary leaves NaN maps out.
    assert _summary(to_xp, a) == pytest.approx(_summary(to_xp, a[[0, 2]]))
    c = _cross(to_xp, f)
    assert np.all(np.isnan(c[1])) and np.all(np.isnan(c[:, 1]))
    assert np.all(np.isfinite(c[np.ix_([0, 2], [0, 2])]))
    # All maps degenerate -> NaN summary; a 1 x 1 panel has no off-centre offset -> NaN.
    assert math.isnan(_summary(to_xp, a[[1]]))
    assert math.isnan(_summary(to_xp, _auto(to_xp, f, 0)))


@pytest.mark.filterwarnings("error")
def test_constant_map_is_degenerate_only_when_centred(to_xp):
    f = np.full((4, 1, 5, 5), 2.5)
    np.testing.assert_array_equal(_auto(to_xp, f), np.ones((1, 9, 9)))
    assert np.all(np.isnan(_auto(to_xp, f, centered=True)))
    assert np.isnan(_cross(to_xp, f, centered=True)[0, 0])
    assert _cross(to_xp, f)[0, 0] == 1.0


def test_map_zero_at_the_location_only(to_xp):
    f = np.random.default_rng(41).standard_normal((8, 2, 3, 3))
    f[:, 0, 1, 1] = 0.0
    c = _cross(to_xp, f)                         # default location (1, 1)
    assert np.isnan(c[0, 0]) and np.isnan(c[0, 1]) and c[1, 1] == 1.0
    assert np.all(np.isfinite(_cross(to_xp, f, (0, 0))))


# --------------------------------------------------------------------------- (f) bad inputs

GOOD = np.zeros((2, 2, 4, 4)) + 1.0


def _moved(to_xp, value):
    """Arrays go to the --xp module; lists (the non-array inputs under test) stay lists."""
    return to_xp(value) if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("func", [spatial_autocorrelation, cross_map_correlation])
@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((2, 4, 4)), ValueError, r"field must have rank 4.*got rank 3"),
    (np.ones((1, 2, 2, 4, 4)), ValueError, r"field must have rank 4.*got rank 5"),
    (np.ones((0, 2, 4, 4)), ValueError, r"field must have every dimension >= 1"),
    (np.ones((2, 2, 4, 4), dtype=np.int64), TypeError, r"field must have a real floating dtype"),
    (np.ones((2, 2, 4, 4), dtype=np.complex128), TypeError, r"real floating dtype.*complex"),
    ([[[[1.0]]]], TypeError, r"field must be an array"),
])
def test_bad_field(to_xp, func, bad, exc, match):
    with pytest.raises(exc, match=match):
        func(_moved(to_xp, bad))


@pytest.mark.parametrize("bad, exc", [
    (-1, ValueError), (2.0, TypeError), (2.5, TypeError), (True, TypeError), ("3", TypeError),
    (None, TypeError),
])
def test_bad_max_offset(to_xp, bad, exc):
    with pytest.raises(exc, match=r"max_offset must be a non-negative int; got"):
        spatial_autocorrelation(to_xp(GOOD), bad)


def test_numpy_integer_max_offset_accepted(to_xp):
    assert spatial_autocorrelation(to_xp(GOOD), np.int64(2)).shape == (2, 5, 5)


@pytest.mark.parametrize("bad", [(4, 0), (0, 4), (-1, 0), (1,), (1, 2, 3), 3, (1.0, 2),
                                 (True, 0), "ab"])
def test_bad_location(to_xp, bad):
    with pytest.raises(ValueError, match=r"location"):
        cross_map_correlation(to_xp(GOOD), bad)


@pytest.mark.parametrize("func", [spatial_autocorrelation, cross_map_correlation])
def test_bad_centered(to_xp, func):
    with pytest.raises(TypeError, match=r"centered must be True or False"):
        func(to_xp(GOOD), centered=1)


@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((2, 2, 3, 3)), ValueError, r"autocorr must have rank 3"),
    (np.ones(5), ValueError, r"autocorr must have rank 3"),
    (np.ones((2, 4, 5)), ValueError, r"odd panel sizes.*\(2, 4, 5\)"),
    (np.ones((0, 3, 3)), ValueError, r"C >= 1"),
    ([1.0], TypeError, r"autocorr must be an array"),
])
def test_bad_autocorr(to_xp, bad, exc, match):
    with pytest.raises(exc, match=match):
        mean_offcentre_correlation(_moved(to_xp, bad))


def test_summary_accepts_single_map_panel(to_xp):
    a = _auto(to_xp, np.random.default_rng(50).standard_normal((4, 2, 5, 5)), 2)
    assert _summary(to_xp, a[0]) == pytest.approx(
        float(np.abs(np.delete(a[0].ravel(), 12)).mean()))


# --------------------------------------------------------------------------- the --xp module
def test_matches_numpy_on_the_module_under_test(to_xp, xp):
    """Autocorrelation, cross-map and summary on the --xp module (CuPy under --xp cupy)
    stay in it and equal the NumPy results, a dead map (NaN) included."""
    from kfc_ref.backend import get_xp
    rng = np.random.default_rng(60)
    f = box_filtered_noise(rng, 30, 3, 9, 11, 2, 3)
    f[:, 2] = 0.0
    g = to_xp(f)
    for centered in (False, True):
        a = spatial_autocorrelation(g, 4, centered=centered)
        assert get_xp(a) is xp
        np.testing.assert_allclose(to_numpy(a), spatial_autocorrelation(f, 4, centered=centered),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)
        c = cross_map_correlation(g, (2, 3), centered=centered)
        assert get_xp(c) is xp
        np.testing.assert_allclose(to_numpy(c), cross_map_correlation(f, (2, 3), centered=centered),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)
    m = mean_offcentre_correlation(spatial_autocorrelation(g, 4))
    assert get_xp(m) is xp
    assert float(m) == pytest.approx(float(mean_offcentre_correlation(
        spatial_autocorrelation(f, 4))), rel=1e-12)
