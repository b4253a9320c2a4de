"""K-FAC with KFC blocks (Appendix B.2; K-FAC App. D-H, Martens & Grosse 2015).

Per iteration k (1, 2, ...) on the mini-batch S' = (x, y) (App. B.2; K-FAC App. D-G)::

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

**Damping convention (a caveat of App. B.2 as printed).**  B.2 damps exactly,
F_hat + gamma I, but suggests gamma = sqrt(lambda + r) and "never smaller", which is K-FAC's
*factored* convention, where each factor gets a multiple of gamma and the product gains about
gamma^2 I.  Default here, ``damping_convention="sqrt"``: gamma keeps K-FAC's square-root scale
(initial sqrt(lambda_0 + r), floor sqrt(lambda + r), adapted multiplicatively by omega_2) and the
exact damped block is F_hat + gamma^2 I, so the floor means "F_hat is damped at least as strongly
as the quadratic model M is (lambda + r)".  ``damping_convention="literal"`` uses F_hat + gamma I
with the same gamma, as printed.

**Factor initialisation.**  App. B.2 describes K-FAC as published (Martens & Grosse 2015, App.
D), which has no separate initialisation: the moving average starts from the first mini-batch's
estimate (eps = min(1 - 1/k, 0.95) is 0 at k = 1).  So ``factor_init_batches`` defaults to 0
here, unlike KFC-pre's Algorithm 1, which estimates the factors on the full dataset first; a
caller may still pass batches to :meth:`KFAC.initialize_factors` (or set
``factor_init_batches``) to start from a better estimate.

**Host reads (device syncs) per step.**  The (alpha, mu) solve of the 2 x 2 quadratic model and
the choice among the gamma candidates happen on the host (a tiny, ill-conditioning-prone solve
with decisions that branch): that is one read per step, inherent to the method, of *all* the
inner products at once (every candidate's Fisher Gram matrix and Euclidean inner products in
one array).  On top: one read every T_1 steps for rho (h(theta + delta) - h(theta), needed by
the Levenberg-Marquardt rule before the next step), and two on eigendecomposition steps (the
finiteness checks of the factors before and of the decompositions after).  Budget: 1 per step,
2 at k = 0 mod T_1, +2 at k <= 3 and k = 0 mod T_3.
"""
from __future__ import annotations

import math

import numpy as _host_np  # host-side 2 x 2 solves only

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.curvature.damping import eigen_decompositions
from kfc_ref.curvature.fvp import fisher_gram_from_jvps, output_jvp
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.optim.base import (
    Optimizer, check_bool, check_choice, check_fraction, check_int, check_number, check_period,
    check_positive, compact, expand, inner, inner_products, loss_and_decayed_gradient,
    subset_indices, take,
)
from kfc_ref.optim.data_parallel import GRADIENT_STREAM
from kfc_ref.optim.kronecker import EMA_MAX_DECAY, KroneckerOptimizerMixin
from kfc_ref.optim.state import KFACState

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


def model_from_products(gram, dots, d, total_damping: float):
    """Minimise M(delta) - h = d^T c + 1/2 c^T (gram + total_damping dots) c (Eq. 30 with
    r -> r + lambda) from host copies of the Fisher Gram matrix ``gram`` (R, R), the Euclidean
    inner products ``dots`` (R, R) of the directions and d_r = <grad, u_r>.  A zero direction
    (dots[r, r] = 0) has no curvature at all and gets c_r = 0.  Returns (c, M(delta) - h)."""
    gram = _host_np.asarray(gram, dtype=_host_np.float64)
    dots = _host_np.asarray(dots, dtype=_host_np.float64)
    C = gram + total_damping * dots
    for a in range(len(d)):
        if dots[a, a] == 0:
            C[a, :] = C[:, a] = 0.0
    return solve_quadratic_model(C, d)


def quadratic_model_step(logits, grads, directions, jvps, total_damping: float):
    """The best step sum_r c_r u_r in span(directions) for the model (Eq. 30, r -> r + lambda)

        M(delta) - h = grad^T delta + 1/2 delta^T (F + (lambda + r) I) delta,

    with exact F from the forward-mode products ``jvps`` = J u_r (N, C) on the examples whose
    ``logits`` are given.  grads, directions: compact lists.  All inner products are computed
    on the device and read back at once.  Returns (c, M(delta) - h).
    """
    E, F = read_products(grads, directions, logits, jvps)
    return model_from_products(F, E[1:, 1:], E[0, 1:], total_damping)


def read_products(grads, directions, logits, jvps):
    """Host copies, from one device-to-host read, of E (1 + R, 1 + R), the Euclidean inner
    products of [grads, *directions] (one fused reduction), and F (R, R), the exact-Fisher Gram
    matrix of the directions from their forward-mode products ``jvps``."""
    n = len(directions)
    xp = get_xp(logits)
    E = inner_products([grads, *directions])
    F = fisher_gram_from_jvps(logits, jvps)
    host = to_numpy(xp.concatenate([E.reshape(-1), F.reshape(-1)])).astype(_host_np.float64)
    return host[:(n + 1) ** 2].reshape(n + 1, n + 1), host[(n + 1) ** 2:].reshape(n, n)


class KFAC(KroneckerOptimizerMixin, Optimizer):
    """K-FAC with KFC blocks (App. B.2).  State (:class:`~kfc_ref.optim.state.KFACState`): k,
    theta_bar, factors, stats_count, inverses (EigenFactors per layer), lam (lambda), gamma,
    delta (the previous update delta_0, compact), rho.

    ``damping`` is the initial gamma (default sqrt(initial_lambda + r)); with ``gamma_floor``
    every candidate is raised to at least sqrt(lambda + r).  ``use_momentum=False`` drops
    delta_0 (only alpha is solved for).  K-FAC requires T_2 to be a multiple of T_3 because its
    factored damping needs new inverses for every gamma; the eigendecompositions here do not
    depend on gamma, so any ``gamma_period`` works.  ``factor_init_batches`` defaults to 0 (see
    the module doc).  info: loss (0-d device array), lambda, gamma, alpha, mu, model_change
    (M(delta) - h), rho (None when not computed), inverses_updated (host values).
    """

    name = "kfac"
    #: K-FAC's quadratic-model step choice and rho are not split over ranks here.
    data_parallel = False
    state_type = KFACState

    def __init__(self, initial_lambda: float = INITIAL_LAMBDA, damping: float | None = None,
                 damping_convention: str = "sqrt", gamma_floor: bool = True,
                 use_momentum: bool = True, lm_period: int = LM_PERIOD, omega1: float = OMEGA1,
                 gamma_period: int = GAMMA_PERIOD, omega2: float = OMEGA2,
                 inverse_period: int = INVERSE_PERIOD, stats_period: int = 1,
                 stats_fraction: float = STATS_FRACTION,
                 curvature_fraction: float = CURVATURE_FRACTION,
                 ema_max_decay: float = EMA_MAX_DECAY, averaging_tau: float | None = AVERAGING_TAU,
                 factor_init_batches: int = 0, **common):
        super().__init__(averaging_tau=averaging_tau, **common)
        self.initial_lambda = check_positive("initial_lambda", initial_lambda)
        self.damping = None if damping is None else check_positive("damping", damping)
        self.damping_convention = check_choice("damping_convention", damping_convention,
                                               DAMPING_CONVENTIONS)
        self.gamma_floor = check_bool("gamma_floor", gamma_floor)
        self.use_momentum = check_bool("use_momentum", use_momentum)
        self.lm_period = check_period("lm_period", lm_period)
        self.gamma_period = check_period("gamma_period", gamma_period)
        self.inverse_period = check_period("inverse_period", inverse_period)
        self.stats_period = check_period("stats_period", stats_period)
        self.omega1 = check_number("omega1", omega1, minimum=0.0, maximum=1.0,
                                   exclusive_minimum=True, exclusive_maximum=True)
        self.omega2 = check_number("omega2", omega2, minimum=0.0, maximum=1.0,
                                   exclusive_minimum=True, exclusive_maximum=True)
        self.stats_fraction = check_fraction("stats_fraction", stats_fraction)
        self.curvature_fraction = check_fraction("curvature_fraction", curvature_fraction)
        self.ema_max_decay = check_fraction("ema_max_decay", ema_max_decay)
        self.factor_init_batches = check_int("factor_init_batches", factor_init_batches,
                                             minimum=0)

    # ------------------------------------------------------------------ pieces
    def _init_extra(self, net, params):
        gamma = (self.damping if self.damping is not None
                 else math.sqrt(self.initial_lambda + self.weight_decay))
        return {"lam": self.initial_lambda, "gamma": gamma,
                "delta": [get_xp(w).zeros_like(w) for w in compact(net, params)]}

    def _refresh_inverses(self, state):
        state.inverses = eigen_decompositions(state.factors)

    def exact_damping(self, gamma: float) -> float:
        """The multiple of I added to F_hat: gamma^2 ('sqrt' convention) or gamma ('literal')."""
        return gamma * gamma if self.damping_convention == "sqrt" else gamma

    def natural_direction(self, state, grads, gamma: float) -> list:
        """Delta = -(F_hat + damping I)^-1 grad h, block by block (Eqs. 36-38)."""
        damping = self.exact_damping(gamma)
        return [-e.apply(g, damping) for g, e in zip(grads, state.inverses)]

    def gamma_candidates(self, state) -> list:
        """{gamma} or {gamma, omega_2 gamma, gamma / omega_2} (k = 0 mod T_2), floored."""
        cands = [state.gamma]
        if state.k % self.gamma_period == 0:
            cands += [self.omega2 * state.gamma, state.gamma / self.omega2]
        if self.gamma_floor:
            floor = math.sqrt(state.lam + self.weight_decay)
            cands = [max(c, floor) for c in cands]
        return list(dict.fromkeys(cands))

    def objective(self, loss, ws):
        """h = loss + (r/2)||theta||^2 on the device (no inner product when r = 0)."""
        return loss + 0.5 * self.weight_decay * inner(ws, ws) if self.weight_decay else loss

    def _best_step(self, state, net, params, x, g, rng):
        """Every gamma candidate's Delta, the (alpha, mu) of each from one host read of all
        inner products, and the candidate with the smallest M(delta) - h:
        (change, gamma, Delta, alpha, mu)."""
        sub_tape = net.forward(params, take(x, subset_indices(x.shape[0],
                                                              self.curvature_fraction, rng)),
                               check=False)
        gammas = self.gamma_candidates(state)
        dirs = [self.natural_direction(state, g, gamma) for gamma in gammas]
        if self.use_momentum:
            dirs.append(state.delta)              # a zero delta_0 (k = 1) gets mu = 0
        jvps = [output_jvp(net, params, sub_tape, expand(net, u)) for u in dirs]
        E, F = read_products(g, dirs, sub_tape.output, jvps)          # the one host read
        del sub_tape, jvps
        n = len(dirs)
        total = state.lam + self.weight_decay
        best = None
        for i, gamma in enumerate(gammas):
            idx = [i, n - 1] if self.use_momentum else [i]
            c, change = model_from_products(F[_host_np.ix_(idx, idx)],
                                            E[1:, 1:][_host_np.ix_(idx, idx)],
                                            E[0, [j + 1 for j in idx]], total)
            if best is None or change < best[0]:
                best = (change, gamma, dirs[i], float(c[0]),
                        float(c[1]) if self.use_momentum else 0.0)
        return best

    # ------------------------------------------------------------------ the iteration
    def _update(self, state, net, params, x, y, rng, shard):
        k = state.k
        loss, g, tape = loss_and_decayed_gradient(net, params, x, y, self.weight_decay, shard)
        ws = compact(net, params)
        if state.factors is None or k % self.stats_period == 0:
            self._refresh_factors(state, net, params, x, rng, shard, tape=tape)
        del tape
        inverses_updated = state.inverses is None or k % self.inverse_period == 0 or k <= 3
        if inverses_updated:
            self._refresh_inverses(state)
        change, gamma, Delta, alpha, mu = self._best_step(state, net, params, x, g, rng)
        delta = [alpha * D + mu * d0 for D, d0 in zip(Delta, state.delta)]
        new_ws = [w + dl for w, dl in zip(ws, delta)]

        rho = None
        if k % self.lm_period == 0 and change < 0:      # the gradient pass's dropout masks:
            tape1 = net.forward(expand(net, new_ws), x, train=True,
                                rng=shard.random(GRADIENT_STREAM), check=False)
            loss1, _ = softmax_cross_entropy(tape1.output, y)
            rise = self.objective(loss1, new_ws) - self.objective(loss, ws)
            rho = float(rise) / change                        # the rho host read
            state.lam = levenberg_marquardt(state.lam, rho, self.omega1)
        state.gamma, state.delta, state.rho = float(gamma), delta, rho
        info = {"loss": loss, "lambda": state.lam, "gamma": state.gamma, "alpha": alpha,
                "mu": mu, "model_change": change, "rho": rho,
                "inverses_updated": inverses_updated}
        return new_ws, state, info
