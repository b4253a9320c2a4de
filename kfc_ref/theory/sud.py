"""Measuring the SUD assumption (Appendix D.1, Figures 3 and 4) on a network.

For every conv layer, with targets sampled from the model (Section 3.1), the pre-activation
derivatives DS (N, |T|, I) are viewed as images (N, I, Ho, Wo) and the layer's input activations
as (N, J, H, W).  For each of these two *fields* we estimate, with
:mod:`kfc_ref.theory.correlation`:

* the spatial autocorrelation of every map as a function of offset (normalised to 1 at offset
  0, offsets up to +-``max_offset``), Figure 3(a)/4(a);
* the cross-map correlation matrix at one location (the centre), Figure 3(b)/4(b);
* the mean |correlation| on each ring of offsets max(|d1|, |d2|) = r, r = 1..R, and over all
  non-zero offsets (the per-layer summary);
* dead maps: maps identically zero on all N examples (a ReLU unit that never fires gives an
  all-zero derivative map).  Their correlations are undefined (NaN) and they are left out of
  every average; the count is reported;
* a shuffled-example baseline: the same statistics between example n and example pi(n), pi a
  random derangement.  Different examples are independent, so the baseline is what the
  estimator gives without any within-example correlation: the sampling noise (about
  sqrt(2/pi) / sqrt(N (Ho - r)(Wo - r)) for a zero-mean field) plus, for uncentred activations,
  the part explained by the mean E[f_t] E[f_{t+d}].  Numbers near it are not signal.

Activations are uncentred, as in Figure 4; derivatives have E[Ds] = 0 under model-sampled
targets, so centring does not matter for them in expectation.

:func:`sud_layer_summaries` is the cheap JSON-ready version (no panels kept) for recording the
summary during training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as _host_np  # host-side permutation and summaries only

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.nn.layers import Conv2d
from kfc_ref.theory.correlation import (DEFAULT_MAX_OFFSET, cross_map_correlation,
                                        mean_offcentre_correlation, spatial_autocorrelation,
                                        spatial_crosscorrelation)


@dataclass
class FieldSUD:
    """SUD statistics of one field (derivatives or activations) of a conv layer; host arrays.

    autocorr (C, 2R1+1, 2R2+1); cross (C, C); dead (C,) bool; profile and baseline_profile
    (R,) with R = max(R1, R2): mean |corr.| over live maps on ring r = 1..R; summary and
    baseline_summary: over all non-zero offsets; cross_offdiag and cross_baseline: mean |corr.|
    over pairs c != c' of live maps (NaN when fewer than two are live).
    """

    autocorr: object
    cross: object
    dead: object
    profile: object
    baseline_profile: object
    summary: float
    baseline_summary: float
    cross_offdiag: float
    cross_baseline: float

    @property
    def num_dead(self) -> int:
        return int(self.dead.sum())

    def to_json(self) -> dict:
        def num(v):
            v = float(v)
            return v if _host_np.isfinite(v) else None
        return {"maps": int(self.dead.size), "dead_maps": self.num_dead,
                "dead_map_indices": [int(i) for i in _host_np.flatnonzero(self.dead)],
                "mean_abs_corr": num(self.summary),
                "mean_abs_corr_by_offset": [num(v) for v in self.profile],
                "shuffled_baseline": num(self.baseline_summary),
                "shuffled_baseline_by_offset": [num(v) for v in self.baseline_profile],
                "cross_map_mean_abs_offdiag": num(self.cross_offdiag),
                "cross_map_shuffled_baseline": num(self.cross_baseline)}


@dataclass
class LayerSUD:
    """SUD statistics of one conv layer: ``derivatives`` (output maps I) and ``activations``
    (input maps J), each a :class:`FieldSUD`."""

    layer_index: int
    derivatives: FieldSUD
    activations: FieldSUD

    # The names used by the figures, the tour and the notebooks.
    derivative_autocorr = property(lambda self: self.derivatives.autocorr)
    derivative_cross = property(lambda self: self.derivatives.cross)
    activation_autocorr = property(lambda self: self.activations.autocorr)
    activation_cross = property(lambda self: self.activations.cross)
    derivative_summary = property(lambda self: self.derivatives.summary)
    activation_summary = property(lambda self: self.activations.summary)


def conv_layer_indices(net) -> list[int]:
    """Indices of the Conv2d layers of a Sequential."""
    return [i for i in net.param_layers if isinstance(net.layers[i], Conv2d)]


def derivative_images(record, out_shape):
    """DS (N, |T|, I) of a conv record -> (N, I, Ho, Wo) with out_shape = (I, Ho, Wo)."""
    n = record.DS.shape[0]
    i, ho, wo = out_shape
    return record.DS.reshape(n, ho, wo, i).transpose(0, 3, 1, 2)


def dead_maps(field):
    """(C,) host bool: maps of ``field`` (N, C, H, W) that are exactly zero on every example and
    location (second moment 0).  Exact zero is what a dead ReLU unit produces; tiny maps are
    not dead."""
    xp = get_xp(field)
    return to_numpy(xp.sum(field * field, axis=(0, 2, 3)) == 0)


def ring_profile(autocorr, dead=None):
    """(R,) mean |corr.| on the rings max(|d1|, |d2|) = r, r = 1..R of a (C, 2R1+1, 2R2+1)
    panel stack (host), over the maps without NaN and not flagged in ``dead``; NaN entries of
    an empty average."""
    a = _host_np.abs(_host_np.asarray(autocorr, dtype=_host_np.float64))
    _, p1, p2 = a.shape
    r1, r2 = p1 // 2, p2 // 2
    keep = ~_host_np.isnan(a).any(axis=(1, 2))
    if dead is not None:
        keep &= ~_host_np.asarray(dead, dtype=bool)
    d1, d2 = _host_np.meshgrid(_host_np.arange(-r1, r1 + 1), _host_np.arange(-r2, r2 + 1),
                               indexing="ij")
    ring = _host_np.maximum(abs(d1), abs(d2))
    out = _host_np.full(max(r1, r2), _host_np.nan)
    if keep.any():
        for r in range(1, max(r1, r2) + 1):
            out[r - 1] = a[keep][:, ring == r].mean()
    return out


def _offdiag_mean(cross, keep):
    """Mean |entry| over pairs c != c' of kept maps (host); NaN when fewer than two."""
    m = _host_np.abs(_host_np.asarray(cross, dtype=_host_np.float64))[_host_np.ix_(keep, keep)]
    k = m.shape[0]
    return float((m.sum() - _host_np.trace(m)) / (k * (k - 1))) if k >= 2 else float("nan")


def derangement(n: int, rng) -> _host_np.ndarray:
    """A random permutation of range(n) without fixed points (n >= 2): a random cyclic order,
    each example paired with the next one in it."""
    order = rng.permutation(n)
    partner = _host_np.empty(n, dtype=_host_np.int64)
    partner[order] = _host_np.roll(order, -1)
    return partner


def field_sud(field, max_offset: int, partner, location=None) -> FieldSUD:
    """All statistics of one field (N, C, H, W); ``partner`` (N,) host: the derangement used
    for the shuffled baseline (None: no baseline, NaN there)."""
    xp = get_xp(field)
    dead = dead_maps(field)
    live = ~dead
    auto = spatial_autocorrelation(field, max_offset)
    cross = to_numpy(cross_map_correlation(field, location))
    base_auto, base_cross = None, float("nan")
    if partner is not None:
        other = field[xp.asarray(partner)]
        base_auto = to_numpy(spatial_crosscorrelation(field, other, max_offset))
        h, w = field.shape[2:]
        row, col = location if location is not None else (h // 2, w // 2)
        a, b = field[:, :, row, col], other[:, :, row, col]
        scale = xp.sqrt(xp.sum(a * a, axis=0))                      # same for a and b
        safe = xp.where(scale > 0, scale, xp.ones_like(scale))
        base_cross = _offdiag_mean(to_numpy((xp.transpose(a) @ b) / safe[:, None]
                                            / safe[None, :]), live & to_numpy(scale > 0))
    auto_host = to_numpy(auto)
    r = max(auto_host.shape[1], auto_host.shape[2]) // 2
    nan_profile = _host_np.full(r, _host_np.nan)
    summary = float(mean_offcentre_correlation(auto))
    if base_auto is not None:
        masked = base_auto.copy()
        masked[dead] = _host_np.nan
        base_summary = (float(mean_offcentre_correlation(masked)) if live.any()
                        else float("nan"))
    else:
        base_summary = float("nan")
    return FieldSUD(auto_host, cross, dead, ring_profile(auto_host, dead),
                    nan_profile if base_auto is None else ring_profile(base_auto, dead),
                    summary, base_summary,
                    _offdiag_mean(cross, live & ~_host_np.isnan(_host_np.diag(cross))),
                    base_cross)


def sud_analysis(net, params, x, rng, max_offset: int = DEFAULT_MAX_OFFSET, *,
                 baseline: bool = True, location=None) -> list[LayerSUD]:
    """SUD statistics of every conv layer on inputs ``x`` (N, C, H, W), one sampled target per
    example drawn from ``rng`` (a NumPy Generator); then, with ``baseline``, one derangement of
    the N examples (N >= 2) from the same ``rng`` for the shuffled baseline.  ``location``: the
    cross-map location (default: each grid's centre)."""
    records = {r.layer_index: r for r in net.sampled_records(params, x, rng)}
    inputs = net.layer_inputs(params, x)
    n = int(x.shape[0])
    partner = derangement(n, rng) if baseline and n >= 2 else None
    results = []
    for i in conv_layer_indices(net):
        ds = derivative_images(records[i], net.shapes[i + 1])
        results.append(LayerSUD(i, field_sud(ds, max_offset, partner, location),
                                field_sud(inputs[i], max_offset, partner, location)))
    return results


def summaries_to_json(results: list[LayerSUD], net) -> list[dict]:
    """JSON-ready per-layer summaries: layer name conv<k>, index, grid sizes, and for the
    derivatives and the activations :meth:`FieldSUD.to_json`."""
    return [{"layer": f"conv{k + 1}", "layer_index": r.layer_index,
             "input_shape": list(net.shapes[r.layer_index]),
             "output_shape": list(net.shapes[r.layer_index + 1]),
             "derivatives": r.derivatives.to_json(), "activations": r.activations.to_json()}
            for k, r in enumerate(results)]


def sud_layer_summaries(net, params, x, rng, max_offset: int = DEFAULT_MAX_OFFSET) -> list[dict]:
    """Per-conv-layer SUD summary of (net, params, x) as JSON-ready dicts (see
    :func:`summaries_to_json`): mean |corr.| per offset ring and overall, dead maps, shuffled
    baseline, for derivatives (targets sampled from ``rng``) and input activations.

    Cost: one forward and one backward pass on x plus O(R^2) elementwise products per field;
    e.g. 256 CIFAR-10 images at R = 6 take about a second on one CPU core.  Meant to be called
    every k evaluations during training on a fixed set of held-out images.
    """
    return summaries_to_json(sud_analysis(net, params, x, rng, max_offset), net)


def sud_summary(net, params, x, rng, max_offset: int = DEFAULT_MAX_OFFSET
                ) -> dict[int, tuple[float, float]]:
    """{conv layer index: (derivative summary, activation summary)} for tracking over training
    (no baseline; see :func:`sud_layer_summaries` for the full record)."""
    return {r.layer_index: (r.derivative_summary, r.activation_summary)
            for r in sud_analysis(net, params, x, rng, max_offset, baseline=False)}
