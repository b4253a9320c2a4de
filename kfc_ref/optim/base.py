"""The optimizer interface with explicit state, parameter averaging and state serialisation.

Every optimizer (``sgd.SGD``, ``kfc_pre.KFCPre`` for App. B.1, ``kfac.KFAC`` for
App. B.2) is a set of hyperparameters plus two pure-ish functions::

    state = opt.init_state(net, params)
    params, state, info = opt.step(state, net, params, (x, y), rng)

* ``params`` is the list aligned with ``net.layers`` (W_bar matrices, None for parameter-free
  layers); ``step`` returns new arrays and never modifies its inputs.
* ``state`` is a plain structure -- dicts, lists, arrays, Python numbers, None -- so a
  checkpoint stores it exactly with :func:`state_to_numpy` and restores it with
  :func:`state_from_numpy`; a restored state gives the identical next step.  Per-layer lists in
  the state are *compact*: one entry per parametric layer, in flat-vector order.
* ``rng`` (a numpy Generator) is the only source of randomness (dropout masks, targets sampled
  from the model, random subsets of the mini-batch).  The caller keeps it, and checkpoints its
  ``bit_generator.state`` next to the optimizer state.
* ``info`` is a dict of host scalars for the metrics log; every optimizer reports ``loss``
  (the mean cross-entropy of the mini-batch at the parameters before the step).

Weight decay ``weight_decay`` (the paper's lambda, B.2's r) is the l2 term (lambda/2)||theta||^2
of the objective h, applied to every entry of W_bar (biases included: the paper does not say,
and the Tikhonov view of App. B.1/B.2 treats all parameters alike).

Parameter averaging (App. B.1; Section 5.2): theta_bar <- xi theta_bar + (1 - xi) theta with
xi = exp(-1/tau), tau in iterations.  By default tau = 50,000 examples / N (one CIFAR-10 epoch,
the paper's timescale), recomputed from each mini-batch size N; ``averaging_tau`` fixes tau in
iterations instead (0 turns averaging off: theta_bar = theta).
"""
from __future__ import annotations

import json
import math

import numpy as _host_np  # host-side state conversion only

from kfc_ref.backend import get_xp, to_device, to_numpy
from kfc_ref.nn.losses import check_labels
from kfc_ref.validate import (  # noqa: F401  (re-exported for the optimizers)
    check_fraction, check_int, check_number, check_positive,
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


def inner(us, vs) -> float:
    """sum_l <u_l, v_l> over two compact lists (a host float)."""
    total = 0.0
    for u, v in zip(us, vs):
        total += float(get_xp(u, v).sum(u * v))
    return total


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
    """A pair (x, y): inputs (N, ...) with N >= 1 and integer labels (N,) (the range is
    checked by the loss, ``nn.losses.check_labels``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (x, y) of inputs (N, ...) and labels (N,)")
    x, y = batch
    check_labels(y, getattr(x, "shape", (0,))[0], name="batch labels")
    return x, y


def loss_and_decayed_gradient(net, params, x, y, weight_decay: float, rng):
    """Mean cross-entropy, compact gradient of h = loss + (lambda/2)||theta||^2, and the tape.

    The forward pass runs in training mode (dropout masks from ``rng``).
    """
    loss, grads, tape = net.loss_and_grads(params, x, y, train=True, rng=rng)
    g = [grads[i] + weight_decay * params[i] if weight_decay else grads[i]
         for i in net.param_layers]
    return float(loss), g, tape


# --------------------------------------------------------------------------- the interface
class Optimizer:
    """Base class: hyperparameters, parameter averaging and the state layout they share.

    Subclasses implement ``_init_extra(net, params) -> dict`` and
    ``_update(state, net, params, x, y, rng) -> (new compact params, new state, info)``; the
    base class advances the iteration counter ``k`` and the average ``theta_bar``.
    """

    name = "base"

    def __init__(self, *, weight_decay: float = 0.0, averaging_tau: float | None = None,
                 averaging_examples: float = AVERAGING_EXAMPLES):
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.averaging_tau = (None if averaging_tau is None else
                              check_positive("averaging_tau", averaging_tau, allow_zero=True))
        self.averaging_examples = check_positive("averaging_examples", averaging_examples)

    def hyperparameters(self) -> dict:
        """The constructor arguments, so that ``make_optimizer(opt.name,
        **opt.hyperparameters())`` rebuilds the optimizer (logs, checkpoint metadata)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def averaging_decay(self, batch_size: int) -> float:
        """xi = exp(-1/tau), tau = averaging_tau or averaging_examples / N (Algorithm 1)."""
        tau = (self.averaging_tau if self.averaging_tau is not None
               else self.averaging_examples / batch_size)
        return 0.0 if tau == 0 else math.exp(-1.0 / tau)

    def init_state(self, net, params) -> dict:
        """k = 0, theta_bar = theta^(0), plus the optimizer's own fields."""
        ws = compact(net, params)
        state = {"k": 0, "theta_bar": [get_xp(w).array(w, copy=True) for w in ws]}
        state.update(self._init_extra(net, params))
        return state

    def step(self, state, net, params, batch, rng):
        """One iteration on ``batch = (x, y)``; returns (params, state, info)."""
        x, y = check_batch(net, batch)
        if not isinstance(rng, _host_np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        state = dict(state)
        state["k"] = int(state["k"]) + 1
        new_ws, state, info = self._update(state, net, params, x, y, rng)
        xi = self.averaging_decay(x.shape[0])
        state["theta_bar"] = [xi * tb + (1.0 - xi) * w
                              for tb, w in zip(state["theta_bar"], new_ws)]
        info = {"k": state["k"], **info}
        return expand(net, new_ws), state, info

    def initialize_factors(self, state, net, params, batches, rng) -> dict:
        """Curvature initialisation before the first step (Algorithm 1); SGD has none and
        returns ``state`` unchanged.  Overridden by the Kronecker-factored optimizers."""
        return state

    def averaged_params(self, net, state) -> list:
        """theta_bar as a params list (what the paper evaluates, App. B.1)."""
        return expand(net, state["theta_bar"])

    def _init_extra(self, net, params) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, state, net, params, x, y, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- checkpoints
_ARRAY_KEY = "__array__"
TREEDEF_KEY = "__treedef__"


def state_to_numpy(state) -> dict:
    """A flat ``{name: numpy array}`` dict holding ``state`` exactly (``np.savez``-able).

    Arrays (NumPy or CuPy) become host arrays under path-like names ("factors/0/Omega");
    the structure and every Python scalar go, as JSON, into the string array ``__treedef__``
    (JSON floats round-trip exactly).  Allowed leaves: arrays, int, float, bool, str, None.
    """
    arrays: dict = {}

    def encode(node, path):
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str) or "/" in key:
                    raise ValueError(f"state key {key!r} at {path or '/'} must be a str "
                                     "without '/'")
            return {"dict": {k: encode(v, f"{path}/{k}") for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return {"list": [encode(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            arrays[path.lstrip("/")] = to_numpy(node)
            return {_ARRAY_KEY: path.lstrip("/")}
        raise TypeError(f"state entry at {path} has unsupported type {type(node).__name__}")

    treedef = encode(state, "")
    if TREEDEF_KEY in arrays:
        raise ValueError(f"state may not contain the key {TREEDEF_KEY!r}")
    arrays[TREEDEF_KEY] = _host_np.array(json.dumps(treedef))
    return arrays


def state_from_numpy(arrays, device: str = "cpu") -> dict:
    """Inverse of :func:`state_to_numpy` (``arrays`` may be an ``np.load`` result); arrays are
    moved to ``device`` ('cpu' or 'gpu')."""
    if TREEDEF_KEY not in arrays:
        raise ValueError(f"arrays has no {TREEDEF_KEY!r} entry; it was not written by "
                         "state_to_numpy")
    treedef = json.loads(str(arrays[TREEDEF_KEY][()]))

    def decode(node):
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        if _ARRAY_KEY in node:
            return to_device(_host_np.array(arrays[node[_ARRAY_KEY]]), device)
        return node["value"]

    return decode(treedef)
