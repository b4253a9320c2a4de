"""KFC-pre: KFC as a preconditioner for SGD with momentum (Appendix B.1, Algorithm 1).

Per iteration k (1, 2, ...), on the mini-batch (x, y) of N examples::

    grad h        backprop with the true labels, plus lambda theta (weight decay)
    k = 0 mod T_s refresh the factors {Omega_l, Gamma_l} (Theorem 2, Eq. 23) as exponential
                  moving averages, from targets sampled from the model (Section 3.1)
    k = 0 mod T_f recompute the damped inverses (Eq. 21, pi from Eq. 8, strength
                  sqrt(lambda + gamma))
    v  = -lr [F_hat^(gamma)]^-1 grad h      (Eq. 22, Gamma_d^-1 G Omega_d^-1 per layer)
    nu = v^T F v + lambda v^T v             (exact F on a random quarter of the mini-batch,
                                             kfc_ref.curvature.fvp; Algorithm 1's form of nu)
    if nu > C: v <- v sqrt(C / nu)          (update clipping, C = 0.3)
    p  <- mu p + v;  theta <- theta + p;  theta_bar <- xi theta_bar + (1 - xi) theta

Factor initialisation: Algorithm 1 estimates the factors on the whole training set before the
first step; :meth:`KFCPre.initialize_factors` does this from ``factor_init_batches``
mini-batches (an equally weighted mean of their estimates).  With 0, the factors come from the
first mini-batch.

Moving-average decay (the paper gives none; we take K-FAC App. D's rule):
eps = min(1 - 1/k, 0.95), where here k counts the mini-batch *estimates* averaged so far (the
initialisation batches included), so that the average starts as a plain mean and the initial
full-data estimate is not thrown away by the first refresh.  With T_s = 1 and no initialisation
it is K-FAC's rule exactly.

Update clipping, momentum and the learning rate (measured).  Algorithm 1 clips the *new* step:
nu(v) <= C, then p <- mu p + v.  Nothing bounds nu(p), the step that actually moves theta: with
mu = 0.9 up to ~1/(1 - mu) = 10 clipped steps can add up, so nu(p) can reach ~100 C.  On
mnist5k (small net, batch 128, gamma = 1e-3, no weight decay, 300 iterations;
``python -m kfc_ref train --optimizer kfc-pre --data mnist5k --lr 0.01 --iters 300 --out DIR``)
Algorithm 1 as printed (``clip_scope="update"``, the default) diverges at lr 0.01 (loss
explodes at iteration 159 with seed 0, 120 with seed 1) and at lr 0.03 (iteration 82); the
clip fired at 80-90% of the log points, and the last good checkpoints hold a momentum sum with
nu(p) = 1.9 (lr 0.01, iteration 150) and 573 (lr 0.03, iteration 75) against C = 0.3.
Algorithm 1's own factor initialisation on the full training set (31 batches instead of 5)
does not help (lr 0.01: diverges at iteration 153).  Clipping the momentum sum instead,
``clip_scope="step"`` (nu(p) <= C for p = mu p + v; in a run: ``train.TrainConfig(...,
optimizer_options={"clip_scope": "step"})``), trains stably at both rates over seeds 0 and 1:
final training loss (of theta_bar) 0.0116 / 0.0089 at lr 0.01 and 0.0147 / 0.0158 at lr 0.03
(test error 3.4-4.5%), with nu(p) = 0.07 at the end (lr 0.01, seed 0).  For scale, at lr
0.003 (``train.DEFAULT_LR``, seed 0) Algorithm 1 ends at 0.0077 (test error 2.7%) and
``clip_scope="step"`` at 0.00018 (test error 3.0%).  So the blow-up is inherent to Algorithm 1
at these rates on this problem (the paper reports that clipping fired only early in training;
here nu(v) stays >> C throughout), not a slip in our transcription.  The default stays the
paper's; ``clip_scope="step"`` removes the instability, and the larger rates it allows do not
beat lr 0.003 here (one dataset, one or two seeds: not enough to change the default).

Defaults for the three cost knobs (App. B.3 says: choose them by profiling so that the per-epoch
time stays below 2x SGD; the paper does not report its values) are the named constants below;
``python -m kfc_ref bench optim`` measures the overhead they give.
"""
from __future__ import annotations

from kfc_ref.backend import get_xp
from kfc_ref.curvature.damping import factored_inverses
from kfc_ref.curvature.fvp import fisher_quadratic
from kfc_ref.optim.data_parallel import BatchShard, round_robin
from kfc_ref.optim.kronecker import EMA_MAX_DECAY, KroneckerOptimizerMixin
from kfc_ref.optim.base import (
    DEFAULT_MOMENTUM, Optimizer, check_bool, check_choice, check_fraction, check_int,
    check_momentum, check_period, check_positive, compact, expand, inner,
    loss_and_decayed_gradient, subset_indices, take,
)
from kfc_ref.optim.state import KFCPreState

#: T_s, the factor-statistics refresh period in iterations.  On the CIFAR-10 net at batch 512 a
#: refresh (STATS_FRACTION = 1/4) costs ~0.25 SGD iterations on a CPU, so T_s = 5 adds ~5%; with
#: the moving average's eps = 0.95 the factors then average ~20 refreshes = ~100 iterations,
#: about one epoch (App. B.3: stale statistics cost little per-epoch progress).
STATS_PERIOD = 5
#: T_f, the damped-inverse refresh period in iterations.  Inverting the CIFAR-10 net's factors
#: (two 801 x 801 and one 1025 x 1025 Omega, small Gamma) costs ~0.2 SGD iterations on a CPU;
#: every 10th iteration adds ~2%, and the inverses lag the factors by at most 2 refreshes.
INVERSE_PERIOD = 10
#: Fraction of the mini-batch whose model-sampled statistics refresh the factors (K-FAC's
#: tau_1 is 1/8; KFC-pre's is not reported).  Below 1 the subset gets its own forward and
#: backward pass: at 1/4 a refresh measured 0.65 s against 2.96 s for the whole batch reusing
#: the gradient's tape (one full backward pass plus Gram matrices over all N|T| rows).
STATS_FRACTION = 0.25
#: Fraction of the mini-batch on which the exact-Fisher nu for update clipping is estimated
#: (the paper's "1/4 of the examples in the current mini-batch", App. B.1).
NU_FRACTION = 0.25
#: Update-clipping threshold C on nu = v^T F v + lambda v^T v (Algorithm 1).
CLIP_THRESHOLD = 0.3
#: Damping gamma of Algorithm 1 ("10^-3, may need tuning").
DAMPING = 1e-3
#: What update clipping bounds: "update", Algorithm 1's new step v before the momentum sum (the
#: paper), or "step", the momentum sum p = mu p + v that moves theta (see the module doc).
CLIP_SCOPES = ("update", "step")
#: Mini-batches whose estimates initialise the factors before the first step: our stand-in for
#: Algorithm 1's "estimate the factors on the full dataset" (5 x 128 examples on mnist5k).
FACTOR_INIT_BATCHES = 5


class KFCPre(KroneckerOptimizerMixin, Optimizer):
    """Algorithm 1 (App. B.1).  State (:class:`~kfc_ref.optim.state.KFCPreState`): k,
    theta_bar, velocity p, factors (KroneckerFactors per layer, None before the first
    estimate), stats_count, inverses (FactoredInverse per layer: Omega_inv, Gamma_inv, pi).

    ``clip=None`` switches update clipping off (and skips the nu computation);
    ``clip_scope`` says what is clipped: "update" (Algorithm 1: the new step v) or "step" (the
    momentum sum p, which keeps large learning rates stable; see the module doc).
    ``factor_init_batches``: how many mini-batches the caller passes to
    :meth:`initialize_factors` (Algorithm 1's full-data initialisation; 0: the factors come
    from the first mini-batch).
    info: loss, nu (None when not computed), clipped, pi (per layer) -- 0-d device arrays, read
    back only by whoever logs them -- and the host flags stats_updated, inverses_updated.

    Host reads (device syncs) per step: none, except one on inverse-refresh steps (the
    finiteness check of all factors before inversion, kfc_ref.curvature.damping).
    """

    name = "kfc-pre"
    state_type = KFCPreState

    def __init__(self, lr: float, momentum: float = DEFAULT_MOMENTUM, damping: float = DAMPING,
                 clip: float | None = CLIP_THRESHOLD, stats_period: int = STATS_PERIOD,
                 inverse_period: int = INVERSE_PERIOD, stats_fraction: float = STATS_FRACTION,
                 nu_fraction: float = NU_FRACTION, use_pi: bool = True,
                 ema_max_decay: float = EMA_MAX_DECAY,
                 factor_init_batches: int = FACTOR_INIT_BATCHES, clip_scope: str = "update",
                 **common):
        super().__init__(**common)
        self.lr = check_positive("lr", lr)
        self.momentum = check_momentum(momentum)
        self.damping = check_positive("damping", damping)
        self.clip = None if clip is None else check_positive("clip", clip)
        self.stats_period = check_period("stats_period", stats_period)
        self.inverse_period = check_period("inverse_period", inverse_period)
        self.stats_fraction = check_fraction("stats_fraction", stats_fraction)
        self.nu_fraction = check_fraction("nu_fraction", nu_fraction)
        self.use_pi = check_bool("use_pi", use_pi)
        self.ema_max_decay = check_fraction("ema_max_decay", ema_max_decay)
        self.factor_init_batches = check_int("factor_init_batches", factor_init_batches,
                                             minimum=0)
        self.clip_scope = check_choice("clip_scope", clip_scope, CLIP_SCOPES)

    def _init_extra(self, net, params):
        return {"velocity": [get_xp(w).zeros_like(w) for w in compact(net, params)]}

    def _refresh_inverses(self, state):
        """Eq. 21's damped inverses of every layer (``curvature.damping.factored_inverses``);
        with P ranks, layer l is inverted on rank l mod P and broadcast (tag "inverses"), after
        the same finiteness check on all.  One process counts the payload it would send."""
        state.inverses = factored_inverses(
            state.factors, self.damping, self.weight_decay, self.use_pi,
            distribute=lambda count, compute, templates: round_robin(
                count, self.comm, compute, templates, "inverses"))

    def preconditioned_gradient(self, state, grads) -> list:
        """Eq. 22 with the stored damped inverses: Gamma_d^-1 G_l Omega_d^-1 per layer."""
        return [inv.apply(g) for g, inv in zip(grads, state.inverses)]

    def update_norm(self, net, params, x, v, rng, shard: BatchShard | None = None):
        """nu = v^T F v + lambda v^T v with the exact F on a random ``nu_fraction`` of the
        global mini-batch x (App. B.1; its own forward pass, in evaluation mode: no dropout,
        fused with the forward-mode pass), as a 0-d device array; each rank on its part of the
        subset, summed over ranks (tag "nu")."""
        shard = BatchShard.of(self.comm, x.shape[0], rng) if shard is None else shard
        idx = subset_indices(shard.n, self.nu_fraction, rng)
        positions, rows = shard.part_of(idx)
        if len(rows):
            nu = fisher_quadratic(net, params, take(shard.local(x), positions), expand(net, v),
                                  check=False)          # one fused forward/forward-mode sweep
        else:                                         # none of the subset is mine
            nu = get_xp(*v).zeros((), dtype=v[0].dtype)
        (nu,) = shard.sum_of_means([nu], len(rows), shard.n if idx is None else len(idx), "nu")
        return nu + self.weight_decay * inner(v, v) if self.weight_decay else nu

    def _update(self, state, net, params, x, y, rng, shard):
        k = state.k
        loss, g, tape = loss_and_decayed_gradient(net, params, x, y, self.weight_decay, shard)
        stats_updated = state.factors is None or k % self.stats_period == 0
        if stats_updated:
            self._refresh_factors(state, net, params, x, rng, shard, tape=tape)
        del tape
        inverses_updated = state.inverses is None or k % self.inverse_period == 0
        if inverses_updated:
            self._refresh_inverses(state)
        v = [-self.lr * d for d in self.preconditioned_gradient(state, g)]
        if self.clip_scope == "step":             # clip what moves theta: p = mu p + v
            v = [self.momentum * p + vl for p, vl in zip(state.velocity, v)]
        nu = clipped = None
        if self.clip is not None:
            # Clipping decided on the device: v <- v sqrt(C / max(nu, C)), i.e. v sqrt(C / nu)
            # when nu > C and v itself (a factor of exactly 1) otherwise.
            nu = self.update_norm(net, params, x, v, rng, shard)
            xp = get_xp(nu)
            scale = xp.sqrt(self.clip / xp.maximum(nu, self.clip))
            v = [scale * vl for vl in v]
            clipped = nu > self.clip
        state.velocity = (v if self.clip_scope == "step" else
                          [self.momentum * p + vl for p, vl in zip(state.velocity, v)])
        new_ws = [w + p for w, p in zip(compact(net, params), state.velocity)]
        info = {"loss": loss, "nu": nu, "clipped": clipped,
                "pi": [inv.pi for inv in state.inverses],
                "stats_updated": stats_updated, "inverses_updated": inverses_updated}
        return new_ws, state, info
