"""The small experiments behind ``python -m kfc_ref figures`` and ``python -m kfc_ref tour``.

Each function computes one thing the paper shows and returns host NumPy numbers; drawing lives
in :mod:`kfc_ref.experiments.plotting`, orchestration in :mod:`kfc_ref.experiments.figures`.

* :func:`tiny_problem` -- a tiny conv net (:func:`kfc_ref.nn.models.tiny_convnet`, two 3x3 convs)
  trained briefly with SGD on images average-pooled down to about 8 x 8, in float64, small
  enough for the exact Fisher block of a conv layer (Eq. 3, 12);
* :func:`damping_sweep` -- factored damping (Eqs. 7, 20-21, pi of Eq. 8) against the exact
  damped solve (F_hat + gamma I)^-1 g (App. B.2, Eqs. 33-38) and against the exact Fisher block's
  (F + gamma I)^-1 g, over a range of gamma;
* :func:`invariance_trajectories` -- Theorem 3 over many steps: undamped KFC on a network and
  on its centred/whitened reparameterisation (Eq. 24, Lemma 2) follows one trajectory; SGD
  does not;
* :func:`training_run` -- a run of :func:`kfc_ref.experiments.train.train` with the budget's limits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from kfc_ref.backend import asarray_like, to_numpy
from kfc_ref.curvature.damping import eigen_factors, factored_inverse
from kfc_ref.data import MinibatchStream
from kfc_ref.curvature.fisher import exact_layer_factors
from kfc_ref.theory.invariance import (PointwiseAffine, Reparameterization, dagger_network,
                                dagger_params, function_discrepancy, preconditioned_update)
from kfc_ref.theory.ladder import Ladder, approximation_ladder
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.nn.models import tiny_convnet
from kfc_ref.nn.network import Sequential
from kfc_ref.optim import SGD
from kfc_ref.nn.pooling import AvgPool2d


@dataclass(frozen=True)
class Budget:
    """How much work each experiment does: ``QUICK`` (CI, seconds), ``TOUR`` (training runs
    limited in wall-clock so the tour ends in < 5 minutes on 2 cores), ``FIGURES`` (training
    runs of a fixed length, so the committed figures do not depend on the machine's load)."""

    train_seconds: float | None  # time limit of each training run (None: run train_iters)
    train_iters: int          # iterations of each training run (a cap with a time limit)
    batch_size: int           # mini-batch of each training run (SGD and KFC-pre alike)
    eval_every: int           # iterations between evaluations of a training run
    max_train: int | None     # training images used (None: all)
    max_test: int | None      # test images used (None: all)
    sud_examples: int         # test images the SUD analysis (App. D.1) averages over
    tiny_examples: int        # images of the tiny problem
    tiny_iters: int           # SGD steps that train the tiny net
    ladder_examples: int      # images the exact Fisher block is averaged over
    invariance_examples: int  # full batch of the Theorem 3 trajectories
    invariance_iters: int     # steps of those trajectories
    dampings: int             # gamma values of the damping sweep


QUICK = Budget(train_seconds=10.0, train_iters=4, batch_size=32, eval_every=2, max_train=512,
               max_test=200, sud_examples=64, tiny_examples=128, tiny_iters=30,
               ladder_examples=48, invariance_examples=96, invariance_iters=6, dampings=5)
TOUR = Budget(train_seconds=45.0, train_iters=300, batch_size=128, eval_every=12,
              max_train=None, max_test=500, sud_examples=500, tiny_examples=512,
              tiny_iters=200, ladder_examples=256, invariance_examples=256,
              invariance_iters=40, dampings=17)
#: 80 iterations = 2.5 epochs of mnist5k at batch 128 (about the length the tour reaches).
FIGURES = replace(TOUR, train_seconds=None, train_iters=80, eval_every=8)

#: Tiny-net SGD: learning rate and mini-batch (a few hundred steps reach a low training loss on
#: 8x8 digits and 7x7 MNIST without diverging).
TINY_LR, TINY_BATCH = 0.05, 32
#: Damping of the angles in the approximation ladder and of the damping sweep's reference point.
LADDER_DAMPING = 1e-3
#: Undamped KFC and SGD step sizes of the Theorem 3 trajectories: KFC at 0.05 descends smoothly
#: for 40 full-batch steps (at 0.2 it diverges after ~10); SGD at 0.2 makes visible progress.
INVARIANCE_LR = {"kfc": 0.05, "sgd": 0.2}
#: Side of the images of the tiny problems (average pooling brings 28x28 MNIST to 7x7).
TINY_SIDE = 8


# --------------------------------------------------------------------------- tiny problem
def shrink_images(x, side: int = TINY_SIDE):
    """Average-pool (N, C, H, W) images by k = round(H / side) (kfc_ref.nn.pooling.AvgPool2d):
    28x28 -> 7x7, 32x32 -> 8x8, 8x8 unchanged."""
    k = max(1, round(x.shape[2] / side))
    return x if k == 1 else AvgPool2d(k, k).forward(x)[0]


@dataclass
class TinyProblem:
    """A trained tiny conv net, its float64 data, and the conv layer the exact work is about."""

    net: Sequential
    params: list
    x: np.ndarray
    y: np.ndarray
    layer_index: int


def sgd_steps(net, params, x, y, iters: int, lr: float, batch_size: int, seed: int):
    """``iters`` SGD-with-momentum steps (kfc_ref.optim.base.SGD, no averaging) on (x, y)."""
    opt = SGD(lr=lr, averaging_tau=0)
    state = opt.init_state(net, params)
    stream = MinibatchStream(x, y, min(batch_size, len(x)), seed=seed)
    rng = np.random.default_rng([seed, 3])
    for _ in range(iters):
        params, state, _ = opt.step(state, net, params, next(stream), rng)
    return params


def tiny_problem(dataset, budget: Budget, seed: int = 0) -> TinyProblem:
    """tiny_convnet (3 and 3 maps, tanh, same padding) on ``budget.tiny_examples`` shrunk
    training images in float64, trained ``budget.tiny_iters`` SGD steps; the layer is the
    second conv (K = 1 + 3*9 = 28 columns, I = 3: an 84 x 84 Fisher block)."""
    x = shrink_images(dataset.x_train[:budget.tiny_examples].astype(np.float64))
    y = dataset.y_train[:budget.tiny_examples]
    net = tiny_convnet(x.shape[1:], num_classes=dataset.num_classes)
    params = sgd_steps(net, net.init(seed, "float64"), x, y, budget.tiny_iters, TINY_LR,
                       TINY_BATCH, seed)
    return TinyProblem(net, params, x, y, net.param_layers[1])


def exact_vs_kfc(problem: TinyProblem, num_examples: int,
                 damping: float = LADDER_DAMPING) -> Ladder:
    """The approximation ladder (docs/ladder.md) of the problem's conv layer on its first
    ``num_examples`` images: exact block, IAD, IAD+SUD, KFC, KFC-SUA, diagonal."""
    x, y = problem.x[:num_examples], problem.y[:num_examples]
    return approximation_ladder(problem.net, problem.params, x, y, problem.layer_index, damping)


# --------------------------------------------------------------------------- damping
def angle_deg(u, v) -> float:
    """Angle between two vectors in degrees."""
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


@dataclass
class DampingSweep:
    """Per gamma: the factored solve (Eq. 21-22) vs the exact damped KFC solve (Eqs. 33-38),
    and both vs the exact Fisher block's damped solve (F + gamma I)^-1 g."""

    dampings: np.ndarray
    factored_vs_exact_error: np.ndarray     # ||u_fact - u_exact|| / ||u_exact||
    factored_vs_exact_angle: np.ndarray     # degrees
    factored_vs_fisher_angle: np.ndarray    # angle(u_fact, (F + gamma I)^-1 g)
    exact_vs_fisher_angle: np.ndarray       # angle(u_exact, (F + gamma I)^-1 g)
    pi: float                               # Eq. 8 for the layer's factors


def damping_sweep(problem: TinyProblem, ladder: Ladder, num_examples: int, num: int,
                  low: float = 1e-7, high: float = 10.0) -> DampingSweep:
    """Sweep gamma over ``num`` log-spaced values in [low, high] on the ladder's layer, with the
    exact-over-y factors (``fisher.exact_layer_factors``) of the same ``num_examples`` images
    the ladder used, the ladder's exact block F and the layer's mean-loss gradient g."""
    x = problem.x[:num_examples]
    fac = exact_layer_factors(problem.net, problem.params, x, problem.layer_index)
    I = fac.Gamma.shape[0]
    g = to_numpy(ladder.gradient)
    G = g.reshape(-1, I).T                          # vec(G) = g (column stacking)
    F = to_numpy(ladder.matrices["exact"])
    eig = eigen_factors(fac.Omega, fac.Gamma)
    out = {k: [] for k in ("err", "ang", "fact_F", "exact_F")}
    dampings = np.logspace(np.log10(low), np.log10(high), num)
    pi = None
    for gamma in dampings:
        inv = factored_inverse(fac.Omega, fac.Gamma, float(gamma))
        pi = inv.pi
        u_fact = inv.apply(G).T.reshape(-1)
        u_exact = eig.apply(G, float(gamma)).T.reshape(-1)
        u_F = np.linalg.solve(F + gamma * np.eye(F.shape[0]), g)
        out["err"].append(np.linalg.norm(u_fact - u_exact) / np.linalg.norm(u_exact))
        out["ang"].append(angle_deg(u_fact, u_exact))
        out["fact_F"].append(angle_deg(u_fact, u_F))
        out["exact_F"].append(angle_deg(u_exact, u_F))
    return DampingSweep(dampings, *(np.array(out[k]) for k in ("err", "ang", "fact_F",
                                                                "exact_F")), float(pi))


# --------------------------------------------------------------------------- Theorem 3
def invariance_net(input_shape, num_classes: int) -> Sequential:
    """Two *valid* 3x3 tanh convs and a dense softmax layer: no zero padding, so the shifts d
    of Eq. 24 are allowed in front of every parametric layer (invariance.py, padding caveat)."""
    c, h, w = input_shape
    return Sequential([Conv2d(c, 3, 3), Tanh(), Conv2d(3, 3, 3), Tanh(), Flatten(),
                       Dense(3 * (h - 4) * (w - 4), num_classes)], input_shape)


def whitening(a) -> PointwiseAffine:
    """(U, c, V, d) = (I, 0, Sigma^-1/2, -M Sigma^-1/2) for activations a (N, J, H, W) or (N, J):
    afterwards the maps have mean 0 and identity covariance across maps (Section 4.1: "normalizing
    activations to be zero mean and unit variance")."""
    J = a.shape[1]
    flat = np.moveaxis(to_numpy(a), 1, -1).reshape(-1, J)          # host-side statistics
    M = flat.mean(axis=0)
    w, Q = np.linalg.eigh(np.atleast_2d(np.cov(flat.T, bias=True)))
    V = (Q / np.sqrt(w)) @ Q.T
    parts = (np.eye(J), np.zeros(J), V, -M @ V)        # back in the activations' namespace
    return PointwiseAffine(*[asarray_like(part, a) for part in parts])


def whitening_reparameterization(net: Sequential, params, x) -> Reparameterization:
    """Eq. 24 with the input and every tanh layer's output centred and whitened on x."""
    inputs = net.layer_inputs(params, x)
    hidden = {k: whitening(inputs[k + 1]) for k, layer in enumerate(net.layers)
              if isinstance(layer, Tanh)}
    num_classes = net.shapes[-1][0]
    return Reparameterization(whitening(x), hidden, PointwiseAffine.identity(num_classes, x))


@dataclass
class InvarianceRun:
    """Training loss per iteration (index 0 = before the first step) of each method on N and
    on N-dagger, and the gap max |log p - log p_dagger| between the two networks."""

    losses: dict
    gaps: dict


def invariance_trajectories(x, y, num_classes: int, iters: int, seed: int = 0,
                            lrs: dict = INVARIANCE_LR) -> InvarianceRun:
    """Full-batch steps of undamped KFC (Theorem 3's update) and of SGD on the tiny valid-conv
    net and on its whitened reparameterisation, with the same sampled targets at every step."""
    net = invariance_net(x.shape[1:], num_classes)
    params = net.init(seed, "float64")
    reparam = whitening_reparameterization(net, params, x)
    net_d, params_d = dagger_network(net, reparam), dagger_params(net, params, reparam)

    def loss(nn, p):
        return float(softmax_cross_entropy(nn.forward(p, x).output, y)[0])

    losses, gaps = {}, {}
    for method in ("kfc", "sgd"):
        a, b = params, params_d
        la, lb, gap = [loss(net, a)], [loss(net_d, b)], [function_discrepancy(net, a, net_d, b, x)]
        for it in range(iters):
            a = preconditioned_update(net, a, x, y, np.random.default_rng([seed, it]),
                                      lr=lrs[method], method=method)
            b = preconditioned_update(net_d, b, x, y, np.random.default_rng([seed, it]),
                                      lr=lrs[method], method=method)
            la.append(loss(net, a))
            lb.append(loss(net_d, b))
            gap.append(function_discrepancy(net, a, net_d, b, x))
        name = "KFC (undamped)" if method == "kfc" else "SGD"
        losses[name], losses[f"{name} (reparam.)"] = la, lb
        gaps[name] = gap
    return InvarianceRun(losses, gaps)


# --------------------------------------------------------------------------- training runs
def training_run(optimizer: str, arch: str, budget: Budget, out: str, *, data: str = "mnist5k",
                 data_dir=None, seed: int = 0, device: str = "cpu", iters: int | None = None,
                 eval_every: int | None = None, quiet: bool = True):
    """One :func:`kfc_ref.experiments.train.train` run with the budget's time limit, iteration cap,
    mini-batch and data sizes; ``iters`` / ``eval_every`` override the budget (e.g. to match
    another run's length).  A run whose loss explodes (``TrainingStopped``) is returned with
    the metrics logged before that, ``net``/``params``/``dataset`` None and ``status``
    'diverged: <message>'."""
    from kfc_ref.experiments.train import (
        TrainConfig, TrainingStopped, TrainResult, read_metrics, train,
    )
    cfg = TrainConfig(optimizer=optimizer, data=data, data_dir=data_dir, arch=arch,
                      batch_size=budget.batch_size, iters=iters or budget.train_iters, seed=seed,
                      device=device, out=out, eval_every=eval_every or budget.eval_every,
                      max_train=budget.max_train, max_test=budget.max_test,
                      time_limit=None if iters else budget.train_seconds, quiet=quiet)
    try:
        return train(cfg)
    except TrainingStopped as exc:     # keep what was logged before the loss exploded
        rows = read_metrics(out) if os.path.exists(os.path.join(out, "metrics.csv")) else []
        return TrainResult(out, rows, None, None, None, f"diverged: {exc}")


def first_reaching(metrics: list, key: str, target: float):
    """(iteration, wall_seconds) of the first row with ``key`` <= target, or None."""
    for row in metrics:
        if row.get(key) is not None and row[key] <= target:
            return int(row["iteration"]), float(row["wall_seconds"])
    return None

