"""The estimator checks can fail: the stated power of the Monte-Carlo Fisher test holds in
simulation, mutating the library's Omega/Gamma conventions makes the checks fail, and the
Theorem 3 cases refuse a rank-deficient Omega."""
import numpy as np
import pytest

from kfc_ref.backend import to_numpy
from kfc_ref.curvature import factors
from kfc_ref.curvature.fisher import class_records, expected_gamma
from kfc_ref.experiments import estimator_checks as ec
from kfc_ref.experiments.checks import check_rng, run_checks
from kfc_ref.experiments.paper_checks import PreconditionError, _theorem3_case

NAMES = ["fisher.mc_unbiased", "control.mc_biased_sampler", "estimators.omega_exact",
         "estimators.gamma_unbiased", "control.gamma_without_1_over_T",
         "control.omega_divided_by_T"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_estimator_checks_pass_at_seeds_0_to_3(dtype, device):
    for seed in range(4):
        results = run_checks(seed, dtype, device, names=NAMES)
        assert all(r.passed for r in results), [(r.name, r.error, r.detail) for r in results]


def test_stated_power_and_false_alarm_rate_hold_in_simulation(xp):
    """400 replications of the trace statistic under softmax(z) and under softmax(z / 0.8) on
    the check's case: the unbiased sampler is (almost) never rejected and z ~ N(0, 1); the
    biased one is rejected at the stated power (>= 0.999, so >= 0.98 of 400 with margin).
    The case is built on the --xp module; the simulation itself is host arithmetic."""
    net, params, x = ec._fisher_case(check_rng(0, "fisher.mc_unbiased"), "float64", xp)
    sq, logits, k, power, mu_p, v_p = ec._fisher_test_setup(net, params, x)
    assert power >= ec.TARGET_POWER
    rng = np.random.default_rng(0)
    n = sq.shape[0]
    z_p = np.array([ec._z(ec.sampled_trace(sq, ec._softmax_host(logits), k, rng), mu_p, v_p,
                          n, k) for _ in range(400)])
    z_q = np.array([ec._z(ec.sampled_trace(sq, ec._softmax_host(logits, 0.8), k, rng), mu_p,
                          v_p, n, k) for _ in range(400)])
    assert np.mean(np.abs(z_p) > ec.Z_CRIT) <= 0.005
    assert abs(z_p.mean()) < 0.2 and 0.8 < z_p.var() < 1.25
    assert np.mean(np.abs(z_q) > ec.Z_CRIT) >= 0.98


def test_library_trace_matches_the_class_enumeration(xp):
    """The checked function's tr(F_k) has the enumerated mean: average of 20 z-scores ~ 0."""
    rng = np.random.default_rng(5)
    net, params, x = ec._fisher_case(rng, "float64", xp)
    _, _, _, _, mu_p, v_p = ec._fisher_test_setup(net, params, x)
    from kfc_ref.curvature.fisher import monte_carlo_fisher
    zs = [ec._z(np.trace(to_numpy(monte_carlo_fisher(net, params, x, 64, rng))), mu_p, v_p,
                16, 64)
          for _ in range(20)]
    assert abs(np.mean(zs)) < 4 / np.sqrt(20)


def test_independent_expectation_equals_expected_gamma(xp):
    net, params, x = ec._estimator_case(np.random.default_rng(1), "float64", xp)
    d_p, per_class = class_records(net, params, x)
    p = to_numpy(d_p)
    for layer in range(len(per_class[0])):
        d_ds = xp.stack([rec[layer].DS for rec in per_class])
        ds = to_numpy(d_ds)
        n, t = ds.shape[1], ds.shape[2]
        independent = np.einsum("nc,cnti,cntj->ij", p, ds, ds) / (n * t)
        np.testing.assert_allclose(to_numpy(expected_gamma(d_p, d_ds)), independent,
                                   rtol=1e-12, atol=1e-15)


def test_mutated_library_conventions_fail_the_checks(monkeypatch, device):
    """The estimators' own formulas (those the optimizers use) with a convention broken."""
    original_gamma = factors.gamma_from_derivative_matrix
    original_omega = factors.omega_from_moments
    monkeypatch.setattr(factors, "gamma_from_derivative_matrix",          # no 1/|T|
                        lambda D, scale, n: original_gamma(D, scale, n) * (D.shape[1] // n))
    res = run_checks(0, "float64", device, names=["estimators.gamma_unbiased"])[0]
    assert not res.passed and res.error > 50
    monkeypatch.setattr(factors, "gamma_from_derivative_matrix", original_gamma)
    monkeypatch.setattr(factors, "omega_from_moments",
                        lambda sums, gram, n, t: original_omega(sums, gram, n, t) / t)
    res = run_checks(0, "float64", device, names=["estimators.omega_exact"])[0]
    assert not res.passed and res.error > 0.5


def test_theorem3_cases_refuse_a_rank_deficient_omega(xp):
    with pytest.raises(PreconditionError, match="full-rank Omega.*layer 0.*rank"):
        _theorem3_case(np.random.default_rng(0), "float64", xp, padded=False, n=1)
    _theorem3_case(np.random.default_rng(0), "float64", xp, padded=False)   # default N: fine
