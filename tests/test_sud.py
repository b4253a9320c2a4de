"""SUD analysis plumbing: derivative images keep the layer's (map, row, column) layout, and the
max- vs average-pool summaries come out per conv layer."""
import numpy as np

from kfc_ref.backend import to_numpy
from kfc_ref.nn.losses import sample_targets, softmax_cross_entropy
from kfc_ref.nn.models import small_convnet
from kfc_ref.theory.sud import conv_layer_indices, derivative_images, sud_analysis


def test_derivative_images_are_the_backpropagated_maps(to_xp):
    net = small_convnet((1, 8, 8), 4, channels=(3, 2))
    params = [to_xp(p) for p in net.init(0, "float64")]
    x = to_xp(np.random.default_rng(0).normal(size=(5, 1, 8, 8)))
    records = net.sampled_records(params, x, np.random.default_rng(7))
    # The same sampled targets, backpropagated by hand.
    tape = net.forward(params, x)
    y = sample_targets(tape.output, np.random.default_rng(7))
    _, dlogits = softmax_cross_entropy(tape.output, y)
    _, douts = net.backward(params, tape, dlogits)
    for rec in records:
        if rec.layer_index in conv_layer_indices(net):
            img = derivative_images(rec, net.shapes[rec.layer_index + 1])
            np.testing.assert_allclose(to_numpy(img), to_numpy(douts[rec.layer_index]) * 5,
                                       rtol=1e-13)


def test_sud_analysis_shapes_and_normalisation(to_xp):
    net = small_convnet((1, 8, 8), 4, channels=(3, 2))
    params = [to_xp(p) for p in net.init(0, "float64")]
    x = to_xp(np.random.default_rng(0).normal(size=(6, 1, 8, 8)))
    results = sud_analysis(net, params, x, np.random.default_rng(1), max_offset=2)
    assert [r.layer_index for r in results] == conv_layer_indices(net)
    first = results[0]
    assert first.derivative_autocorr.shape == (3, 5, 5)
    np.testing.assert_array_equal(to_numpy(first.derivative_autocorr)[:, 2, 2], 1.0)
    assert first.activation_cross.shape == (1, 1)
    assert 0.0 <= float(first.derivative_summary) <= 1.0
