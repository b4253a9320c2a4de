"""SGD with momentum, the paper's baseline (Section 5), behind the common interface."""
from __future__ import annotations

from kfc_ref.backend import get_xp
from kfc_ref.optim.base import (
    DEFAULT_MOMENTUM, Optimizer, check_momentum, check_positive, compact,
    loss_and_decayed_gradient,
)
from kfc_ref.optim.state import SGDState


class SGD(Optimizer):
    """SGD with momentum, the paper's baseline (Section 5):

        p <- mu p - lr (grad + lambda theta),   theta <- theta + p,

    then theta_bar <- xi theta_bar + (1 - xi) theta.  State (:class:`SGDState`): k,
    theta_bar, velocity p.  No curvature: ``factor_init_batches`` = 0, and a step reads
    nothing back from the device (info: loss, a 0-d device array).
    """

    name = "sgd"
    state_type = SGDState

    def __init__(self, lr: float, momentum: float = DEFAULT_MOMENTUM, **common):
        super().__init__(**common)
        self.lr = check_positive("lr", lr)
        self.momentum = check_momentum(momentum)

    def _init_extra(self, net, params):
        return {"velocity": [get_xp(w).zeros_like(w) for w in compact(net, params)]}

    def _update(self, state, net, params, x, y, rng, shard):
        loss, g, _ = loss_and_decayed_gradient(net, params, x, y, self.weight_decay, shard)
        state.velocity = [self.momentum * p - self.lr * gl for p, gl in zip(state.velocity, g)]
        new_ws = [w + p for w, p in zip(compact(net, params), state.velocity)]
        return new_ws, state, {"loss": loss}
