"""K-FAC with KFC blocks (Appendix B.2; K-FAC App. D-H, Martens & Grosse 2015).

Per iteration k (1, 2, ...) on the mini-batch S' = (x, y) (B.2; K-FAC's rules where B.2 defers)::

    grad h       backprop with the true labels; h = mean loss + (r/2)||theta||^2
    factors      moving averages (eps = min(1 - 1/k, 0.95)) of Omega, Gamma from targets sampled
                 from the model on a random tau_1 = 1/8 of S'
    eigen        eigendecompositions of every Omega, Gamma at k <= 3 and every T_3 = 20
    gammas       {gamma, omega_2 gamma, gamma / omega_2} when k = 0 mod T_2 = 20, else {gamma}
    for each:    Delta = -(F_hat + gamma I)^-1 grad h, exactly per block (Eqs. 33-38)
                 (alpha, mu) minimising M(alpha Delta + mu delta_0) (Eq. 30 with r -> r + lambda;
                 the 2 x 2 solve of K-FAC App. F, exact F on a random tau_2 = 1/4 of S'; the 1-D
                 formula while delta_0 = 0)
    keep         the gamma whose step has the smallest M(delta)
    k = 0 mod T_1 = 5: rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0)) (Eq. 31, cheap:
                 M(delta) - M(0) = 1/2 grad^T delta at the optimum) and the Levenberg-Marquardt
                 rule (Eq. 32) lambda <- omega_1 lambda (rho > 3/4) or lambda / omega_1 (rho < 1/4)
    theta <- theta + delta;  delta_0 <- delta;  theta_bar <- xi theta_bar + (1 - xi) theta

**Damping convention (B.2 mixes two conventions for gamma).**  B.2 damps exactly,
F_hat + gamma I, but suggests gamma = sqrt(lambda + r) and "never smaller", which is K-FAC's
*factored* convention, where each factor gets a multiple of gamma and the product gains about
gamma^2 I.  Default here, ``damping_convention="sqrt"``: gamma keeps K-FAC's square-root scale
(initial sqrt(lambda_0 + r), floor sqrt(lambda + r), adapted multiplicatively by omega_2) and the
exact damped block is F_hat + gamma^2 I, so the floor means "F_hat is damped at least as strongly
as the quadratic model M is (lambda + r)".  ``damping_convention="literal"`` uses F_hat + gamma I
with the same gamma, as printed.
"""
from __future__ import annotations

import copy
import math

import numpy as _host_np  # host-side 2 x 2 solves only

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.curvature.damping import EigenFactors, eigen_factors
from kfc_ref.curvature.fvp import fisher_gram_from_jvps, output_jvp
from kfc_ref.optim.kronecker import EMA_MAX_DECAY, KroneckerOptimizerMixin
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.optim.base import (
    Optimizer, check_fraction, check_period, check_positive, compact, expand, inner,
    loss_and_decayed_gradient, subset_indices, take,
)

#: lambda_0, the initial Levenberg-Marquardt damping of K-FAC (App. E.5; problem dependent).
INITIAL_LAMBDA = 150.0
#: T_1, period of the lambda adaptation, and omega_1 = (19/20)^T_1 (K-FAC App. E.5).
LM_PERIOD = 5
OMEGA1 = (19 / 20) ** 5
#: T_2, period of the greedy gamma adaptation, and omega_2 = (sqrt(19/20))^T_2 (App. E.6).
GAMMA_PERIOD = 20
OMEGA2 = (19 / 20) ** 10
#: T_3, period of the eigendecompositions (also refreshed at every k <= 3; App. G).
INVERSE_PERIOD = 20
#: tau_1, fraction of the mini-batch for the factor statistics (App. G).
STATS_FRACTION = 1 / 8
#: tau_2, fraction of the mini-batch for the exact-F products of the quadratic model (App. G).
CURVATURE_FRACTION = 1 / 4
#: K-FAC's iterate averaging xi = 0.99 (K-FAC section 7), as a timescale tau = -1/ln(0.99).
AVERAGING_TAU = -1.0 / math.log(0.99)
DAMPING_CONVENTIONS = ("sqrt", "literal")


def levenberg_marquardt(lam: float, rho, omega1: float = OMEGA1) -> float:
    """Eq. 32: lambda * omega_1 if rho > 3/4, lambda / omega_1 if rho < 1/4 (or rho is NaN),
    else lambda."""
    if rho > 0.75:
        return lam * omega1
    if not rho >= 0.25:
        return lam / omega1
    return lam


def solve_quadratic_model(C, d):
    """Minimise q(c) = d^T c + 1/2 c^T C c over c (host arrays, C (R, R) symmetric PSD).

    Directions with C[r, r] = 0 (e.g. delta_0 = 0 at the first step) get c_r = 0; when the
    remaining system is numerically singular (parallel directions) only the first direction is
    used (the 1-D formula alpha = -d_0 / C_00).  Returns (c, q(c)); at the optimum
    q = 1/2 d^T c, the "cheap" M(delta) - M(0) of K-FAC App. E.5.
    """
    C = _host_np.asarray(C, dtype=_host_np.float64)
    d = _host_np.asarray(d, dtype=_host_np.float64)
    c = _host_np.zeros_like(d)
    active = [r for r in range(len(d)) if C[r, r] > 0]
    if len(active) > 1:
        sub = C[_host_np.ix_(active, active)]
        scale = _host_np.sqrt(_host_np.diag(sub))
        corr = sub / _host_np.outer(scale, scale)
        if _host_np.linalg.cond(corr) > 1e12:          # parallel directions: keep the first
            active = active[:1]
    if active:
        sub = C[_host_np.ix_(active, active)]
        c[active] = -_host_np.linalg.solve(sub, d[active])
    return c, float(0.5 * d @ c)


def quadratic_model_step(logits, grads, directions, jvps, total_damping: float):
    """The best step sum_r c_r u_r in span(directions) for the model (Eq. 30, r -> r + lambda)

        M(delta) - h = grad^T delta + 1/2 delta^T (F + (lambda + r) I) delta,

    with exact F from the forward-mode products ``jvps`` = J u_r (N, C) on the examples whose
    ``logits`` are given.  grads, directions: compact lists.  Returns (c, M(delta) - h).
    """
    gram = to_numpy(fisher_gram_from_jvps(logits, jvps)).astype(_host_np.float64)
    r = len(directions)
    dots = _host_np.array([[inner(directions[a], directions[b]) for b in range(r)]
                           for a in range(r)])
    d = _host_np.array([inner(grads, u) for u in directions])
    C = gram + total_damping * dots
    for a in range(r):                     # a zero direction has no curvature at all
        if dots[a, a] == 0:
            C[a, :] = C[:, a] = 0.0
    return solve_quadratic_model(C, d)


class KFAC(KroneckerOptimizerMixin, Optimizer):
    """K-FAC with KFC blocks (App. B.2).  State fields (plain; see kfc_ref.optim.base): k, theta_bar,
    factors, stats_count, inverses (compact list of eigendecompositions {"d_Omega", "Q_Omega",
    "d_Gamma", "Q_Gamma"}), lambda, gamma, delta (the previous update delta_0, compact), rho.

    ``damping`` is the initial gamma (default sqrt(initial_lambda + r)); with ``gamma_floor``
    every candidate is raised to at least sqrt(lambda + r).  ``use_momentum=False`` drops
    delta_0 (only alpha is solved for).  K-FAC requires T_2 to be a multiple of T_3 because its
    factored damping needs new inverses for every gamma; the eigendecompositions here do not
    depend on gamma, so any ``gamma_period`` works.  info: loss, lambda, gamma, alpha, mu,
    model_change (M(delta) - h), rho (None when not computed), inverses_updated.
    """

    name = "kfac"

    def __init__(self, initial_lambda: float = INITIAL_LAMBDA, damping: float | None = None,
                 damping_convention: str = "sqrt", gamma_floor: bool = True,
                 use_momentum: bool = True, lm_period: int = LM_PERIOD, omega1: float = OMEGA1,
                 gamma_period: int = GAMMA_PERIOD, omega2: float = OMEGA2,
                 inverse_period: int = INVERSE_PERIOD, stats_period: int = 1,
                 stats_fraction: float = STATS_FRACTION,
                 curvature_fraction: float = CURVATURE_FRACTION,
                 ema_max_decay: float = EMA_MAX_DECAY, averaging_tau: float | None = AVERAGING_TAU,
                 **common):
        super().__init__(averaging_tau=averaging_tau, **common)
        self.initial_lambda = check_positive("initial_lambda", initial_lambda)
        self.damping = None if damping is None else check_positive("damping", damping)
        if damping_convention not in DAMPING_CONVENTIONS:
            raise ValueError(f"damping_convention={damping_convention!r} is not supported; use "
                             f"one of {DAMPING_CONVENTIONS}")
        self.damping_convention = damping_convention
        self.gamma_floor = bool(gamma_floor)
        self.use_momentum = bool(use_momentum)
        self.lm_period = check_period("lm_period", lm_period)
        self.gamma_period = check_period("gamma_period", gamma_period)
        self.inverse_period = check_period("inverse_period", inverse_period)
        self.stats_period = check_period("stats_period", stats_period)
        for name, val in (("omega1", omega1), ("omega2", omega2)):
            if not (isinstance(val, float) and 0 < val < 1):
                raise ValueError(f"{name}={val!r} is not allowed; expected a float in (0, 1)")
        self.omega1, self.omega2 = omega1, omega2
        self.stats_fraction = check_fraction("stats_fraction", stats_fraction)
        self.curvature_fraction = check_fraction("curvature_fraction", curvature_fraction)
        self.ema_max_decay = check_fraction("ema_max_decay", ema_max_decay)

    # ------------------------------------------------------------------ pieces
    def _init_extra(self, net, params):
        gamma = (self.damping if self.damping is not None
                 else math.sqrt(self.initial_lambda + self.weight_decay))
        return {"factors": None, "stats_count": 0, "inverses": None,
                "lambda": self.initial_lambda, "gamma": gamma, "rho": None,
                "delta": [get_xp(w).zeros_like(w) for w in compact(net, params)]}

    def _refresh_inverses(self, state):
        state["inverses"] = [dict(vars(eigen_factors(f["Omega"], f["Gamma"])))
                             for f in state["factors"]]

    def exact_damping(self, gamma: float) -> float:
        """The multiple of I added to F_hat: gamma^2 ('sqrt' convention) or gamma ('literal')."""
        return gamma * gamma if self.damping_convention == "sqrt" else gamma

    def natural_direction(self, state, grads, gamma: float) -> list:
        """Delta = -(F_hat + damping I)^-1 grad h, block by block (Eqs. 36-38)."""
        damping = self.exact_damping(gamma)
        return [-EigenFactors(**e).apply(g, damping) for g, e in zip(grads, state["inverses"])]

    def gamma_candidates(self, state) -> list:
        """{gamma} or {gamma, omega_2 gamma, gamma / omega_2} (k = 0 mod T_2), floored."""
        gamma, k = state["gamma"], state["k"]
        cands = [gamma]
        if k % self.gamma_period == 0:
            cands += [self.omega2 * gamma, gamma / self.omega2]
        if self.gamma_floor:
            floor = math.sqrt(state["lambda"] + self.weight_decay)
            cands = [max(c, floor) for c in cands]
        return list(dict.fromkeys(cands))

    # ------------------------------------------------------------------ the iteration
    def _update(self, state, net, params, x, y, rng):
        k, r = state["k"], self.weight_decay
        rho_rng = copy.deepcopy(rng) if k % self.lm_period == 0 else None  # same dropout masks
        loss, g, tape = loss_and_decayed_gradient(net, params, x, y, r, rng)
        ws = compact(net, params)
        h0 = loss + 0.5 * r * inner(ws, ws)
        if state["factors"] is None or k % self.stats_period == 0:
            self._refresh_factors(state, net, params, x, rng, tape=tape)
        del tape
        inverses_updated = (state["inverses"] is None or k % self.inverse_period == 0
                            or k <= 3)
        if inverses_updated:
            self._refresh_inverses(state)

        sub_tape = net.forward(params, take(x, subset_indices(x.shape[0],
                                                              self.curvature_fraction, rng)))
        delta0 = state["delta"]
        with_momentum = self.use_momentum and inner(delta0, delta0) > 0
        jd0 = output_jvp(net, params, sub_tape, expand(net, delta0)) if with_momentum else None
        total = state["lambda"] + r
        best = None
        for gamma in self.gamma_candidates(state):
            Delta = self.natural_direction(state, g, gamma)
            jD = output_jvp(net, params, sub_tape, expand(net, Delta))
            dirs, jvps = ([Delta, delta0], [jD, jd0]) if with_momentum else ([Delta], [jD])
            c, change = quadratic_model_step(sub_tape.output, g, dirs, jvps, total)
            if best is None or change < best[0]:
                best = (change, gamma, Delta, c)
        del sub_tape
        change, gamma, Delta, c = best
        alpha, mu = float(c[0]), (float(c[1]) if with_momentum else 0.0)
        delta = [alpha * D + mu * d0 for D, d0 in zip(Delta, delta0)]
        new_ws = [w + dl for w, dl in zip(ws, delta)]

        rho = None
        if rho_rng is not None and change < 0:
            tape1 = net.forward(expand(net, new_ws), x, train=True, rng=rho_rng)
            loss1, _ = softmax_cross_entropy(tape1.output, y)
            h1 = float(loss1) + 0.5 * r * inner(new_ws, new_ws)
            rho = (h1 - h0) / change
            state["lambda"] = levenberg_marquardt(state["lambda"], rho, self.omega1)
        state.update(gamma=float(gamma), delta=delta, rho=rho)
        info = {"loss": loss, "lambda": state["lambda"], "gamma": state["gamma"],
                "alpha": alpha, "mu": mu, "model_change": change, "rho": rho,
                "inverses_updated": inverses_updated}
        return new_ws, state, info
