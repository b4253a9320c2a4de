"""Kronecker-factor state shared by KFC-pre and K-FAC: estimating Omega and Gamma from targets
sampled from the model (Theorem 2, Eq. 23), their moving average (K-FAC App. D, [I] for KFC;
the one implementation is :func:`kfc_ref.curvature.factors.moving_average`) and Algorithm 1's
initialisation from several mini-batches."""
from __future__ import annotations

import dataclasses
import math

from kfc_ref.curvature.factors import (
    KroneckerFactors, moving_average, moving_average_decay, network_factors,
)
from kfc_ref.backend import get_xp
from kfc_ref.optim.base import ArgumentError, subset_indices, take
from kfc_ref.optim.data_parallel import STATISTICS_STREAM, TARGETS_STREAM, BatchShard

#: Upper limit of the moving-average decay eps = min(1 - 1/k, EMA_MAX_DECAY) (K-FAC App. D).
EMA_MAX_DECAY = 0.95


def _num_locations(net, layer_index: int) -> int:
    """|T| of a parametric layer from the network's shapes (no cache needed): the spatial size
    of its output (1 for a dense layer)."""
    return math.prod(net.shapes[layer_index + 1][1:])


def estimate_factors(net, params, x, rng, fraction: float = 1.0, tape=None,
                     shard: BatchShard | None = None) -> list[KroneckerFactors]:
    """Omega, Gamma of every parametric layer (Theorem 2, Eq. 23) from targets sampled from the
    model (compact list of KroneckerFactors), over the global mini-batch ``x`` (N, ...).

    fraction = 1: all N examples, reusing ``tape`` (the gradient's forward pass over this
    rank's rows) when given, so the extra cost is one backward pass.  fraction < 1: a random
    ceil(fraction N)-subset of the N rows (drawn from ``rng``) gets its own forward (training
    mode) and backward pass.  Each rank estimates on its rows (or its part of the subset) and
    the ranks sum the shares (tag "factors"; :mod:`kfc_ref.optim.data_parallel`).  Targets and
    dropout masks are keyed by example through ``shard`` (default: one process, with the key
    drawn from ``rng``).
    """
    shard = BatchShard.of(None, x.shape[0], rng) if shard is None else shard
    idx = subset_indices(shard.n, fraction, rng)
    if idx is None:
        xl = shard.local(x)
        tape = net.forward(params, xl, check=False) if tape is None else tape
        count, total = shard.hi - shard.lo, shard.n
        records = net.sampled_records(params, xl, shard.random(TARGETS_STREAM), tape=tape)
    else:
        positions, rows = shard.part_of(idx)
        count, total = len(rows), len(idx)
        records = None
        if count:
            sub = take(shard.local(x), positions)
            keyed = shard.random(STATISTICS_STREAM, rows)
            sub_tape = net.forward(params, sub, train=True, rng=keyed, check=False)
            records = net.sampled_records(params, sub, keyed, tape=sub_tape)
    xp = get_xp(*[params[i] for i in net.param_layers])
    dtype = params[net.param_layers[0]].dtype       # every rank sums in the parameters' dtype
    if records is not None:
        local = [KroneckerFactors(f.Omega.astype(dtype, copy=False),
                                  f.Gamma.astype(dtype, copy=False), f.num_locations)
                 for f in network_factors(records)]
    else:                                  # none of the subset is mine: a zero contribution
        local = [KroneckerFactors(xp.zeros((params[i].shape[1],) * 2, dtype=dtype),
                                  xp.zeros((params[i].shape[0],) * 2, dtype=dtype),
                                  _num_locations(net, i)) for i in net.param_layers]
    summed = shard.sum_of_means([a for f in local for a in (f.Omega, f.Gamma)], count, total,
                                "factors")
    return [KroneckerFactors(summed[2 * j], summed[2 * j + 1], f.num_locations)
            for j, f in enumerate(local)]


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

    def _refresh_factors(self, state, net, params, x, rng, shard, tape=None):
        new = estimate_factors(net, params, x, rng, self.stats_fraction, tape=tape, shard=shard)
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
            shard = BatchShard.of(self.comm, x.shape[0], rng)
            state.factors = average_in(state.factors,
                                       estimate_factors(net, params, x, rng, shard=shard),
                                       state.stats_count, max_decay=1.0)
        if state.factors is None:
            raise ArgumentError("batches is empty; initialize_factors needs at least one batch")
        self._refresh_inverses(state)
        return state
