"""Correlation estimators for checking the SUD assumption (Appendix D.1, Figures 3 and 4).

Appendix D.1 of Grosse & Martens (2016) checks the assumption of *spatially uncorrelated
derivatives* (SUD, Section 3: Gamma(i, i', delta) = 0 for delta != 0) by plotting, for each conv
layer of a trained network:

* Figure 3(a, c): the spatial autocorrelation of the pre-activation derivatives ``Ds`` of a few
  feature maps, as a 2-D image indexed by the spatial offset delta (zero offset in the centre);
* Figure 3(b, d): the cross-map correlation matrix of ``Ds`` at one spatial location;
* Figure 4(a, b): the same two views of the layer's input *activations*, with uncentred second
  moments (the Omega statistics).

The paper does not state the exact estimator, normalization, window or location
(neither Appendix D.1 nor the figure captions do); this module implements the following reading
of the figures [I]:

* spatial panel of map c:  E[f_{c,t} f_{c,t+delta}] / E[f_{c,t}^2], averaged over the examples and
  over every location t for which t and t + delta are both in the grid, for |delta_k| <= 6
  (the rendered panels are about 13 x 13 offsets);
* cross-map panel:  E[f_c f_c'] / sqrt(E[f_c^2] E[f_c'^2]) at one fixed location, over examples.

The figures show *absolute values*; the functions here return signed correlations and the
caller takes ``abs`` for plotting (:func:`mean_offcentre_correlation` already does).

Every input is a *field* of shape (N, C, H, W): N examples, C feature maps on an H x W spatial
grid, e.g. a conv layer's pre-activation derivatives reshaped to images (if they are stored as
(N, H*W, I) with locations row-major: ``DS.reshape(N, H, W, I).transpose(0, 3, 1, 2)``), or the
layer's input activations (already NCHW).
Fields must have a real floating dtype; results have the field's dtype and live in the field's
array namespace (NumPy or CuPy, via :func:`kfc_ref.backend.get_xp`).  Use
:func:`kfc_ref.backend.to_numpy` before plotting.

Degenerate maps.  A correlation is undefined for a map whose second moment is exactly zero (an
all-zero map, or with ``centered=True`` a map that is constant over examples and locations, e.g.
the derivatives of a dead unit).  Such maps get NaN in every entry that involves them (their
whole autocorrelation panel; their row and column of the cross-map matrix).  The division is
guarded, so no RuntimeWarning is emitted.  Maps that are merely tiny are *not* special-cased.

Centering.  For the derivatives with targets sampled from the model's predictive distribution,
E[Ds] = 0 (the expected score is zero), so centred and uncentred estimators agree in
expectation and the default ``centered=False`` is the paper's Gamma-based quantity.  Activations
(Figure 4) are not zero-mean; the paper uses the uncentred Omega there, i.e. also the default.
"""
from __future__ import annotations

import numbers

from kfc_ref.backend import get_xp

__all__ = [
    "spatial_autocorrelation",
    "spatial_crosscorrelation",
    "cross_map_correlation",
    "mean_offcentre_correlation",
]

#: The paper's Figure 3/4 panels span about +-6 offsets per axis (13 x 13), read off the figures.
DEFAULT_MAX_OFFSET = 6


# --------------------------------------------------------------------------- validation

def _check_field(field, name: str = "field"):
    shape = getattr(field, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array of shape (N, C, H, W); "
                        f"got an object of type {type(field).__name__}")
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4, shape (N, C, H, W) = (examples, feature maps, "
                         f"height, width); got rank {len(shape)} with shape {tuple(shape)}")
    if any(int(s) < 1 for s in shape):
        raise ValueError(f"{name} must have every dimension >= 1; got shape {tuple(shape)}")
    kind = getattr(getattr(field, "dtype", None), "kind", None)
    if kind != "f":
        raise TypeError(f"{name} must have a real floating dtype (float32 or float64); "
                        f"got dtype {getattr(field, 'dtype', None)}")


def _check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int; got {value!r} "
                        f"of type {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return int(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} of type "
                        f"{type(value).__name__}")
    return value


def _guarded_ratio(xp, num, den):
    """num / den where den > 0, NaN where den == 0, without a division-by-zero warning.

    ``den`` has to broadcast against ``num``; both are second moments (den >= 0).
    """
    ok = den > 0
    one = xp.ones_like(den)
    ratio = num / xp.where(ok, den, one)
    nan = xp.full(ratio.shape, float("nan"), dtype=ratio.dtype)
    return xp.where(ok, ratio, nan)


# --------------------------------------------------------------------------- estimators

def spatial_autocorrelation(field, max_offset: int = DEFAULT_MAX_OFFSET, *,
                            centered: bool = False):
    """Spatial autocorrelation of every feature map (Appendix D.1, Figure 3(a, c), Figure 4(a)).

    Parameters
    ----------
    field : array, shape (N, C, H, W), real floating dtype
        N examples of C feature maps on an H x W grid (pre-activation derivatives DS for
        Figure 3, input activations for Figure 4).
    max_offset : int >= 0, default 6
        Largest offset per axis.  The window is clipped to the grid: the offsets used are
        |d1| <= R1 = min(max_offset, H - 1) and |d2| <= R2 = min(max_offset, W - 1), since an
        offset as large as the map has no pair of locations inside it.  So a map smaller than
        the window gives a smaller (and, if H != W, non-square) panel; a 1 x 1 map gives 1 x 1.
    centered : bool, default False
        If True, subtract each map's mean (over examples and locations) first, giving the
        autocorrelation of the fluctuations.  The paper's quantities are uncentred (for
        derivatives under model-sampled targets E[Ds] = 0, so both agree in expectation).

    Returns
    -------
    array, shape (C, 2*R1 + 1, 2*R2 + 1), dtype of ``field``, namespace of ``field``
        ``out[c, R1 + d1, R2 + d2]`` = mean over n and over all t with t and t + d inside the
        grid of f[n, c, t] f[n, c, t + d], divided by the mean of f[n, c, t]^2 over all n, t.
        The centre ``out[c, R1, R2]`` is exactly 1 and ``out[c, R1 + d1, R2 + d2]`` equals
        ``out[c, R1 - d1, R2 - d2]`` exactly.  Maps whose second moment is zero (all-zero maps;
        with ``centered=True`` also constant maps) are NaN in every entry.

    Notes
    -----
    Each offset's numerator is the average of N (H - |d1|)(W - |d2|) products, so the large
    offsets are noisier (and, unlike the "biased" time-series estimator, not shrunk towards 0).
    For white noise the off-centre entries have standard deviation about
    1 / sqrt(N (H - |d1|)(W - |d2|)).  Sums are accumulated in the field's dtype.
    """
    _check_field(field)
    max_offset = _check_nonneg_int(max_offset, "max_offset")
    centered = _check_bool(centered, "centered")
    xp = get_xp(field)
    n, c, h, w = (int(s) for s in field.shape)
    r1 = min(max_offset, h - 1)
    r2 = min(max_offset, w - 1)

    f = field
    if centered:
        f = f - xp.mean(f, axis=(0, 2, 3), keepdims=True)

    # Second moment at offset 0: E[f_t^2] over examples and all locations, shape (C,).
    den = xp.sum(f * f, axis=(0, 2, 3)) / (n * h * w)

    num = xp.zeros((c, 2 * r1 + 1, 2 * r2 + 1), dtype=field.dtype)
    # r(d) = r(-d) exactly (same products), so compute the half plane d1 > 0 or (d1 = 0, d2 >= 0).
    for d1 in range(r1 + 1):
        a1 = slice(0, h - d1)          # t1 with t1 + d1 < h
        b1 = slice(d1, h)              # t1 + d1
        for d2 in range(-r2 if d1 > 0 else 0, r2 + 1):
            if d2 >= 0:
                a2, b2 = slice(0, w - d2), slice(d2, w)
            else:
                a2, b2 = slice(-d2, w), slice(0, w + d2)
            prod = f[:, :, a1, a2] * f[:, :, b1, b2]
            count = n * (h - d1) * (w - abs(d2))
            m = xp.sum(prod, axis=(0, 2, 3)) / count
            num[:, r1 + d1, r2 + d2] = m
            num[:, r1 - d1, r2 - d2] = m

    out = _guarded_ratio(xp, num, den[:, None, None])
    # The centre is num == den up to summation order; make it exactly 1 (x / x == 1 in IEEE
    # arithmetic for finite x != 0), NaN for degenerate maps.
    out[:, r1, r2] = _guarded_ratio(xp, den, den)
    return out


def spatial_crosscorrelation(field, other, max_offset: int = DEFAULT_MAX_OFFSET):
    """Spatial correlation between two fields of the same shape, map by map (uncentred).

    ``out[c, R1 + d1, R2 + d2]`` = mean over n and over the t with t, t + d in the grid of
    f[n, c, t] g[n, c, t + d], divided by sqrt(E[f_c^2] E[g_c^2]) (second moments over all n,
    t).  With ``other = field`` this is :func:`spatial_autocorrelation` up to round-off.  Its use
    is the *shuffled-example baseline* of the SUD report: ``other = field[perm]`` pairs each
    example with a different one, so every entry estimates E[f_t] E[f_{t+d}] / E[f^2] (zero for
    zero-mean derivatives) and its spread is the sampling noise of the real panel.

    Parameters and window as :func:`spatial_autocorrelation`; ``other`` must have the shape and
    dtype of ``field``.  Returns (C, 2*R1 + 1, 2*R2 + 1), NaN for maps where either second
    moment is zero.  All (2R1+1)(2R2+1) offsets are computed (no symmetry: f and g differ).
    """
    _check_field(field)
    _check_field(other, "other")
    if tuple(other.shape) != tuple(field.shape) or other.dtype != field.dtype:
        raise ValueError(f"other must have the shape and dtype of field {tuple(field.shape)} "
                         f"{field.dtype}; got {tuple(other.shape)} {other.dtype}")
    max_offset = _check_nonneg_int(max_offset, "max_offset")
    xp = get_xp(field, other)
    n, c, h, w = (int(s) for s in field.shape)
    r1, r2 = min(max_offset, h - 1), min(max_offset, w - 1)
    den = xp.sqrt(xp.sum(field * field, axis=(0, 2, 3)) * xp.sum(other * other, axis=(0, 2, 3))
                  ) / (n * h * w)
    num = xp.zeros((c, 2 * r1 + 1, 2 * r2 + 1), dtype=field.dtype)
    for d1 in range(-r1, r1 + 1):
        a1, b1 = (slice(0, h - d1), slice(d1, h)) if d1 >= 0 else (slice(-d1, h),
                                                                    slice(0, h + d1))
        for d2 in range(-r2, r2 + 1):
            a2, b2 = (slice(0, w - d2), slice(d2, w)) if d2 >= 0 else (slice(-d2, w),
                                                                        slice(0, w + d2))
            prod = field[:, :, a1, a2] * other[:, :, b1, b2]
            num[:, r1 + d1, r2 + d2] = xp.sum(prod, axis=(0, 2, 3)) / (
                n * (h - abs(d1)) * (w - abs(d2)))
    return _guarded_ratio(xp, num, den[:, None, None])


def cross_map_correlation(field, location=None, *, centered: bool = False):
    """Correlation matrix of the C feature maps at one location (Appendix D.1, Fig. 3(b, d), 4(b)).

    Parameters
    ----------
    field : array, shape (N, C, H, W), real floating dtype
        N examples of C feature maps (derivatives DS for Figure 3, activations for Figure 4).
    location : (int, int) or None
        The spatial position (row, column), 0 <= row < H, 0 <= column < W (negative indices are
        rejected).  Default: the centre (H // 2, W // 2).  The paper does not say which position
        it used.
    centered : bool, default False
        False: uncentred, E[f_c f_c'] / sqrt(E[f_c^2] E[f_c'^2]) over examples (the paper's
        Gamma(i, i', 0) normalised, or Omega for activations).  True: subtract each map's mean
        over the examples at that location first (Pearson correlation).  For derivatives under
        model-sampled targets E[Ds] = 0, so the two agree in expectation.

    Returns
    -------
    array, shape (C, C), dtype and namespace of ``field``
        Symmetric, diagonal exactly 1 for non-degenerate maps.  A map whose second moment at
        the location is zero (always zero there; or constant over examples when centred) has
        NaN in its whole row and column, diagonal included.
    """
    _check_field(field)
    centered = _check_bool(centered, "centered")
    xp = get_xp(field)
    n, c, h, w = (int(s) for s in field.shape)
    if location is None:
        row, col = h // 2, w // 2
    else:
        try:
            row, col = location
        except (TypeError, ValueError):
            raise ValueError(f"location must be None or a pair (row, column); got {location!r}"
                             ) from None
        for name, v, size in (("row", row, h), ("column", col, w)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < size:
                raise ValueError(
                    f"location {name} must be an int in [0, {size - 1}] for a field of shape "
                    f"{tuple(field.shape)}; got location={location!r}")
        row, col = int(row), int(col)

    x = field[:, :, row, col]                       # (N, C)
    if centered:
        x = x - xp.mean(x, axis=0, keepdims=True)
    moment = (x.T @ x) / n                          # (C, C): E[f_c f_c']
    var = xp.diagonal(moment)                       # (C,): E[f_c^2]
    scale = xp.sqrt(var)
    # Divide by each scale in turn (not by their product, which could under/overflow).
    out = _guarded_ratio(xp, _guarded_ratio(xp, moment, scale[:, None]), scale[None, :])
    out = (out + out.T) / 2                         # exactly symmetric (a + b == b + a)
    idx = xp.arange(c)
    out[idx, idx] = _guarded_ratio(xp, var, var)    # exactly 1, or NaN for a degenerate map
    return out


def mean_offcentre_correlation(autocorr):
    """Mean absolute correlation over the non-zero offsets (per-layer SUD summary, App. D.1).

    Parameters
    ----------
    autocorr : array, shape (C, 2*R1 + 1, 2*R2 + 1) or (2*R1 + 1, 2*R2 + 1)
        Output of :func:`spatial_autocorrelation` (all maps of a layer, or one map); both
        panel sizes must be odd, zero offset in the centre.

    Returns
    -------
    0-d array, dtype and namespace of ``autocorr``
        Mean of |autocorr[c, i, j]| over the maps and all offsets except the centre; 0 means
        SUD holds exactly in the sample, 1 means perfect spatial correlation.  NaN maps
        (degenerate, see :func:`spatial_autocorrelation`) are left out; NaN if every map is
        NaN or the panel has no off-centre offset (1 x 1, from a 1 x 1 feature map).  A map
        with any NaN entry counts as degenerate.  Use
        ``float(...)`` to get a Python number (this synchronizes on a GPU).
    """
    shape = getattr(autocorr, "shape", None)
    if shape is None:
        raise TypeError("autocorr must be an array of shape (C, 2R1+1, 2R2+1); got an object "
                        f"of type {type(autocorr).__name__}")
    if len(shape) == 2:
        autocorr = autocorr[None]
        shape = autocorr.shape
    if len(shape) != 3:
        raise ValueError("autocorr must have rank 3, shape (C, 2R1+1, 2R2+1), or rank 2 for one "
                         f"map; got rank {len(shape)} with shape {tuple(shape)}")
    c, p1, p2 = (int(s) for s in shape)
    if c < 1 or p1 % 2 == 0 or p2 % 2 == 0:
        raise ValueError("autocorr must have C >= 1 maps and odd panel sizes (2R+1, zero offset "
                         f"at the centre); got shape {tuple(shape)}")
    xp = get_xp(autocorr)
    a = xp.abs(autocorr)                             # a copy: safe to edit
    a[:, p1 // 2, p2 // 2] = 0                       # drop the zero offset
    valid = ~xp.any(xp.isnan(a), axis=(1, 2))        # (C,): maps without NaN
    n_off = p1 * p2 - 1
    total = xp.sum(xp.where(valid[:, None, None], a, xp.zeros_like(a)))
    count = xp.sum(valid.astype(a.dtype)) * n_off
    return _guarded_ratio(xp, total, count)
