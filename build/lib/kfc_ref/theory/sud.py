"""Measuring the SUD assumption (Appendix D.1, Figures 3 and 4) on a network.

For every conv layer, with targets sampled from the model (Section 3.1), the pre-activation
derivatives DS (N, |T|, I) are viewed as images (N, I, Ho, Wo) and the layer's input activations
as (N, J, H, W).  For each we estimate, with :mod:`kfc_ref.theory.correlation`:

* the spatial autocorrelation of chosen maps as a function of offset (normalised to 1 at offset
  0, offsets up to +-``max_offset``), Figure 3(a)/4(a);
* the cross-map correlation matrix at one location (the centre), Figure 3(b)/4(b);
* a scalar summary: mean |correlation| at non-zero offsets over all maps.

Activations are uncentred, as in Figure 4; derivatives have E[Ds] = 0 under model-sampled
targets, so centring does not matter for them in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import to_numpy
from kfc_ref.theory.correlation import (cross_map_correlation, mean_offcentre_correlation,
                                 spatial_autocorrelation)
from kfc_ref.nn.layers import Conv2d


@dataclass
class LayerSUD:
    """SUD statistics of one conv layer (host NumPy arrays).

    derivative_autocorr: (I, 2R+1, 2R+1); derivative_cross: (I, I);
    activation_autocorr: (J, 2R'+1, 2R'+1); activation_cross: (J, J);
    *_summary: mean |correlation| at non-zero offsets over all maps.
    """

    layer_index: int
    derivative_autocorr: object
    derivative_cross: object
    activation_autocorr: object
    activation_cross: object
    derivative_summary: float
    activation_summary: float


def conv_layer_indices(net) -> list[int]:
    """Indices of the Conv2d layers of a Sequential."""
    return [i for i in net.param_layers if isinstance(net.layers[i], Conv2d)]


def derivative_images(record, out_shape):
    """DS (N, |T|, I) of a conv record -> (N, I, Ho, Wo) with out_shape = (I, Ho, Wo)."""
    n = record.DS.shape[0]
    i, ho, wo = out_shape
    return record.DS.reshape(n, ho, wo, i).transpose(0, 3, 1, 2)


def sud_analysis(net, params, x, rng, max_offset: int = 6) -> list[LayerSUD]:
    """SUD statistics of every conv layer on inputs ``x`` (N, C, H, W), one sampled target per
    example drawn from ``rng`` (a NumPy Generator)."""
    records = {r.layer_index: r for r in net.sampled_records(params, x, rng)}
    inputs = net.layer_inputs(params, x)
    results = []
    for i in conv_layer_indices(net):
        ds = derivative_images(records[i], net.shapes[i + 1])
        act = inputs[i]
        d_auto = spatial_autocorrelation(ds, max_offset)
        a_auto = spatial_autocorrelation(act, max_offset)
        results.append(LayerSUD(
            i, to_numpy(d_auto), to_numpy(cross_map_correlation(ds)),
            to_numpy(a_auto), to_numpy(cross_map_correlation(act)),
            float(mean_offcentre_correlation(d_auto)), float(mean_offcentre_correlation(a_auto))))
    return results


def sud_summary(net, params, x, rng, max_offset: int = 6) -> dict[int, tuple[float, float]]:
    """{conv layer index: (derivative summary, activation summary)} for tracking over training."""
    return {r.layer_index: (r.derivative_summary, r.activation_summary)
            for r in sud_analysis(net, params, x, rng, max_offset)}
