"""Softmax cross-entropy: gradient, stability, and sampling from the predictive distribution."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfc_ref.nn.losses import (classification_error, cross_entropy, sample_targets, softmax,
                            softmax_cross_entropy)
from kfc_ref.backend import to_numpy
from finite_differences import assert_vjp_matches
from strategies import normal, seeds

# A frequency from n Bernoulli(p) draws has standard deviation sqrt(p(1-p)/n); 5 of them bound a
# fixed-seed draw with huge margin while still catching a wrong distribution (e.g. off by 0.02).
SAMPLING_SIGMAS = 5.0


@given(st.integers(1, 5), st.integers(2, 6), seeds)
def test_gradient_matches_finite_differences(to_xp, n, c, seed):
    z, y = normal(seed, n, c) * 3, np.random.default_rng(seed).integers(0, c, n)
    loss, dz = softmax_cross_entropy(to_xp(z), to_xp(y))
    np.testing.assert_allclose(float(loss), float(cross_entropy(to_xp(z), to_xp(y)).mean()),
                               rtol=1e-14)
    assert_vjp_matches(lambda q: float(softmax_cross_entropy(to_xp(q), to_xp(y))[0]), z, 1.0,
                       to_numpy(dz), seed)


def test_large_logits_are_stable(to_xp):
    z = to_xp(np.array([[1000.0, 0.0, -1000.0]]))
    loss, dz = softmax_cross_entropy(z, to_xp(np.array([0])))
    loss, dz = float(loss), to_numpy(dz)
    assert np.isfinite(loss) and loss < 1e-12 and np.all(np.isfinite(dz))


def test_sampled_frequencies_match_the_softmax(to_xp):
    n = 40_000
    z = to_xp(np.tile(np.array([[0.3, -1.0, 2.0, 0.0]]), (n, 1)))
    labels = to_numpy(sample_targets(z, np.random.default_rng(123)))
    freq = np.bincount(labels, minlength=4) / n
    p = to_numpy(softmax(z[0]))
    bound = SAMPLING_SIGMAS * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= bound), (freq, p, bound)
    again = to_numpy(sample_targets(z, np.random.default_rng(123)))
    np.testing.assert_array_equal(labels, again)       # same seed, same labels


def test_sampling_requires_a_generator_and_labels_are_checked(to_xp):
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        sample_targets(to_xp(np.zeros((2, 3))), 0)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(2,\)"):
        softmax_cross_entropy(to_xp(np.zeros((2, 3))), to_xp(np.zeros(3, dtype=int)))
    assert float(classification_error(to_xp(np.array([[1.0, 0.0], [0.0, 1.0]])),
                                      to_xp(np.array([0, 0])))) == 0.5
