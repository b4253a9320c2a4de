"""Host-sync budgets per optimizer step, counted on the CPU with the guarded namespace
(tests/guarded_xp.py: every float()/int()/bool()/item()/to_numpy of a device array is a sync).

A device-to-host read stalls the host until the GPU has finished all queued work, so a step
should read back only what a host decision needs (issue: GPU as a first-class device):

* SGD: nothing (0 per step); the loss stays a 0-d device array in ``info``;
* KFC-pre: nothing on ordinary and statistics-refresh steps (clipping is decided on the device),
  1 on inverse-refresh steps (the fused finiteness check of every factor before inversion);
* K-FAC: 1 per step, inherent: the 2 x 2 quadratic-model solve and the choice among the gamma
  candidates are host decisions, made from one read of all inner products at once; +1 every
  T_1 steps (rho for the Levenberg-Marquardt rule), +2 on eigendecomposition steps (finiteness
  before and after ``eigh``).

Negative control: reading the loss the way the old code did (``float(info["loss"])``) is seen
as one more sync, so the counter can fail these budgets.
"""
import numpy as np
import pytest

from guarded_xp import asguarded, counting, guarded
from kfc_ref.backend import get_xp
from kfc_ref.nn.models import cifar10_convnet, tiny_convnet
from kfc_ref.optim import info_to_host, make_optimizer


def guarded_problem(net, n, seed=0):
    rng = np.random.default_rng(seed)
    params = [None if p is None else asguarded(p) for p in net.init(seed, "float32")]
    x = asguarded(rng.normal(size=(n,) + net.input_shape).astype(np.float32))
    y = asguarded(rng.integers(0, net.shapes[-1][0], n))
    return params, x, y


def syncs_per_step(name, kw, net, steps, n=8, init_batches=0):
    params, x, y = guarded_problem(net, n)
    opt = make_optimizer(name, **kw)
    rng = np.random.default_rng(1)
    state = opt.init_state(net, params)
    if init_batches:
        state = opt.initialize_factors(state, net, params, [x] * init_batches, rng)
    counts, infos = [], []
    for _ in range(steps):
        with counting() as c:
            params, state, info = opt.step(state, net, params, (x, y), rng)
        counts.append(c.syncs)
        infos.append(info)
    return counts, infos


def kfac_budget(k, lm_period=5, inverse_period=20):
    return 1 + (k % lm_period == 0) + 2 * (k <= 3 or k % inverse_period == 0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_convnet((1, 6, 6), channels=(2, 2), num_classes=3)


def test_sgd_reads_nothing_back(tiny):
    counts, infos = syncs_per_step("sgd", {"lr": 0.01}, tiny, 4)
    assert counts == [0, 0, 0, 0]
    assert get_xp(infos[-1]["loss"]) is guarded          # the loss stays on the device
    with counting() as c:
        float(infos[-1]["loss"])                          # negative control: a read is counted
    assert c.syncs == 1


def test_kfc_pre_syncs_only_to_check_factors_before_inversion(tiny):
    kw = {"lr": 0.001, "stats_period": 2, "inverse_period": 3}
    counts, infos = syncs_per_step("kfc-pre", kw, tiny, 9, init_batches=2)
    refresh = [info["inverses_updated"] for info in infos]
    assert refresh == [k % 3 == 0 for k in range(1, 10)]
    assert counts == [int(r) for r in refresh]          # <= 1, and 0 on non-refresh steps
    assert any(info["stats_updated"] and not info["inverses_updated"] for info in infos)
    host = info_to_host(infos[-1])
    assert isinstance(host["nu"], float) and isinstance(host["clipped"], bool)
    assert all(isinstance(p, float) for p in host["pi"])


def test_kfc_pre_without_initialisation_and_with_weight_decay(tiny):
    counts, _ = syncs_per_step("kfc-pre", {"lr": 0.001, "weight_decay": 1e-3}, tiny, 3)
    assert counts == [1, 0, 0]                          # k = 1 builds the first inverses


def test_kfac_sync_budget(tiny):
    kw = {"lm_period": 5, "inverse_period": 20, "gamma_period": 4}
    counts, infos = syncs_per_step("kfac", kw, tiny, 21)
    assert counts == [kfac_budget(k) for k in range(1, 22)]
    assert all({"lambda", "gamma", "rho"} <= set(info) for info in infos)
    assert any(info["rho"] is not None for info in infos)


@pytest.mark.parametrize("name,kw,budget", [
    ("sgd", {"lr": 0.01}, [0, 0]),
    ("kfc-pre", {"lr": 0.001}, [1, 0]),
    ("kfac", {}, [3, 3]),
])
def test_budgets_hold_on_the_cifar10_net(name, kw, budget):
    """The paper's CIFAR-10 net (max pooling, response normalisation) adds no syncs."""
    counts, _ = syncs_per_step(name, kw, cifar10_convnet(), 2, n=2)
    assert counts == budget
