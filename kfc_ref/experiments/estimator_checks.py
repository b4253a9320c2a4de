"""Checks of the *estimators* against their exact expectations, with stated power
(registered in :mod:`kfc_ref.experiments.checks`, run by ``python -m kfc_ref check``).

* ``fisher.mc_unbiased``: the Monte-Carlo Fisher F_k (``curvature.fisher.monte_carlo_fisher``,
  k targets per example sampled from the model, Section 3.1) has E[F_k] = F (Eq. 3).  A z-test
  on the scalar tr(F_k), whose exact mean tr(F) and exact variance are computed by enumerating
  the C classes.  k is chosen per case so that the test rejects the biased sampler
  softmax(z / 0.8) with probability >= :data:`TARGET_POWER` (normal approximation), and
  ``control.mc_biased_sampler`` runs that sampler and must be rejected.
* ``estimators.omega_exact``: the optimizers' Omega (``optim.kronecker.estimate_factors``, Eq. 23
  via ``curvature.factors``) does not depend on the sampled targets, so it must equal
  (1/N) sum_n [[A_n]]_H^T [[A_n]]_H (Theorem 2) built from [[A]]_H directly, to round-off.
* ``estimators.gamma_unbiased``: the mean of M estimates of Gamma (one sampled target per
  example each) against its exact expectation, scaled by the exact Monte-Carlo standard error.
  The expectation sum_n sum_c p_nc DS_nc^T DS_nc / (N |T|) is built here by enumerating the
  classes; it equals ``curvature.fisher.expected_gamma`` (tests pin that), which is not used
  directly because it shares ``factors.gamma_from_derivative_matrix`` with the estimator, so
  a wrong convention there would cancel out.
* Negative controls: Gamma without its 1/|T| (``control.gamma_without_1_over_T``) and Omega
  divided by |T| (``control.omega_divided_by_T``) must fail these checks.
"""
from __future__ import annotations

import dataclasses

import math

import numpy as _host_np  # host-side random cases and float64 statistics

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.curvature.fisher import class_records, monte_carlo_fisher, per_example_gradients
from kfc_ref.experiments.checks import measured, register
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.optim.kronecker import estimate_factors

#: Two-sided critical value of the Fisher z-test: for an unbiased estimator |z| exceeds it with
#: probability 2 (1 - Phi(4)) = 6.3e-5 per run (normal approximation of tr F_k, a mean of N k
#: independent bounded terms, N k >= 1024 here).
Z_CRIT = 4.0
#: The temperature of the biased sampler softmax(z / T) the test must detect.
BIASED_TEMPERATURE = 0.8
#: Probability of rejecting the biased sampler that k is chosen for; z_{0.999} = 3.09.
TARGET_POWER = 0.999
Z_POWER = 3.090232306167813
#: Bounds on k (targets per example): at least 64 for the normal approximation, at most 4096
#: for the run time (the achieved power is reported in the detail).
MIN_SAMPLES, MAX_SAMPLES = 64, 4096
#: Scale of the output layer's initial weights: sharper predictions (logit spread ~3) make
#: softmax(z / 0.8) differ from softmax(z) as they do in a trained net.
LOGIT_SCALE = 4.0


def _on(xp, a, dtype):
    return xp.asarray(_host_np.asarray(a, dtype=dtype))


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


# --------------------------------------------------------------------------- Monte-Carlo Fisher
def _fisher_case(rng, dtype, xp):
    net = Sequential([Conv2d(1, 2, 3, padding=1), Tanh(), Flatten(), Dense(32, 3)], (1, 4, 4))
    params = net.init(rng, dtype)
    params[-1] = params[-1] * LOGIT_SCALE
    params = [None if p is None else xp.asarray(p) for p in params]
    x = _on(xp, rng.normal(size=(16, 1, 4, 4)), dtype)
    return net, params, x


def _trace_terms(net, params, x):
    """Host float64 (N, C): ||g_{n,c}||^2, the squared per-example gradient norm for target c,
    and the logits (N, C)."""
    logits = to_numpy(net.forward(params, x).output).astype(_host_np.float64)
    n, c = logits.shape
    sq = _host_np.empty((n, c))
    xp = get_xp(x)
    for k in range(c):
        g = _host(per_example_gradients(net, params, x, xp.full((n,), k, dtype=xp.int64)))
        sq[:, k] = (g * g).sum(axis=1)
    return sq, logits


def _moments(sq, probs):
    """Mean and per-draw variance of ||g_{n,y}||^2 with y ~ probs, averaged over n: tr of the
    sampler's expected Fisher, and the variance of one draw per example (mean over n)."""
    m = (probs * sq).sum(axis=1)
    v = (probs * sq * sq).sum(axis=1) - m * m
    return m.mean(), v.mean()


def _softmax_host(z, temperature=1.0):
    z = z / temperature
    e = _host_np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fisher_test_setup(net, params, x):
    """(sq, logits, k, power): k targets per example chosen for the stated power against the
    biased sampler, and the power achieved at that k (normal approximation)."""
    sq, logits = _trace_terms(net, params, x)
    n = sq.shape[0]
    mu_p, v_p = _moments(sq, _softmax_host(logits))
    mu_q, v_q = _moments(sq, _softmax_host(logits, BIASED_TEMPERATURE))
    bias = abs(mu_q - mu_p)
    need = ((Z_CRIT * math.sqrt(v_p) + Z_POWER * math.sqrt(v_q)) / max(bias, 1e-300)) ** 2 / n
    k = int(min(MAX_SAMPLES, max(MIN_SAMPLES, math.ceil(need))))
    shift, sd_p, sd_q = bias * math.sqrt(n * k), math.sqrt(v_p), math.sqrt(v_q)
    power = _phi((shift - Z_CRIT * sd_p) / sd_q) + _phi((-shift - Z_CRIT * sd_p) / sd_q)
    return sq, logits, k, power, mu_p, v_p


def sampled_trace(sq, probs, k: int, rng) -> float:
    """tr of a Monte-Carlo Fisher whose k targets per example are drawn from ``probs`` (N, C):
    the mean of ||g_{n,y}||^2 over the N k draws (``sq`` from the class enumeration)."""
    n, c = probs.shape
    y = (probs.cumsum(axis=1)[:, None, :] < rng.random((n, k, 1))).sum(axis=2)
    y = _host_np.minimum(y, c - 1)
    return float(sq[_host_np.arange(n)[:, None], y].mean())


def _z(trace_estimate, mu_p, v_p, n, k):
    return (trace_estimate - mu_p) / math.sqrt(v_p / (n * k))


@register("fisher.mc_unbiased", "E[F_k] = F for the Monte-Carlo Fisher (Sec. 3.1): |z| of "
          "tr(F_k) against its exact mean and variance (class enumeration); k chosen so the test "
          "rejects the biased sampler softmax(z/0.8) with power >= 0.999; false alarm 6e-5")
def check_mc_unbiased(rng, dtype, xp):
    net, params, x = _fisher_case(rng, dtype, xp)
    _, _, k, power, mu_p, v_p = _fisher_test_setup(net, params, x)
    F_k = to_numpy(monte_carlo_fisher(net, params, x, k, rng)).astype(_host_np.float64)
    z = _z(float(_host_np.trace(F_k)), mu_p, v_p, x.shape[0], k)
    return measured("fisher.mc_unbiased", abs(z), {"float64": Z_CRIT, "float32": Z_CRIT}, dtype,
                    f"z={z:.2f}, k={k} per example, power vs softmax(z/0.8) {power:.4f}")


@register("control.mc_biased_sampler", "negative control: the same z-test on targets drawn "
          "from softmax(z/0.8) instead of softmax(z) must reject (|z| >= 4)")
def check_mc_biased(rng, dtype, xp):
    net, params, x = _fisher_case(rng, dtype, xp)
    sq, logits, k, power, mu_p, v_p = _fisher_test_setup(net, params, x)
    n = sq.shape[0]
    trace = sampled_trace(sq, _softmax_host(logits, BIASED_TEMPERATURE), k, rng)
    z = _z(trace, mu_p, v_p, n, k)
    return measured("control.mc_biased_sampler", abs(z), {"float64": Z_CRIT, "float32": Z_CRIT},
                    dtype, f"z={z:.2f}, k={k}, stated power {power:.4f}", expect="above")


# --------------------------------------------------------------------------- Omega and Gamma
#: Omega from estimate_factors vs the explicit [[A]]_H Gram: sums of <= ~100 O(1) products.
OMEGA_TOL = {"float64": 1e-12, "float32": 1e-5}
#: Gamma: ||mean of M estimates - E||_F / sqrt(tr Sigma / M) with the exact covariance trace.
#: M ||.||^2 / tr Sigma is (approximately) a sum of chi^2_1 variables with weights summing to 1,
#: whose tail beyond 25 is at most that of one chi^2_1: P <= 5.7e-7 per layer.
Z_GAMMA = {"float64": 5.0, "float32": 5.0}
GAMMA_DRAWS = 200


def _estimator_case(rng, dtype, xp):
    """Two tanh convs (|T| = 16 and 4) and a dense softmax layer (|T| = 1), N = 6."""
    net = Sequential([Conv2d(2, 3, 3, padding=1), Tanh(), Conv2d(3, 2, 3, stride=2, padding=1),
                      Tanh(), Flatten(), Dense(8, 3)], (2, 4, 4))
    params = net.init(rng, dtype)
    params[-1] = params[-1] * LOGIT_SCALE
    params = [None if p is None else xp.asarray(p) for p in params]
    return net, params, _on(xp, rng.normal(size=(6, 2, 4, 4)), dtype)


def _host(a):
    return to_numpy(a).astype(_host_np.float64)


def omega_error(net, params, x, rng, mutate=None) -> float:
    """max over layers of ||Omega_est - Omega_exact||_F / ||Omega_exact||_F, Omega_exact =
    (1/N) sum_n [[A_n]]_H^T [[A_n]]_H from the records' A_H; ``mutate`` edits each estimate."""
    tape = net.forward(params, x)
    exact = [_host_np.einsum("ntk,ntl->kl", _host(r.A_H), _host(r.A_H)) / x.shape[0]
             for r in net.records(tape, {})]
    err = 0.0
    for f, ref in zip(estimate_factors(net, params, x, rng), exact):
        om = _host((mutate or (lambda e: e))(f).Omega)
        err = max(err, float(_host_np.linalg.norm(om - ref) / _host_np.linalg.norm(ref)))
    return err


def gamma_z(net, params, x, rng, draws: int = GAMMA_DRAWS, mutate=None) -> float:
    """max over layers of ||mean of ``draws`` Gamma estimates - E[Gamma]||_F / sqrt(tr Sigma /
    draws), with E[Gamma] = expected_gamma and tr Sigma = sum_n (sum_c p_nc ||X_nc||^2 -
    ||sum_c p_nc X_nc||^2), X_nc = DS_nc^T DS_nc / (N |T|) the contribution of example n with
    target c (both exact, by enumerating the classes)."""
    p, per_class = class_records(net, params, x)
    p = _host(p)
    n = p.shape[0]
    sums = None
    for _ in range(draws):
        est = [_host((mutate or (lambda e: e))(f).Gamma)
               for f in estimate_factors(net, params, x, rng)]
        sums = est if sums is None else [s + e for s, e in zip(sums, est)]
    worst = 0.0
    for layer, total in enumerate(sums):
        ds = _host_np.stack([_host(rec[layer].DS) for rec in per_class])      # (C, N, T, I)
        t = ds.shape[2]
        X = _host_np.einsum("cnti,cntj->cnij", ds, ds) / (n * t)              # (C, N, I, I)
        mean_x = _host_np.einsum("nc,cnij->nij", p, X)
        expected = mean_x.sum(axis=0)                                         # E[Gamma]
        tr_sigma = float((_host_np.einsum("nc,cnij->n", p, X * X)
                          - (mean_x * mean_x).sum(axis=(1, 2))).sum())
        err = _host_np.linalg.norm(total / draws - expected)
        worst = max(worst, float(err / math.sqrt(max(tr_sigma, 1e-300) / draws)))
    return worst


def _gamma_times_t(f):
    return dataclasses.replace(f, Gamma=f.Gamma * f.num_locations)


def _omega_over_t(f):
    return dataclasses.replace(f, Omega=f.Omega / f.num_locations)


def _estimator_check(name, statistic, tol, mutate=None, expect="below", detail=""):
    """A check ``(rng, dtype, xp) -> CheckResult`` measuring ``statistic(net, params, x, rng,
    mutate=mutate)`` on a fresh :func:`_estimator_case`."""
    def check(rng, dtype, xp):
        net, params, x = _estimator_case(rng, dtype, xp)
        return measured(name, statistic(net, params, x, rng, mutate=mutate), tol, dtype,
                        detail, expect)
    return check


register("estimators.omega_exact", "the optimizers' Omega (estimate_factors, Eq. 23) equals "
         "(1/N) sum_n [[A_n]]_H^T [[A_n]]_H built from [[A]]_H, every layer (no sampling)")(
    _estimator_check("estimators.omega_exact", omega_error, OMEGA_TOL))
register("estimators.gamma_unbiased", "the optimizers' Gamma (estimate_factors, one sampled "
         "target per example) averages to E[Gamma] (class enumeration, = expected_gamma): "
         "||mean of 200 - E|| in units of its exact standard error, max over layers (false "
         "alarm < 2e-6)")(
    _estimator_check("estimators.gamma_unbiased", gamma_z, Z_GAMMA,
                     detail=f"{GAMMA_DRAWS} draws, convs with |T| = 16, 4 and a dense layer"))
register("control.gamma_without_1_over_T", "negative control: Gamma without its 1/|T| (times "
         "|T|) must fail estimators.gamma_unbiased")(
    _estimator_check("control.gamma_without_1_over_T", gamma_z, Z_GAMMA, _gamma_times_t,
                     "above"))
register("control.omega_divided_by_T", "negative control: Omega divided by |T| must fail "
         "estimators.omega_exact")(
    _estimator_check("control.omega_divided_by_T", omega_error, OMEGA_TOL, _omega_over_t,
                     "above"))
