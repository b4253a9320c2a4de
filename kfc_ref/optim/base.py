"""The optimizer interface with explicit state, parameter averaging and the shared pieces.

Every optimizer (``sgd.SGD``, ``kfc_pre.KFCPre`` for App. B.1, ``kfac.KFAC`` for
App. B.2) is a set of hyperparameters plus two pure-ish functions::

    state = opt.init_state(net, params)
    params, state, info = opt.step(state, net, params, (x, y), rng)

* ``params`` is the list aligned with ``net.layers`` (W_bar matrices, None for parameter-free
  layers); ``step`` returns new arrays and a new state, and never modifies its inputs.
* ``state`` is the optimizer's dataclass (:mod:`kfc_ref.optim.state`: ``SGDState``,
  ``KFCPreState``, ``KFACState``); ``state.to_arrays()`` / :func:`state_from_numpy` store and
  restore it exactly (``np.load(..., allow_pickle=False)``), and a restored state gives the
  identical next step.
* ``rng`` (a numpy Generator) is the only source of randomness (dropout masks, targets sampled
  from the model, random subsets of the mini-batch).  The caller keeps it, and checkpoints its
  ``bit_generator.state`` next to the optimizer state.
* ``info`` is a dict for the metrics log.  Values computed on the device (``loss``, the mean
  cross-entropy of the mini-batch at the parameters before the step; KFC-pre's ``nu``...) stay
  0-d device arrays, so a step need not wait for the device: whoever logs converts them, at log
  points only, with :func:`info_to_host`.  Host decisions (refresh flags, K-FAC's lambda and
  gamma) are Python values.
* ``factor_init_batches``: how many mini-batches the caller should pass to
  :meth:`Optimizer.initialize_factors` before the first step (0: none are needed, build none).

Weight decay ``weight_decay`` (the paper's lambda, B.2's r) is the l2 term (lambda/2)||theta||^2
of the objective h, applied to every entry of W_bar (biases included: the paper does not say,
and the Tikhonov view of App. B.1/B.2 treats all parameters alike).

Parameter averaging (App. B.1; Section 5.2): theta_bar <- xi theta_bar + (1 - xi) theta with
xi = exp(-1/tau), tau in iterations.  By default tau = 50,000 examples / N (one CIFAR-10 epoch,
the paper's timescale), recomputed from each mini-batch size N; ``averaging_tau`` fixes tau in
iterations instead (0 turns averaging off: theta_bar = theta).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as _host_np  # host-side subset indices and info conversion only

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.comm import LocalComm
from kfc_ref.nn.losses import check_labels, softmax_cross_entropy
from kfc_ref.optim.data_parallel import GRADIENT_STREAM, BatchShard
from kfc_ref.optim.state import OptimizerState, state_from_numpy, state_to_numpy  # noqa: F401
from kfc_ref.validate import (  # noqa: F401  (re-exported for the optimizers)
    ArgumentError, check_bool, check_choice, check_fraction, check_generator, check_int,
    check_number, check_positive,
)

#: Parameter-averaging timescale of the paper, in training examples (Section 5.2).
AVERAGING_EXAMPLES = 50_000
#: SGD momentum used for both SGD and KFC-pre in the paper (Section 5, Algorithm 1).
DEFAULT_MOMENTUM = 0.9


def check_momentum(value) -> float:
    """Momentum mu in [0, 1)."""
    return check_number("momentum", value, minimum=0.0, maximum=1.0, exclusive_maximum=True)


def check_period(name: str, value) -> int:
    """An iteration period: an integer >= 1."""
    return check_int(name, value, minimum=1)


# --------------------------------------------------------------------------- parameter lists
def compact(net, params) -> list:
    """The W_bar matrices of the parametric layers, in flat-vector order."""
    return [params[i] for i in net.param_layers]


def expand(net, compact_list) -> list:
    """A list aligned with ``net.layers`` (None for parameter-free layers) from a compact one."""
    out = [None] * len(net.layers)
    for i, w in zip(net.param_layers, compact_list):
        out[i] = w
    return out


def inner(us, vs):
    """sum_l <u_l, v_l> over two compact lists, as a 0-d array on their device (no host read)."""
    xp = get_xp(*us, *vs)
    return xp.sum(xp.stack([xp.sum(u * v) for u, v in zip(us, vs)]))


def inner_products(vectors: list):
    """The R x R matrix of all sum_l <a_l, b_l> between R compact lists ``vectors``, as one
    device array: per layer one stacked (R, size) matrix and one product, summed over layers,
    instead of R^2 separate reductions (and no host read)."""
    xp = get_xp(*[w for v in vectors for w in v])
    total = None
    for layer in zip(*vectors):
        S = xp.stack([w.reshape(-1) for w in layer])
        G = S @ xp.transpose(S)
        total = G if total is None else total + G
    return total


def host_value(value):
    """A logged quantity as a Python value: device arrays and NumPy scalars read back (0-d ->
    number or bool, others -> nested lists), lists element by element, Python values kept.
    Each array is one device-to-host read: call it at log points only."""
    if isinstance(value, (list, tuple)):
        return [host_value(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        host = to_numpy(value)
        return host.item() if host.shape == () else host.tolist()
    return value


def info_to_host(info: dict) -> dict:
    """``info`` with every entry read back by :func:`host_value` (for logging)."""
    return {k: host_value(v) for k, v in info.items()}


def subset_indices(n: int, fraction: float, rng):
    """Sorted host indices of a random ceil(fraction * n)-subset of range(n) (None = all)."""
    if fraction >= 1.0:
        return None
    size = max(1, math.ceil(fraction * n))
    return _host_np.sort(rng.choice(n, size=size, replace=False))


def take(x, indices):
    """x[indices] in the namespace of x (x itself when indices is None)."""
    if indices is None:
        return x
    return x[get_xp(x).asarray(indices)]


def check_batch(net, batch):
    """(x, y) from ``batch`` after host-side checks: inputs (N, ...) with N >= 1 and integer
    labels (N,) (their range is checked on host arrays by ``nn.losses.check_labels``; no device
    read: finiteness of the data is checked once on the host data, not per step)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ArgumentError("batch must be a pair (x, y) of inputs (N, ...) and labels (N,)")
    x, y = batch
    if tuple(getattr(x, "shape", ())[1:]) != tuple(net.input_shape):
        raise ArgumentError(f"batch inputs must have shape (N, "
                            f"{', '.join(map(str, net.input_shape))}), got "
                            f"{getattr(x, 'shape', None)}")
    check_labels(y, x.shape[0], name="batch labels")     # also refuses N = 0
    return x, y


def loss_and_decayed_gradient(net, params, x, y, weight_decay: float, shard: BatchShard):
    """Mean cross-entropy over the global mini-batch (a 0-d device array), compact gradient of
    h = loss + (lambda/2)||theta||^2, and the tape of this rank's rows.

    Each rank runs the forward pass (training mode: dropout masks keyed by example, stream
    GRADIENT_STREAM) and the backward pass on its rows of (x, y); the loss and the gradients
    are summed over the ranks in one message (tag "gradients", see
    :mod:`kfc_ref.optim.data_parallel`).  The forward pass skips the network's per-call
    finiteness check of x, a host read (``check_batch`` checked the shapes).
    """
    xl, yl = shard.local(x), shard.local(y)
    tape = net.forward(params, xl, train=True, rng=shard.random(GRADIENT_STREAM), check=False)
    loss, dlogits = softmax_cross_entropy(tape.output, yl)
    grads, _ = net.backward(params, tape, dlogits)
    loss, *g = shard.sum_of_means([loss] + [grads[i] for i in net.param_layers],
                                  shard.hi - shard.lo, shard.n, "gradients")
    if weight_decay:
        g = [gl + weight_decay * params[i] for gl, i in zip(g, net.param_layers)]
    return loss, g, tape


# --------------------------------------------------------------------------- the interface
class Optimizer:
    """Base class: hyperparameters, parameter averaging and the state they share.

    Subclasses set ``state_type`` (their dataclass) and implement
    ``_init_extra(net, params) -> dict`` (the extra fields of a fresh state) and
    ``_update(state, net, params, x, y, rng, shard) -> (new compact params, state, info)``
    (``shard``: this rank's :class:`~kfc_ref.optim.data_parallel.BatchShard`), where
    ``state`` is already a copy they may assign fields of; the base class advances the
    iteration counter ``k`` and the average ``theta_bar``.
    """

    name = "base"
    state_type = OptimizerState
    #: Mini-batches for :meth:`initialize_factors` before the first step (0: none).
    factor_init_batches = 0
    #: Whether :meth:`set_communicator` accepts more than one rank.
    data_parallel = True

    def __init__(self, *, weight_decay: float = 0.0, averaging_tau: float | None = None,
                 averaging_examples: float = AVERAGING_EXAMPLES):
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.averaging_tau = (None if averaging_tau is None else
                              check_positive("averaging_tau", averaging_tau, allow_zero=True))
        self.averaging_examples = check_positive("averaging_examples", averaging_examples)
        self._comm = LocalComm()

    @property
    def comm(self):
        """The communicator of the data-parallel ranks (:class:`~kfc_ref.comm.LocalComm`: one
        process)."""
        return self._comm

    def set_communicator(self, comm):
        """Run data-parallel over ``comm``'s ranks (a :class:`~kfc_ref.comm.MPIComm`): every
        rank calls :meth:`step` with the same global mini-batch and works on its share
        (:mod:`kfc_ref.optim.data_parallel`).  Returns ``self``."""
        if comm.size > 1 and not self.data_parallel:
            raise ArgumentError(f"optimizer {self.name!r} has no data-parallel version here; "
                                "use sgd or kfc-pre with --distributed")
        self._comm = comm
        return self

    def hyperparameters(self) -> dict:
        """The constructor arguments, so that ``make_optimizer(opt.name,
        **opt.hyperparameters())`` rebuilds the optimizer (logs, checkpoint metadata)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def averaging_decay(self, batch_size: int) -> float:
        """xi = exp(-1/tau), tau = averaging_tau or averaging_examples / N (Algorithm 1)."""
        tau = (self.averaging_tau if self.averaging_tau is not None
               else self.averaging_examples / batch_size)
        return 0.0 if tau == 0 else math.exp(-1.0 / tau)

    def init_state(self, net, params):
        """k = 0, theta_bar = theta^(0), plus the optimizer's own fields."""
        ws = compact(net, params)
        return self.state_type(k=0, theta_bar=[get_xp(w).array(w, copy=True) for w in ws],
                               **self._init_extra(net, params))

    def _check_state(self, state):
        if not isinstance(state, self.state_type):
            raise ArgumentError(f"state is a {type(state).__name__}; {type(self).__name__} "
                                f"needs a {self.state_type.__name__} (from init_state or "
                                "state_from_numpy)")

    def step(self, state, net, params, batch, rng):
        """One iteration on the global mini-batch ``batch = (x, y)``; returns (params, new
        state, info).  Parameter averaging runs on rank 0 only (the others keep theta^(0) as
        theta_bar: evaluation and checkpoints are rank 0's)."""
        x, y = check_batch(net, batch)
        check_generator("rng", rng)
        self._check_state(state)
        state = dataclasses.replace(state, k=state.k + 1)
        shard = BatchShard.of(self.comm, x.shape[0], rng)
        new_ws, state, info = self._update(state, net, params, x, y, rng, shard)
        if self.comm.rank == 0:
            xi = self.averaging_decay(x.shape[0])
            state.theta_bar = [xi * tb + (1.0 - xi) * w
                               for tb, w in zip(state.theta_bar, new_ws)]
        info = {"k": state.k, **info}
        return expand(net, new_ws), state, info

    def initialize_factors(self, state, net, params, batches, rng):
        """Curvature initialisation before the first step (Algorithm 1); SGD has none and
        returns ``state`` unchanged.  Overridden by the Kronecker-factored optimizers."""
        return state

    def averaged_params(self, net, state) -> list:
        """theta_bar as a params list (what the paper evaluates, App. B.1)."""
        return expand(net, state.theta_bar)

    def _init_extra(self, net, params) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, state, net, params, x, y, rng, shard):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
