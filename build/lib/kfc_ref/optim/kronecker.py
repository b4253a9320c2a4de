"""Kronecker-factor state shared by KFC-pre and K-FAC: estimating Omega and Gamma from targets
sampled from the model (Theorem 2, Eq. 23), their moving average (K-FAC App. D, [I] for KFC)
and Algorithm 1's initialisation from several mini-batches."""
from __future__ import annotations

from kfc_ref.curvature.factors import network_factors
from kfc_ref.optim.base import subset_indices, take

#: Upper limit of the moving-average decay eps = min(1 - 1/k, EMA_MAX_DECAY) (K-FAC App. D).
EMA_MAX_DECAY = 0.95


# --------------------------------------------------------------------------- factor statistics
def estimate_factors(net, params, x, rng, fraction: float = 1.0, tape=None) -> list:
    """Omega, Gamma of every parametric layer (Theorem 2, Eq. 23) from targets sampled from the
    model, as compact state entries {"Omega", "Gamma", "T"}.

    fraction = 1: all N examples, reusing ``tape`` (the gradient's forward pass) when given, so
    the extra cost is one backward pass.  fraction < 1: a random ceil(fraction N)-subset gets
    its own forward (training mode) and backward pass.
    """
    idx = subset_indices(x.shape[0], fraction, rng)
    if idx is None:
        records = net.sampled_records(params, x, rng, tape=tape)
    else:
        sub = take(x, idx)
        sub_tape = net.forward(params, sub, train=True, rng=rng)
        records = net.sampled_records(params, sub, rng, tape=sub_tape)
    return [{"Omega": f.Omega, "Gamma": f.Gamma, "T": int(f.num_locations)}
            for f in network_factors(records)]


def average_factors(old, new, count: int, max_decay: float = EMA_MAX_DECAY):
    """Moving average with eps = min(1 - 1/count, max_decay): eps old + (1 - eps) new.

    ``count`` is the number of estimates in the average after this one (count = 1 -> new).
    """
    if old is None or count <= 1:
        return new
    eps = min(1.0 - 1.0 / count, max_decay)
    return [{"Omega": eps * o["Omega"] + (1 - eps) * n["Omega"],
             "Gamma": eps * o["Gamma"] + (1 - eps) * n["Gamma"], "T": n["T"]}
            for o, n in zip(old, new)]


def mean_factors(estimates: list) -> list:
    """Equally weighted mean of several mini-batch estimates (the full-data initialisation)."""
    m = len(estimates)
    return [{"Omega": sum(e[l]["Omega"] for e in estimates) / m,
             "Gamma": sum(e[l]["Gamma"] for e in estimates) / m, "T": estimates[0][l]["T"]}
            for l in range(len(estimates[0]))]


class KroneckerOptimizerMixin:
    """Factor state shared by KFC-pre and K-FAC: fields ``factors`` (compact list or None) and
    ``stats_count`` (number of mini-batch estimates averaged in)."""

    def _refresh_factors(self, state, net, params, x, rng, tape=None):
        new = estimate_factors(net, params, x, rng, self.stats_fraction, tape=tape)
        count = int(state["stats_count"]) + 1
        state["factors"] = average_factors(state["factors"], new, count, self.ema_max_decay)
        state["stats_count"] = count

    def initialize_factors(self, state, net, params, batches, rng):
        """Algorithm 1's initial factors: the mean of the estimates on ``batches`` (an iterable
        of (x, y) or x; labels are not used) with all of each batch, then fresh inverses.
        Returns the new state."""
        estimates = []
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            estimates.append(estimate_factors(net, params, x, rng, 1.0))
        if not estimates:
            raise ValueError("batches is empty; initialize_factors needs at least one batch")
        state = dict(state)
        state["factors"] = mean_factors(estimates)
        state["stats_count"] = len(estimates)
        self._refresh_inverses(state)
        return state
