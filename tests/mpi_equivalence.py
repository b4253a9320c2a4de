"""A few data-parallel optimizer steps, run under ``mpiexec`` by tests/test_distributed.py.

    mpiexec -n P python tests/mpi_equivalence.py OPTIMIZER XP OUT_PREFIX

Every rank writes ``OUT_PREFIX.rank<r>.npz`` (flat parameters, theta_bar, the logged losses),
so the test can compare P ranks with one process and the ranks with each other.  XP is
``numpy`` or ``guarded`` (the test namespace standing in for CuPy: the communicator then
stages device buffers through host memory).  The problem has dropout on a spatial and on a
flat activation, factor-statistics and nu subsets smaller than the batch, and a batch of 10
that 3 ranks split 3/3/4, so some ranks hold none of a subset on some steps.
"""
from __future__ import annotations

import sys

import numpy as np

from kfc_ref.backend import to_numpy
from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, ReLU
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import MaxPool2d
from kfc_ref.optim import make_optimizer

BATCH, STEPS = 10, 7
OPTIONS = {
    "sgd": dict(lr=0.05),
    "kfc-pre": dict(lr=0.05, stats_period=2, inverse_period=3, stats_fraction=0.5,
                    nu_fraction=0.25, factor_init_batches=2, clip=0.01),
}


def problem():
    """The net (dropout included), float64 parameters and a fixed stream of batches."""
    net = Sequential([Conv2d(1, 4, 3, padding=1), ReLU(), Dropout(0.25), MaxPool2d(2, 2),
                      Conv2d(4, 6, 3, padding=1), ReLU(), Flatten(), Dropout(0.5),
                      Dense(6 * 4 * 4, 3)], (1, 8, 8))
    rng = np.random.default_rng(42)
    params = net.init(rng, dtype="float64")
    xs = rng.standard_normal((STEPS + 2, BATCH, 1, 8, 8))
    ys = rng.integers(0, 3, (STEPS + 2, BATCH))
    return net, params, xs, ys


def run(name: str, comm, to_xp):
    """(flat parameters, flat theta_bar, losses) after STEPS steps over ``comm``'s ranks."""
    net, params, xs, ys = problem()
    params = [to_xp(p) if p is not None else None for p in params]
    opt = make_optimizer(name, **OPTIONS[name]).set_communicator(comm)
    rng = np.random.default_rng(7)
    state = opt.init_state(net, params)
    if opt.factor_init_batches:
        state = opt.initialize_factors(state, net, params, [to_xp(xs[-1]), to_xp(xs[-2])], rng)
    losses = []
    for k in range(STEPS):
        params, state, info = opt.step(state, net, params, (to_xp(xs[k]), to_xp(ys[k])), rng)
        losses.append(float(to_numpy(info["loss"])))
    return (to_numpy(net.flatten(params)), to_numpy(net.flatten(opt.averaged_params(net, state))),
            np.array(losses))


def namespace(name: str):
    if name == "numpy":
        return np.asarray
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from guarded_xp import asguarded
    return asguarded


if __name__ == "__main__":
    from kfc_ref.comm import MPIComm
    optimizer, xp_name, prefix = sys.argv[1:4]
    comm = MPIComm()
    theta, theta_bar, losses = run(optimizer, comm, namespace(xp_name))
    np.savez(f"{prefix}.rank{comm.rank}.npz", theta=theta, theta_bar=theta_bar, losses=losses,
             size=comm.size)
