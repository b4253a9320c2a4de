"""Kernel-launch budget of one optimizer step on the paper's CIFAR-10 net, counted on the CPU
with the guarded namespace (a stand-in for CuPy: every namespace call, ufunc, fancy gather and
element assignment on its arrays counts as one launch; views do not).

Before the single-gather im2col, the one-scatter col2im and the window-gather pools an SGD step
cost 729 launches (one per kernel offset in im2col, col2im and the pools).
"""
import numpy as np
import pytest
from guarded_xp import asguarded, counting

from kfc_ref.nn.layers import Conv2d, Dense, Flatten, ReLU
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.nn.models import cifar10_convnet
from kfc_ref.nn.network import Sequential
from kfc_ref.optim import make_optimizer

#: issue 12's target for one SGD step of the CIFAR-10 net (forward, loss, backward, update)
SGD_STEP_BUDGET = 150


@pytest.fixture(scope="module")
def cifar():
    net = cifar10_convnet()
    params = [None if p is None else asguarded(p) for p in net.init(0, "float32")]
    rng = np.random.default_rng(0)
    x = asguarded(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    y = asguarded(rng.integers(0, 10, 4))
    return net, params, x, y


def _launches_per_step(net, params, batch, name, steps=3, **kw):
    opt = make_optimizer(name, **kw)
    state, p, counts = opt.init_state(net, params), params, []
    rng = np.random.default_rng(1)
    for _ in range(steps):
        with counting() as c:
            p, state, _ = opt.step(state, net, p, batch, rng)
        counts.append(c.launches)
    return counts


def test_sgd_step_fits_the_launch_budget(cifar):
    net, params, x, y = cifar
    counts = _launches_per_step(net, params, (x, y), "sgd", lr=0.01)
    # the first step also uploads the cached index tables (once per shape and namespace)
    assert max(counts[1:]) <= SGD_STEP_BUDGET, counts


def test_launches_do_not_grow_with_the_kernel_size(cifar):
    """One gather per im2col and one scatter per col2im: a forward+backward pass costs the
    same number of launches for 3x3 and 5x5 kernels (the slice loops grew with |Delta|)."""
    _, _, x, y = cifar

    def count(kernel):
        small = Sequential([Conv2d(3, 4, kernel, padding=kernel // 2), ReLU(),
                            Conv2d(4, 4, kernel, padding=kernel // 2), Flatten(),
                            Dense(4 * 32 * 32, 10)], (3, 32, 32))
        ps = [None if q is None else asguarded(q) for q in small.init(0, "float32")]
        small.forward(ps, x, check=False)                 # index tables built and cached
        with counting() as c:
            tape = small.forward(ps, x, check=False)
            _, d = softmax_cross_entropy(tape.output, y)
            small.backward(ps, tape, d)
        return c.launches
    assert count(3) == count(5)


def test_counting_is_a_working_negative_control(cifar):
    """The counter sees launches: a forward pass of the net is not free."""
    net, params, x, _ = cifar
    with counting() as c:
        net.forward(params, x, check=False)
    assert c.launches > 20
