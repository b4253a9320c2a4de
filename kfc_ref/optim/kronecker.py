"""Kronecker-factor state shared by KFC-pre and K-FAC: estimating Omega and Gamma from targets
sampled from the model (Theorem 2, Eq. 23), their moving average (K-FAC App. D, [I] for KFC;
the one implementation is :func:`kfc_ref.curvature.factors.moving_average`) and Algorithm 1's
initialisation from several mini-batches."""
from __future__ import annotations

import dataclasses

from kfc_ref.curvature.factors import (
    KroneckerFactors, moving_average, moving_average_decay, network_factors,
)
from kfc_ref.optim.base import ArgumentError, subset_indices, take

#: Upper limit of the moving-average decay eps = min(1 - 1/k, EMA_MAX_DECAY) (K-FAC App. D).
EMA_MAX_DECAY = 0.95


def estimate_factors(net, params, x, rng, fraction: float = 1.0,
                     tape=None) -> list[KroneckerFactors]:
    """Omega, Gamma of every parametric layer (Theorem 2, Eq. 23) from targets sampled from the
    model (compact list of KroneckerFactors).

    fraction = 1: all N examples, reusing ``tape`` (the gradient's forward pass) when given, so
    the extra cost is one backward pass.  fraction < 1: a random ceil(fraction N)-subset gets
    its own forward (training mode) and backward pass.
    """
    idx = subset_indices(x.shape[0], fraction, rng)
    if idx is None:
        if tape is None:
            tape = net.forward(params, x, check=False)
        records = net.sampled_records(params, x, rng, tape=tape)
    else:
        sub = take(x, idx)
        sub_tape = net.forward(params, sub, train=True, rng=rng, check=False)
        records = net.sampled_records(params, sub, rng, tape=sub_tape)
    return network_factors(records)


def average_in(old: list | None, new: list, count: int, max_decay: float) -> list:
    """Layer by layer ``moving_average(old, new, eps)`` with eps = min(1 - 1/count, max_decay);
    ``count`` is the number of estimates in the average after this one (1 -> ``new``)."""
    eps = moving_average_decay(count, max_decay)
    if old is None:
        return new
    return [moving_average(o, n, eps) for o, n in zip(old, new)]


class KroneckerOptimizerMixin:
    """Factor state shared by KFC-pre and K-FAC (:class:`~kfc_ref.optim.state.KroneckerState`:
    ``factors`` and ``stats_count``).  Subclasses define ``_refresh_inverses(state)``."""

    def _refresh_factors(self, state, net, params, x, rng, tape=None):
        new = estimate_factors(net, params, x, rng, self.stats_fraction, tape=tape)
        state.stats_count += 1
        state.factors = average_in(state.factors, new, state.stats_count, self.ema_max_decay)

    def initialize_factors(self, state, net, params, batches, rng):
        """Algorithm 1's initial factors: the equally weighted mean of the estimates on
        ``batches`` (an iterable of (x, y) or x; labels are not used) with all of each batch
        (the moving average with decay 1 - 1/count), then fresh inverses.  Returns a new
        state."""
        self._check_state(state)
        state = dataclasses.replace(state, factors=None, stats_count=0)
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            state.stats_count += 1
            state.factors = average_in(state.factors, estimate_factors(net, params, x, rng),
                                       state.stats_count, max_decay=1.0)
        if state.factors is None:
            raise ArgumentError("batches is empty; initialize_factors needs at least one batch")
        self._refresh_inverses(state)
        return state
