"""Sequential: whole-network gradient with every layer type, flat-vector order, records."""
import numpy as np
import pytest
from hypothesis import assume, given

from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, ReLU, Tanh
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.nn.models import build_model, cifar10_convnet, small_convnet, tiny_convnet
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm
from kfc_ref.backend import get_xp, to_numpy
from finite_differences import EPS, FD_RTOL, directional_fd
from strategies import seeds


def every_layer_net():
    """One of each layer type, tiny: conv (stride 2) -> max-pool -> ReLU -> rnorm -> conv ->
    tanh -> avg-pool -> dropout -> flatten -> dense."""
    return Sequential([
        Conv2d(2, 3, 3, stride=1, padding=1), MaxPool2d(3, 2, ceil_mode=True), ReLU(),
        ResponseNorm(3, 1.0, 0.75), Conv2d(3, 4, 2, stride=1, padding=1), Tanh(),
        AvgPool2d(3, 2, ceil_mode=True), Dropout(0.3), Flatten(), Dense(16, 5)], (2, 7, 7))


def _same_piece(net, theta_a, theta_b, x, seed):
    tapes = [net.forward(net.unflatten(t), x, train=True, rng=np.random.default_rng(seed))
             for t in (theta_a, theta_b)]
    for layer, ca, cb in zip(net.layers, tapes[0].caches, tapes[1].caches):
        if isinstance(layer, ReLU) and not np.array_equal(ca, cb):
            return False
        if isinstance(layer, MaxPool2d) and not np.array_equal(ca[0], cb[0]):
            return False
    return True


@given(seed=seeds)
def test_whole_network_gradient_matches_finite_differences(to_xp, seed):
    net = every_layer_net()
    params = net.init(seed, "float64")
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(3, 2, 7, 7)), rng.integers(0, 5, 3)
    dx, dy = to_xp(x), to_xp(y)
    # Dropout in training mode with a fixed mask: re-seed the generator on every call.
    def loss_at(theta):
        tape = net.forward(net.unflatten(to_xp(theta)), dx, train=True,
                           rng=np.random.default_rng(seed))
        return float(softmax_cross_entropy(tape.output, dy)[0])
    _, grads, _ = net.loss_and_grads([to_xp(p) for p in params], dx, dy, train=True,
                                     rng=np.random.default_rng(seed))
    theta, g = net.flatten(params), to_numpy(net.flatten(grads))
    v = rng.normal(size=theta.shape)
    # ReLU and max-pool are piecewise smooth: skip the rare direction whose +-eps points land
    # on different pieces (a different ReLU mask or max-pool winner), where no finite
    # difference approximates the one-sided derivative.
    assume(_same_piece(net, theta + EPS * v, theta - EPS * v, x, seed))
    fd, an = directional_fd(loss_at, theta, v), float(g @ v)
    assert abs(fd - an) <= FD_RTOL * max(1.0, abs(an))


def test_flat_vector_is_column_stacking_and_round_trips(to_xp):
    net = tiny_convnet()
    params = net.init(0, "float64")
    d_theta = net.flatten([to_xp(p) for p in params])
    theta = to_numpy(d_theta)
    assert theta.shape == (net.num_params,)
    first = params[net.param_layers[0]]
    np.testing.assert_array_equal(theta[:first.size], first.ravel(order="F"))
    back = net.unflatten(d_theta)
    for a, b in zip(params, back):
        assert (a is None and b is None) or np.array_equal(a, to_numpy(b))
    with pytest.raises(ValueError, match="theta must have shape"):
        net.unflatten(theta[:-1])


def test_records_hold_patches_and_per_example_derivatives(to_xp):
    """DS of the mean-loss backward times N equals the per-example loss derivative."""
    net = tiny_convnet()
    params = [to_xp(p) for p in net.init(1, "float64")]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 1, 6, 6)), rng.integers(0, 3, 4)
    x, y = to_xp(x), to_xp(y)
    tape = net.forward(params, x)
    _, dlogits = softmax_cross_entropy(tape.output, y)
    _, douts = net.backward(params, tape, dlogits)
    records = net.records(tape, douts)
    assert [r.layer_index for r in records] == net.param_layers
    # Example 0 alone: its loss gradient w.r.t. the last layer's pre-activation is p - onehot.
    single = net.forward(params, x[:1])
    _, d0 = softmax_cross_entropy(single.output, y[:1])
    np.testing.assert_allclose(to_numpy(records[-1].DS[0, 0]), to_numpy(d0[0]), rtol=1e-12)
    assert records[0].A_H.shape == (4, 36, 10)
    np.testing.assert_array_equal(to_numpy(records[0].A_H[:, :, 0]), 1.0)


def test_seeded_init_is_reproducible_and_models_have_the_documented_shapes(device, xp):
    a = cifar10_convnet().init(3, device=device)
    b = cifar10_convnet().init(3, device=device)
    assert all(get_xp(p) is xp for p in a if p is not None)
    assert all(np.array_equal(to_numpy(p), to_numpy(q)) for p, q in zip(a, b) if p is not None)
    net = cifar10_convnet()
    assert [s[1] for s in net.shapes if len(s) == 3][::1][:1] == [32]
    spatial = [s[1:] for s in net.shapes if len(s) == 3]
    assert (16, 16) in spatial and (8, 8) in spatial and spatial[-1] == (4, 4)
    assert small_convnet((1, 8, 8)).shapes[-1] == (10,)
    assert build_model("small", (1, 28, 28), 10).shapes[-1] == (10,)
    assert build_model("small", (3, 32, 32), 10).shapes[-1] == (10,)
    with pytest.raises(ValueError, match="arch='nope' is not supported"):
        build_model("nope", (1, 8, 8), 10)


def test_channel_major_engine_keeps_the_public_conventions(to_xp):
    """Inside Sequential activations are (C, N, H, W); outputs, gradients, records, jvp and
    layer inputs equal a layer-by-layer run in the public (N, C, H, W) layout (where the first
    layer's input gradient is computed and thrown away), and the tape-free evaluation path
    gives the same logits.  Both runs on the --xp module, compared on the host."""
    def close(a, b, **tol):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), **tol)

    net = every_layer_net()
    params = [None if p is None else to_xp(p) for p in net.init(5, "float64")]
    rng = np.random.default_rng(5)
    x, y = to_xp(rng.normal(size=(3, 2, 7, 7))), to_xp(rng.integers(0, 5, 3))
    tape = net.forward(params, x)
    assert tape.channel_major
    h, caches = x, []
    for layer, W in zip(net.layers, params):
        h, cache = layer.forward(h, W)
        caches.append(cache)
    close(tape.output, h, rtol=1e-12)
    close(net.evaluate(params, x), h, rtol=1e-12)
    close(net.predict_logits(params, x, batch_size=2), h, rtol=1e-12)
    _, dlogits = softmax_cross_entropy(tape.output, y)
    grads, douts = net.backward(params, tape, dlogits)
    d, ref_grads, ref_douts = dlogits, [None] * len(net.layers), {}
    for i in range(len(net.layers) - 1, -1, -1):
        if net.layers[i].has_params:
            ref_douts[i] = d
        d, ref_grads[i] = net.layers[i].backward(d, caches[i], params[i])
    for i in net.param_layers:
        close(grads[i], ref_grads[i], rtol=1e-10, atol=1e-14)
        close(douts[i], ref_douts[i], rtol=1e-10, atol=1e-14)
    for rec, i in zip(net.records(tape, douts), net.param_layers):
        np.testing.assert_array_equal(to_numpy(rec.patches),
                                      to_numpy(net.layers[i].patches(caches[i])))
        close(rec.DS, net.layers[i].derivatives(ref_douts[i]) * 3, rtol=1e-10, atol=1e-14)
    inputs = net.layer_inputs(params, x)
    assert [tuple(a.shape[1:]) for a in inputs] == [tuple(s) for s in net.shapes[:-1]]
    np.testing.assert_array_equal(to_numpy(inputs[0]), to_numpy(x))
    dparams = [None if p is None else to_xp(rng.normal(size=p.shape)) for p in params]
    jv, dd = net.jvp(params, tape, dparams), None
    for layer, W, dW, cache in zip(net.layers, params, dparams, caches):
        if dd is not None or dW is not None:
            dd = layer.jvp(dd, cache, W, dW)
    close(jv, dd, rtol=1e-10, atol=1e-14)


def test_a_layer_written_for_nchw_only_keeps_the_network_in_the_public_layout(to_xp):
    """A custom layer that does not declare ``channel_major`` (it may read axis 1 as the
    channels) makes Sequential run every layer on (N, C, H, W) arrays."""
    from kfc_ref.nn.layers import Layer

    class ChannelScale(Layer):              # scales channel c by c + 1: needs axis 1 = C
        def forward(self, x, W=None, ctx=None):
            scale = get_xp(x).arange(1, x.shape[1] + 1).reshape(1, -1, 1, 1)
            return x * scale, scale

        def backward(self, dout, cache, W=None):
            return dout * cache, None

    net = Sequential([Conv2d(2, 3, 3, padding=1), ChannelScale(), Flatten(), Dense(27, 2)],
                     (2, 3, 3))
    assert not net.channel_major and every_layer_net().channel_major
    params = [None if p is None else to_xp(p) for p in net.init(0, "float64")]
    x = to_xp(np.random.default_rng(0).normal(size=(2, 2, 3, 3)))
    tape = net.forward(params, x)
    assert not tape.channel_major
    h = x
    for layer, W in zip(net.layers, params):
        h, _ = layer.forward(h, W)
    np.testing.assert_allclose(to_numpy(tape.output), to_numpy(h), rtol=1e-12)


def test_statistics_backward_and_records_read_what_the_passes_hold(to_xp):
    """The KFC statistics' backward (param_grads=False) gives the same douts as the gradient's
    and no weight gradients; the records' Omega and Gamma, from patch moments and the douts
    matrix (neither [[A]] nor DS built), equal those from the built patches and DS
    (float64: the same sums in another order)."""
    from kfc_ref.curvature.factors import gamma_from_derivatives, network_factors, \
        omega_from_patches
    net = every_layer_net()
    params = [None if p is None else to_xp(p) for p in net.init(7, "float64")]
    rng = np.random.default_rng(7)
    x, y = to_xp(rng.normal(size=(4, 2, 7, 7))), to_xp(rng.integers(0, 5, 4))
    tape = net.forward(params, x)
    _, dlogits = softmax_cross_entropy(tape.output, y)
    grads, douts = net.backward(params, tape, dlogits)
    no_grads, stat_douts = net.backward(params, tape, dlogits, param_grads=False)
    assert all(g is None for g in no_grads) and sorted(stat_douts) == sorted(douts)
    for i in douts:
        np.testing.assert_array_equal(to_numpy(stat_douts[i]), to_numpy(douts[i]))
    records = net.records(tape, stat_douts)
    factors = network_factors(records)
    for rec, f in zip(records, factors):
        assert rec.num_examples == 4 and rec.num_locations == rec.patches.shape[1]
        np.testing.assert_allclose(to_numpy(f.Omega), to_numpy(omega_from_patches(rec.patches)),
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(to_numpy(f.Gamma), to_numpy(gamma_from_derivatives(rec.DS)),
                                   rtol=1e-12, atol=1e-13)
        assert f.num_locations == rec.num_locations
    # negative control: dropping the N scale of the douts is caught
    rec = records[0]
    wrong = gamma_from_derivatives(rec.layer.derivatives(rec.dout))
    assert not np.allclose(to_numpy(wrong), to_numpy(factors[0].Gamma))


@given(seed=seeds)
def test_fused_forward_and_forward_mode_sweep_equals_the_two_passes(to_xp, seed):
    """Sequential.forward_jvp (evaluation mode, no tape; a conv multiplies its patches by W
    and dW stacked) equals forward then jvp, with every layer or only the last one moving;
    nothing moving gives no tangent."""
    net = every_layer_net()
    params = [None if p is None else to_xp(p) for p in net.init(seed, "float64")]
    rng = np.random.default_rng(seed)
    x = to_xp(rng.normal(size=(3, 2, 7, 7)))
    full = [None if p is None else to_xp(rng.normal(size=p.shape)) for p in params]
    last_only = [None] * (len(params) - 1) + [full[-1]]
    tape = net.forward(params, x)
    for dparams in (full, last_only):
        logits, tangent = net.forward_jvp(params, x, dparams)
        np.testing.assert_allclose(to_numpy(logits), to_numpy(tape.output), rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(to_numpy(tangent), to_numpy(net.jvp(params, tape, dparams)),
                                   rtol=1e-10, atol=1e-13)
    assert net.forward_jvp(params, x, [None] * len(params))[1] is None
    # negative control: the tangent of a direction with one layer's entry dropped differs,
    # so the comparison above sees every layer's contribution
    dropped = [None if i == net.param_layers[0] else d for i, d in enumerate(full)]
    assert not np.allclose(to_numpy(net.forward_jvp(params, x, full)[1]),
                           to_numpy(net.jvp(params, tape, dropped)), rtol=1e-6)
