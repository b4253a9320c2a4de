"""Tests for the optimizer interface, SGD and KFC-pre (kfc_ref.optim.base, kfc_ref.optim.kfc_pre;
App. B.1).

(a) one KFC-pre step (no momentum, no clipping, given factors) equals the dense solve with the
    damped block-diagonal approximate Fisher (Omega + pi r I) kron (Gamma + r/pi I),
    r = sqrt(lambda + gamma) (Eqs. 8, 20-22) -- float64, tight; the other Kronecker order fails;
(b) update clipping leaves nu = v^T F v + lambda v^T v exactly at C;
(c) momentum and parameter averaging follow Algorithm 1 over two steps checked by hand;
(d) the factor moving average uses eps = min(1 - 1/k, 0.95);
(e) on sklearn's digits SGD and KFC-pre bring the training loss well below its start;
(f) the state round-trips through numpy (and np.savez) and a resumed run steps identically;
(g) bad hyperparameters raise errors naming the argument.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.linalg import block_diag
from sklearn.datasets import load_digits

from guarded_xp import asguarded, guarded
from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.curvature.damping import NonFiniteCurvatureError, pi_trace
from kfc_ref.curvature.factors import (
    KroneckerFactors, moving_average, moving_average_decay, network_factors,
)
from kfc_ref.curvature.fvp import fisher_quadratic
from kfc_ref.nn.keyed_random import ExampleRandom
from kfc_ref.nn.losses import cross_entropy
from kfc_ref.nn.models import small_convnet, tiny_convnet
from kfc_ref.optim import SGD, KFCPre, info_to_host, make_optimizer
from kfc_ref.optim.base import compact, expand, state_from_numpy, state_to_numpy, subset_indices
from kfc_ref.optim.data_parallel import KEY_BOUND, STATISTICS_STREAM, TARGETS_STREAM
from kfc_ref.optim.kronecker import average_in, estimate_factors
from kfc_ref.optim.state import SGDState
from kfc_ref.validate import ArgumentError

#: KFC-pre step vs the dense P x P solve (float64).  The damped block-diagonal matrices here
#: have condition numbers below ~1e4, so both solves agree to ~1e-16 * 1e4 = 1e-12 relative
#: (observed: ~1e-14).
SOLVE_RTOL = 1e-10
#: Clipped nu vs C: nu is a quadratic form of v recomputed from the same exact-F code, so only
#: rounding separates them.
CLIP_RTOL = 1e-10
#: Hand-computed momentum/averaging recursions vs the optimizer: identical operations up to the
#: order of a few float64 additions.
RECURSION_RTOL = 1e-12
NEVER = 10**9       # a refresh period that never fires in a test


def tiny_problem(seed, n=8):
    rng = np.random.default_rng(seed)
    net = tiny_convnet((1, 6, 6), channels=(2, 2), num_classes=3)
    params = net.init(rng, dtype="float64")
    for i in net.param_layers:
        params[i] = params[i] + 0.1 * rng.standard_normal(params[i].shape)
    x = rng.standard_normal((n, 1, 6, 6))
    y = rng.integers(0, 3, n)
    return net, params, x, y


def decayed_gradient(net, params, x, y, weight_decay):
    _, grads, _ = net.loss_and_grads(params, x, y)
    return net.flatten([None if g is None else g + weight_decay * w
                        for g, w in zip(grads, params)])


def dense_damped_fisher(state, damping, weight_decay, kron_order="Omega-Gamma"):
    """block_diag over layers of (Omega + pi r I) kron (Gamma + r/pi I), r = sqrt(lambda+gamma)."""
    blocks = []
    root = math.sqrt(weight_decay + damping)
    for f in state.factors:
        Om, Ga = to_numpy(f.Omega), to_numpy(f.Gamma)        # host, also for device states
        pi = pi_trace(Om, Ga)
        Om_d = Om + pi * root * np.eye(Om.shape[0])
        Ga_d = Ga + root / pi * np.eye(Ga.shape[0])
        blocks.append(np.kron(Om_d, Ga_d) if kron_order == "Omega-Gamma" else np.kron(Ga_d, Om_d))
    return block_diag(*blocks)


# --------------------------------------------------------------------------- (a)
@settings(max_examples=8)
@given(st.integers(0, 2**31), st.sampled_from([1e-3, 1e-2, 0.3]), st.sampled_from([0.0, 1e-3]))
def test_kfc_pre_step_equals_dense_damped_solve(to_xp, seed, damping, weight_decay):
    """The step on the --xp module; the dense solve on the host."""
    net, host_params, host_x, host_y = tiny_problem(seed)
    params, x, y = [to_xp(p) for p in host_params], to_xp(host_x), to_xp(host_y)
    opt = KFCPre(lr=0.1, momentum=0.0, damping=damping, weight_decay=weight_decay, clip=None,
                 stats_period=NEVER, inverse_period=NEVER, averaging_tau=0)
    rng = np.random.default_rng(seed)
    state = opt.initialize_factors(opt.init_state(net, params), net, params,
                                   [x[:4], x[4:]], rng)
    new_params, state, info = opt.step(state, net, params, (x, y), rng)
    assert not info["stats_updated"] and not info["inverses_updated"]
    step = to_numpy(net.flatten(new_params)) - net.flatten(host_params)
    g = decayed_gradient(net, host_params, host_x, host_y, weight_decay)
    want = -0.1 * np.linalg.solve(dense_damped_fisher(state, damping, weight_decay), g)
    assert np.linalg.norm(step - want) <= SOLVE_RTOL * np.linalg.norm(want)
    # Negative control: Gamma kron Omega is the row-major (wrong) order for our flat vector.
    swapped = dense_damped_fisher(state, damping, weight_decay, "Gamma-Omega")
    wrong = -0.1 * np.linalg.solve(swapped, g)
    assert np.linalg.norm(wrong - want) > 1e-3 * np.linalg.norm(want)
    # Averaging off (tau = 0): theta_bar is theta.
    np.testing.assert_array_equal(to_numpy(net.flatten(opt.averaged_params(net, state))),
                                  to_numpy(net.flatten(new_params)))


def test_initial_factors_are_the_mean_of_batch_estimates(to_xp):
    net, params, x, _ = tiny_problem(0)
    params, x = [None if p is None else to_xp(p) for p in params], to_xp(x)
    opt = KFCPre(lr=0.1)
    state = opt.initialize_factors(opt.init_state(net, params), net, params, [x[:4], x[4:]],
                                   np.random.default_rng(7))
    rng = np.random.default_rng(7)      # each batch: a key, then targets keyed by example
    ests = [net.sampled_records(params, xb, ExampleRandom(rng.integers(KEY_BOUND),
                                                          TARGETS_STREAM, np.arange(4)))
            for xb in (x[:4], x[4:])]
    fa, fb = network_factors(ests[0]), network_factors(ests[1])
    for f, a, b in zip(state.factors, fa, fb):
        np.testing.assert_allclose(to_numpy(f.Omega), to_numpy((a.Omega + b.Omega) / 2),
                                   rtol=1e-14)
        np.testing.assert_allclose(to_numpy(f.Gamma), to_numpy((a.Gamma + b.Gamma) / 2),
                                   rtol=1e-14)
    assert state.stats_count == 2 and state.inverses is not None


def test_factor_estimates_on_a_subset_and_with_a_reused_tape(to_xp):
    net, params, x, _ = tiny_problem(8, n=12)
    params, x = [to_xp(p) for p in params], to_xp(x)
    got = estimate_factors(net, params, x, np.random.default_rng(5), fraction=0.5)
    rng = np.random.default_rng(5)
    key = rng.integers(KEY_BOUND)               # the step's key, then the subset's rows
    idx = subset_indices(12, 0.5, rng)
    assert len(idx) == 6 and len(set(idx.tolist())) == 6
    keyed = ExampleRandom(key, STATISTICS_STREAM, idx)    # rows keyed by their batch index
    want = network_factors(net.sampled_records(params, x[idx], keyed))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(to_numpy(g.Omega), to_numpy(w.Omega))
        np.testing.assert_array_equal(to_numpy(g.Gamma), to_numpy(w.Gamma))
        assert to_numpy(g.Omega)[0, 0] == g.num_locations == w.num_locations
    # fraction 1 reuses the gradient's tape: same statistics as a fresh forward pass.
    tape = net.forward(params, x)
    a = estimate_factors(net, params, x, np.random.default_rng(6), 1.0, tape=tape)
    b = estimate_factors(net, params, x, np.random.default_rng(6), 1.0)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(to_numpy(fa.Gamma), to_numpy(fb.Gamma))


# --------------------------------------------------------------------------- (b)
def test_clipping_rescales_nu_to_exactly_C(to_xp):
    """The clipped step on the --xp module (the scale is computed on the device)."""
    net, host_params, host_x, y = tiny_problem(1)
    params, x, y = [to_xp(p) for p in host_params], to_xp(host_x), to_xp(y)
    kw = dict(lr=1.0, momentum=0.0, damping=1e-3, weight_decay=1e-3, nu_fraction=1.0,
              stats_period=NEVER, inverse_period=NEVER, averaging_tau=0)
    steps = {}
    for clip in (0.3, 1e12):
        opt = KFCPre(clip=clip, **kw)
        rng = np.random.default_rng(3)
        state = opt.initialize_factors(opt.init_state(net, params), net, params, [x], rng)
        new_params, _, info = opt.step(state, net, params, (x, y), rng)
        info = {k: to_numpy(info[k]).item() for k in ("clipped", "nu")}
        steps[clip] = (to_numpy(net.flatten(new_params)) - net.flatten(host_params), info)
    v, info = steps[0.3]
    assert info["clipped"] and info["nu"] > 0.3
    nu_after = fisher_quadratic(net, host_params, host_x, net.unflatten(v)) + 1e-3 * v @ v
    np.testing.assert_allclose(nu_after, 0.3, rtol=CLIP_RTOL)
    v_free, info_free = steps[1e12]
    assert not info_free["clipped"]
    np.testing.assert_allclose(info_free["nu"], info["nu"], rtol=CLIP_RTOL)
    np.testing.assert_allclose(v, v_free * math.sqrt(0.3 / info["nu"]), rtol=CLIP_RTOL)


def test_clip_scope_step_bounds_the_momentum_sum(to_xp):
    """clip_scope="step" clips p = mu p + v (what moves theta) to nu(p) = C exactly, while
    Algorithm 1's "update" clips only v, so its momentum sum exceeds C (the negative control).
    The steps and nu(p) on the --xp module."""
    net, params, x, y = tiny_problem(11)
    params, x, y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    nus = {}
    for scope in ("update", "step"):
        opt = KFCPre(lr=1.0, momentum=0.9, clip=0.05, clip_scope=scope, nu_fraction=1.0,
                     weight_decay=1e-3, stats_period=NEVER, inverse_period=NEVER)
        rng = np.random.default_rng(4)
        state = opt.initialize_factors(opt.init_state(net, params), net, params, [x], rng)
        ps = params
        for _ in range(3):
            before, (ps, state, info) = ps, opt.step(state, net, ps, (x, y), rng)
            assert info["clipped"]
        p = state.velocity                    # nu(p) at the parameters the step started from
        nus[scope] = float(fisher_quadratic(net, before, x, expand(net, p))
                           + 1e-3 * sum(float(np.sum(to_numpy(pl * pl))) for pl in p))
    np.testing.assert_allclose(nus["step"], 0.05, rtol=CLIP_RTOL)
    assert nus["update"] > 2 * 0.05


# --------------------------------------------------------------------------- (c)
def test_sgd_momentum_weight_decay_and_averaging_two_steps_by_hand(to_xp):
    """The two steps on the --xp module; the recursion by hand on the host."""
    net, params, x, y = tiny_problem(2)
    d_params, d_x, d_y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    lr, mu, lam, tau = 0.05, 0.9, 1e-2, 3.0
    xi = math.exp(-1 / tau)
    opt = SGD(lr=lr, momentum=mu, weight_decay=lam, averaging_tau=tau)
    state = opt.init_state(net, d_params)
    rng = np.random.default_rng(0)
    assert opt.initialize_factors(state, net, d_params, [d_x], rng) is state   # no curvature
    p1_params, state, _ = opt.step(state, net, d_params, (d_x, d_y), rng)
    p2_params, state, info = opt.step(state, net, p1_params, (d_x[::-1], d_y[::-1]), rng)
    p1_params, p2_params = ([to_numpy(p) for p in ps] for ps in (p1_params, p2_params))
    th0 = net.flatten(params)
    v1 = -lr * decayed_gradient(net, params, x, y, lam)
    th1 = th0 + v1
    v2 = mu * v1 - lr * decayed_gradient(net, net.unflatten(th1), x[::-1], y[::-1], lam)
    th2 = th1 + v2
    bar2 = xi * (xi * th0 + (1 - xi) * th1) + (1 - xi) * th2
    np.testing.assert_allclose(net.flatten(p1_params), th1, rtol=RECURSION_RTOL)
    np.testing.assert_allclose(net.flatten(p2_params), th2, rtol=RECURSION_RTOL)
    np.testing.assert_allclose(to_numpy(net.flatten(opt.averaged_params(net, state))), bar2,
                               rtol=RECURSION_RTOL)
    assert info["k"] == 2 and set(info) == {"k", "loss"}


def test_kfc_pre_momentum_and_averaging_two_steps_by_hand(to_xp):
    """The two steps on the --xp module; the recursion by hand on the host."""
    net, params, x, y = tiny_problem(3)
    d_params, d_x, d_y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    lr, mu, lam, gam = 0.02, 0.9, 1e-3, 1e-2
    opt = KFCPre(lr=lr, momentum=mu, damping=gam, weight_decay=lam, clip=None,
                 stats_period=NEVER, inverse_period=NEVER, averaging_examples=40)
    xi = math.exp(-1 / (40 / x.shape[0]))             # tau = 40 examples / N = 5 iterations
    rng = np.random.default_rng(1)
    state = opt.initialize_factors(opt.init_state(net, d_params), net, d_params, [d_x], rng)
    F_d = dense_damped_fisher(state, gam, lam)
    p1_params, state, _ = opt.step(state, net, d_params, (d_x, d_y), rng)
    p2_params, state, _ = opt.step(state, net, p1_params, (d_x, d_y), rng)
    th0 = net.flatten(params)
    v1 = -lr * np.linalg.solve(F_d, decayed_gradient(net, params, x, y, lam))
    th1 = th0 + v1
    v2 = mu * v1 - lr * np.linalg.solve(F_d, decayed_gradient(net, net.unflatten(th1), x, y, lam))
    th2 = th1 + v2
    bar2 = xi * (xi * th0 + (1 - xi) * th1) + (1 - xi) * th2
    np.testing.assert_allclose(to_numpy(net.flatten(p2_params)), th2, rtol=SOLVE_RTOL)
    np.testing.assert_allclose(to_numpy(net.flatten(opt.averaged_params(net, state))), bar2,
                               rtol=SOLVE_RTOL)


# --------------------------------------------------------------------------- (d)
def test_factor_moving_average_decay(to_xp):
    old = [KroneckerFactors(to_xp(np.full((2, 2), 1.0)), to_xp(np.full((1, 1), 1.0)), 4)]
    new = [KroneckerFactors(to_xp(np.full((2, 2), 3.0)), to_xp(np.full((1, 1), 5.0)), 4)]
    assert average_in(old, new, 1, 0.95)[0] is new[0]                      # eps = 0
    assert average_in(None, new, 7, 0.95) is new
    np.testing.assert_allclose(to_numpy(average_in(old, new, 2, 0.95)[0].Omega), 2.0)  # 1/2
    np.testing.assert_allclose(to_numpy(average_in(old, new, 4, 0.95)[0].Gamma), 0.75 + 1.25)
    np.testing.assert_allclose(to_numpy(average_in(old, new, 1000, 0.95)[0].Gamma),
                               0.95 + 0.25)
    # max_decay = 1: the running mean (the multi-batch initialisation).
    assert moving_average_decay(1000, 1.0) == 1.0 - 1.0 / 1000
    with pytest.raises(ArgumentError, match="decay=1.5"):
        moving_average(old[0], new[0], 1.5)
    with pytest.raises(ArgumentError, match="count=0"):
        moving_average_decay(0, 0.95)


def test_kfc_pre_refresh_schedule(to_xp):
    net, params, x, y = tiny_problem(4)
    params, x, y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    opt = KFCPre(lr=0.01, stats_period=2, inverse_period=3)
    state, rng = opt.init_state(net, params), np.random.default_rng(0)
    seen = []
    for _ in range(6):
        params, state, info = opt.step(state, net, params, (x, y), rng)
        seen.append((info["stats_updated"], info["inverses_updated"]))
        assert len(info["pi"]) == 3 and all(p > 0 for p in info["pi"])
    # k = 1 has no factors yet (taken from the batch); then k = 0 mod 2 and k = 0 mod 3.
    assert seen == [(True, True), (True, False), (False, True), (True, False), (False, False),
                    (True, True)]
    assert state.stats_count == 4


# --------------------------------------------------------------------------- (e)
@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.images / 16.0).reshape(-1, 1, 8, 8), d.target


def train_digits(opt, digits, iterations=30, batch=128, seed=0, init_batches=0, to_xp=None):
    """(start, end, averaged) training losses of 30 steps on the digits, on the --xp module
    when ``to_xp`` is given (mini-batches are chosen on the host, gathered there, moved)."""
    to_xp = np.asarray if to_xp is None else to_xp
    host_x, host_y = digits
    x, y = to_xp(host_x), to_xp(host_y)
    net = small_convnet((1, 8, 8), 10, channels=(8, 16))
    params = [None if p is None else to_xp(p) for p in net.init(seed, dtype="float64")]
    rng = np.random.default_rng(seed)
    state = opt.init_state(net, params)
    if init_batches:
        state = opt.initialize_factors(state, net, params,
                                       [x[i * batch:(i + 1) * batch] for i in range(init_batches)],
                                       rng)

    def loss(ps):
        return float(np.mean(to_numpy(cross_entropy(net.predict_logits(ps, x), y))))

    start = loss(params)
    for _ in range(iterations):
        idx = rng.choice(len(host_x), batch, replace=False)
        params, state, info = opt.step(state, net, params,
                                       (to_xp(host_x[idx]), to_xp(host_y[idx])), rng)
    return start, loss(params), loss(opt.averaged_params(net, state))


# Bounds: over seeds 0-5, 30 iterations end at loss 0.37-0.82 (SGD, lr 0.1) and 0.09-0.25
# (KFC-pre, lr 0.003, default T_s/T_f) from 2.68; the bounds leave room for either to vary.
def test_sgd_reduces_digits_training_loss(digits, to_xp):
    start, end, averaged = train_digits(SGD(lr=0.1, averaging_tau=5), digits, to_xp=to_xp)
    assert start > 2.0 and end < 0.4 * start and averaged < 0.4 * start


def test_kfc_pre_reduces_digits_training_loss(digits, to_xp):
    start, end, averaged = train_digits(KFCPre(lr=0.003, averaging_tau=5), digits,
                                        init_batches=4, to_xp=to_xp)
    assert start > 2.0 and end < 0.15 * start and averaged < 0.15 * start


# --------------------------------------------------------------------------- (f)
@pytest.mark.parametrize("name,kw", [("sgd", {"lr": 0.05}),
                                     ("kfc-pre", {"lr": 0.01, "stats_period": 2}),
                                     ("kfac", {"lm_period": 2, "gamma_period": 2,
                                               "inverse_period": 2})])
def test_state_round_trip_and_identical_resumed_step(name, kw, tmp_path, to_xp, device):
    """Steps on the --xp module; the state goes through the host (np.savez) and back."""
    net, params, x, y = tiny_problem(5, n=16)
    params, x, y = [None if p is None else to_xp(p) for p in params], to_xp(x), to_xp(y)
    opt = make_optimizer(name, **kw)
    rng = np.random.default_rng(11)
    state = opt.init_state(net, params)
    for k in range(3):
        params, state, _ = opt.step(state, net, params, (x[k:k + 8], y[k:k + 8]), rng)
    np.savez(tmp_path / "state.npz", **state_to_numpy(state))
    with np.load(tmp_path / "state.npz", allow_pickle=False) as f:
        restored = state_from_numpy(dict(f), device)
    assert type(restored) is type(state) is opt.state_type
    rng_state = rng.bit_generator.state
    out_a = opt.step(state, net, params, (x[3:11], y[3:11]), rng)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = rng_state
    out_b = opt.step(restored, net, params, (x[3:11], y[3:11]), rng2)
    for a, b in zip(to_numpy(net.flatten(out_a[0])), to_numpy(net.flatten(out_b[0]))):
        assert a == b
    flat_a, flat_b = state_to_numpy(out_a[1]), state_to_numpy(out_b[1])
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
    assert info_to_host(out_a[2]) == info_to_host(out_b[2])


@pytest.mark.parametrize("name,kw", [("sgd", {"lr": 0.05}), ("kfc-pre", {"lr": 0.01}),
                                     ("kfac", {})])
@pytest.mark.host_only("hyperparameter dictionaries, no arrays")
def test_hyperparameters_rebuild_the_optimizer(name, kw):
    opt = make_optimizer(name, **kw, weight_decay=1e-4)
    hp = opt.hyperparameters()
    assert opt.name == name and hp["weight_decay"] == 1e-4
    assert make_optimizer(name, **hp).hyperparameters() == hp
    assert repr(opt).startswith(type(opt).__name__ + "(")


def test_state_schema_is_the_dataclass_fields(to_xp):
    """The checkpoint entries are the dataclass fields: host scalars as 0-d arrays restored as
    the same Python numbers, per-layer lists as name/i, records as name/i/field, None fields
    absent; nothing needs pickle; a state of one optimizer does not load as another's.  The
    state is built on the --xp module."""
    net, params, x, y = tiny_problem(9)
    params, x, y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    opt = KFCPre(lr=0.01)
    state = opt.initialize_factors(opt.init_state(net, params), net, params, [x],
                                   np.random.default_rng(0))
    arrays = state_to_numpy(state)
    assert str(arrays["__state__"]) == "KFCPreState"
    assert {"k", "stats_count", "theta_bar/0", "velocity/2", "factors/1/Omega",
            "factors/1/num_locations", "inverses/0/Omega_inv", "inverses/2/pi"} <= set(arrays)
    assert all(a.dtype != object for a in arrays.values())
    back = state_from_numpy(arrays)
    assert back.k == 0 and isinstance(back.k, int) and back.stats_count == 1
    assert isinstance(back.factors[0], KroneckerFactors)
    assert back.factors[0].num_locations == state.factors[0].num_locations
    assert isinstance(back.factors[0].num_locations, int)
    np.testing.assert_array_equal(back.inverses[2].pi, to_numpy(state.inverses[2].pi))
    fresh = state_to_numpy(opt.init_state(net, params))            # factors, inverses = None
    assert not any(k.startswith(("factors", "inverses")) for k in fresh)
    assert state_from_numpy(fresh).factors is None
    kfac = make_optimizer("kfac").init_state(net, params)
    kfac.rho = 0.1 + 0.2
    back = state_from_numpy(state_to_numpy(kfac))
    assert back.rho == 0.1 + 0.2 and back.lam == 150.0 and isinstance(back.lam, float)
    with pytest.raises(ValueError, match="KFCPreState, not a KFACState"):
        type(kfac).from_arrays(arrays)
    with pytest.raises(ValueError, match="no known optimizer state"):
        state_from_numpy({})
    with pytest.raises(ValueError, match="has no entry 'velocity'"):
        state_from_numpy({k: v for k, v in arrays.items() if not k.startswith("velocity")})
    with pytest.raises(ArgumentError, match="needs a KFCPreState"):
        opt.step(SGDState(k=0, theta_bar=state.theta_bar), net, params, (x, y),
                 np.random.default_rng(0))


@pytest.mark.host_only("optimizer attributes, no arrays")
def test_factor_init_batches():
    """SGD needs none; KFC-pre takes Algorithm 1's initialisation (5 batches); K-FAC, as
    published (App. B.2 / K-FAC App. D), starts from the first mini-batch."""
    assert SGD(lr=0.1).factor_init_batches == 0
    assert "factor_init_batches" not in SGD(lr=0.1).hyperparameters()
    assert KFCPre(lr=0.1).factor_init_batches == 5
    assert KFCPre(lr=0.1, factor_init_batches=0).factor_init_batches == 0
    assert make_optimizer("kfac").factor_init_batches == 0


def test_overhead_benchmark_runs_in_quick_mode(device):
    from kfc_ref.experiments.bench.optim import bench_optim, format_report, measure_overhead
    net = small_convnet((1, 8, 8), 10, channels=(4, 4))
    out = bench_optim(device, batch_size=8, quick=True, net=net, dtype="float64")
    assert out["reps"] == 1 and out["stats_period"] == 5 and out["ratio_wall"] > 0
    report = format_report(measure_overhead(8, 1, net=net, device=device, log=lambda _: None))
    assert "ratio KFC-pre / SGD" in report


@pytest.mark.parametrize("name,kw", [("sgd", {"lr": 0.05}),
                                     ("kfc-pre", {"lr": 0.01, "stats_period": 2}),
                                     ("kfac", {"lm_period": 2, "gamma_period": 2,
                                               "inverse_period": 2})])
def test_optimizers_stay_in_a_second_array_namespace(name, kw, to_xp, xp, xp_name):
    """Three steps on the --xp module (the guarded namespace when --xp numpy, as the CuPy
    stand-in: any NumPy call on, or host array mixed into, a device array raises) match
    NumPy's."""
    if xp_name == "numpy":
        to_xp, xp = asguarded, guarded
    net, params, x, y = tiny_problem(7, n=16)
    runs = {}
    for to_device in (np.asarray, to_xp):
        opt = make_optimizer(name, **kw)
        ps = [None if p is None else to_device(p) for p in params]
        rng = np.random.default_rng(3)
        state = opt.initialize_factors(opt.init_state(net, ps), net, ps, [to_device(x)], rng)
        for k in range(3):
            batch = (to_device(x[4 * k:4 * k + 8]), to_device(y[4 * k:4 * k + 8]))
            ps, state, info = opt.step(state, net, ps, batch, rng)
        runs[to_device] = (ps, state, info)
    ps, state, info = runs[to_xp]
    assert all(get_xp(w) is xp for w in compact(net, ps) + state.theta_bar)
    np.testing.assert_allclose(to_numpy(net.flatten(ps)),
                               net.flatten(runs[np.asarray][0]), rtol=1e-9)
    assert info.keys() == runs[np.asarray][2].keys()


# --------------------------------------------------------------------------- (g)
@pytest.mark.parametrize("make,match", [
    (lambda: SGD(lr=-1.0), r"lr=-1\.0"),
    (lambda: SGD(lr=0.1, momentum=1.0), r"momentum=1\.0"),
    (lambda: SGD(lr=0.1, weight_decay=-1e-3), r"weight_decay=-0\.001"),
    (lambda: KFCPre(lr=0.1, damping=0.0), r"damping=0\.0"),
    (lambda: KFCPre(lr=0.1, stats_period=0), r"stats_period=0"),
    (lambda: KFCPre(lr=0.1, nu_fraction=1.5), r"nu_fraction=1\.5"),
    (lambda: KFCPre(lr=0.1, clip=-0.3), r"clip=-0\.3"),
    (lambda: make_optimizer("adam", lr=0.1), r"optimizer='adam'"),
])
@pytest.mark.host_only("constructor argument validation, no arrays")
def test_bad_hyperparameters_are_named(make, match):
    with pytest.raises(ArgumentError, match=match):
        make()


@pytest.mark.host_only("constructor argument validation, no arrays")
def test_numpy_scalar_hyperparameters_are_accepted():
    opt = KFCPre(lr=np.float32(0.01), momentum=np.float64(0.5), stats_period=np.int64(3))
    assert opt.lr == pytest.approx(0.01) and type(opt.lr) is float
    assert opt.stats_period == 3 and type(opt.stats_period) is int
    assert make_optimizer("kfac", omega1=np.float32(0.5)).omega1 == 0.5
    with pytest.raises(ArgumentError, match="use_momentum=1"):
        make_optimizer("kfac", use_momentum=1)


def test_bad_batch_and_rng(to_xp):
    net, params, x, y = tiny_problem(6)
    params, x, y = [to_xp(p) for p in params], to_xp(x), to_xp(y)
    opt = SGD(lr=0.1)
    state = opt.init_state(net, params)
    with pytest.raises(ArgumentError, match="labels must have shape"):
        opt.step(state, net, params, (x, y[:3]), np.random.default_rng(0))
    with pytest.raises(ArgumentError, match="inputs must have shape"):
        opt.step(state, net, params, (x[:, :, :3], y), np.random.default_rng(0))
    with pytest.raises(ArgumentError, match="rng=0 .*numpy.random.Generator"):
        opt.step(state, net, params, (x, y), 0)


@pytest.mark.parametrize("name,kw", [("kfc-pre", {"lr": 0.01, "stats_period": NEVER,
                                                  "inverse_period": 2}),
                                     ("kfac", {"stats_period": NEVER, "inverse_period": 2})])
@pytest.mark.parametrize("where", ["host", "device"])
def test_nan_factor_stops_the_step_with_the_same_error(name, kw, where, to_xp, xp_name):
    """A NaN in a factor (a diverged run) raises NonFiniteCurvatureError at the next inverse
    refresh on NumPy and on the device alike (the --xp module, or the guarded CuPy stand-in
    under --xp numpy), instead of NaN steps."""
    to_device = (np.asarray if where == "host" else
                 asguarded if xp_name == "numpy" else to_xp)
    net, params, x, y = tiny_problem(10)
    ps = [None if p is None else to_device(p) for p in params]
    opt = make_optimizer(name, **kw)
    rng = np.random.default_rng(0)
    state = opt.initialize_factors(opt.init_state(net, ps), net, ps, [to_device(x)], rng)
    ps, state, _ = opt.step(state, net, ps, (to_device(x), to_device(y)), rng)   # k = 1
    bad = state.factors[1].Gamma.copy()
    bad[0, 0] = np.nan
    state.factors[1] = KroneckerFactors(state.factors[1].Omega, bad,
                                        state.factors[1].num_locations)
    with pytest.raises(NonFiniteCurvatureError, match="layer 1 Gamma"):
        opt.step(state, net, ps, (to_device(x), to_device(y)), rng)            # k = 2: refresh
