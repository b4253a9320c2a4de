"""Pooling layers: max pooling and average pooling (response normalisation, the other
window layer of the paper's nets, is :mod:`kfc_ref.nn.response_norm`).

They act on each (example, channel) map through the two trailing axes, so they run unchanged on
(N, C, H, W) and on the network's channel-major (C, N, H, W) arrays.  ``ceil_mode=True`` gives
cuda-convnet's pools: the number of outputs per axis is ceil((T - size)/stride) + 1 and windows
at the bottom/right border are partial (32 -> 16 -> 8 -> 4 for size 3, stride 2).
Forward-mode passes (``jvp``) are included because exact Fisher-vector products for update
clipping (App. B.1, B.3) go through these layers.

Each window reduction has two formulations, chosen by :func:`kfc_ref.backend.few_launches`:

* on NumPy, *separable* passes: a size x size window is a 1-D reduction over columns, then over
  rows (2(size-1) strided slice operations instead of size^2; max-pool tracks the winner of
  each pass, its backward routes the derivative back through the two passes);
* elsewhere (CuPy, and the test namespace that stands in for it), *gathers*: one gather of
  every window (clamped at the border, so no padded copy), one reduction, and for the
  backward one scatter-add (:func:`kfc_ref.backend.scatter_add`): a fixed, small number of
  kernel launches.

Max pooling keeps each winner's flat position, so its backward is one scatter-add and its
forward-mode pass one gather on every namespace.

Both are checked against each other and against the loop twins in ``kfc_ref.nn.loops``.
"""
from __future__ import annotations

import math

import numpy as _host_np  # host-side border counts only

from kfc_ref.backend import (
    asarray_like,
    cached_index,
    few_launches,
    flat_index,
    get_xp,
    parallel_rows,
    scatter_add,
)
from kfc_ref.nn.layers import Layer, _check_rank
from kfc_ref.nn.map_blocks import row_blocks, sum_views
from kfc_ref.validate import check_int


def _pool_out(size: int, window: int, stride: int, ceil_mode: bool) -> int:
    if window > size:
        raise ValueError(f"pooling window {window} is larger than the input size {size}")
    steps = (size - window) / stride
    out = (math.ceil(steps) if ceil_mode else math.floor(steps)) + 1
    if (out - 1) * stride >= size:      # ceil mode: a last window must start inside the input
        out -= 1
    return out


def _pad(x, top_left: int, bottom_right_h: int, bottom_right_w: int, value: float):
    """Pad the two trailing axes (``top_left`` before, the others after) with ``value``; a
    C-contiguous copy (``x`` itself when nothing is padded and it is C-contiguous)."""
    xp = get_xp(x)
    a, b, h, w = x.shape
    if top_left == bottom_right_h == bottom_right_w == 0 and x.flags.c_contiguous:
        return x
    out = xp.full((a, b, h + top_left + bottom_right_h, w + top_left + bottom_right_w), value,
                  dtype=x.dtype)
    out[:, :, top_left:top_left + h, top_left:top_left + w] = x
    return out


def _windows(padded_shape, size: int, stride: int, ho: int, wo: int):
    """(shape, element strides) of the (A, B, Ho, Wo, size, size) window view of a
    C-contiguous (A, B, Hp, Wp) array."""
    a, b, hp, wp = padded_shape
    return (a, b, ho, wo, size, size), (b * hp * wp, hp * wp, stride * wp, stride, wp, 1)


def _clamped_windows(xp, in_shape, size: int, stride: int, ho: int, wo: int):
    """Flat positions (A, B, Ho, Wo, size*size) of every window cell in a C-contiguous
    (A, B, H, W) input, rows and columns past the border clamped to the last one (a partial
    window reads a duplicate of one of its own cells, which never changes a max and never
    comes first in row-major order), and the host mask (Ho, Wo, size*size) of the real cells.
    No padded copy is needed."""
    a, b, h, w = in_shape
    r = _host_np.arange(ho)[:, None] * stride + _host_np.arange(size)[None, :]   # (Ho, k)
    c = _host_np.arange(wo)[:, None] * stride + _host_np.arange(size)[None, :]   # (Wo, k)
    valid = ((r < h)[:, None, :, None] & (c < w)[None, :, None, :]).reshape(ho, wo, -1)

    def build():
        within = (_host_np.minimum(r, h - 1)[:, None, :, None] * w
                  + _host_np.minimum(c, w - 1)[None, :, None, :]).reshape(ho, wo, -1)
        maps = _host_np.arange(a * b, dtype=_host_np.int64).reshape(a, b, 1, 1, 1) * (h * w)
        return maps + within[None, None]
    return cached_index(xp, ("clamped-windows", tuple(in_shape), size, stride, ho, wo),
                        build), valid


class _Pool(Layer):
    channel_major = True

    def __init__(self, size: int, stride: int | None = None, ceil_mode: bool = False):
        stride = size if stride is None else stride
        name = type(self).__name__
        self.size = check_int(f"{name}: size", size, minimum=1)
        self.stride = check_int(f"{name}: stride", stride, minimum=1)
        self.ceil_mode = bool(ceil_mode)

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError(f"{type(self).__name__} expects (C, H, W), got {tuple(in_shape)}")
        c, h, w = in_shape
        return (c, _pool_out(h, self.size, self.stride, self.ceil_mode),
                _pool_out(w, self.size, self.stride, self.ceil_mode))

    def _geometry(self, x):
        _check_rank(x, 4, type(self).__name__)
        _, _, h, w = x.shape
        ho = _pool_out(h, self.size, self.stride, self.ceil_mode)
        wo = _pool_out(w, self.size, self.stride, self.ceil_mode)
        extra_h = (ho - 1) * self.stride + self.size - h
        extra_w = (wo - 1) * self.stride + self.size - w
        return ho, wo, max(extra_h, 0), max(extra_w, 0)

    def _cols(self, a, v, wo):
        """Columns v, v + s, ... of ``a`` (one per output column): a strided view."""
        return a[:, :, :, v:v + self.stride * (wo - 1) + 1:self.stride]

    def _rows(self, a, u, ho):
        """Rows u, u + s, ... of ``a`` (one per output row): a strided view."""
        return a[:, :, u:u + self.stride * (ho - 1) + 1:self.stride]


class MaxPool2d(_Pool):
    """Max over each size x size window.  The derivative goes to the first maximiser of each
    window (row-major offset order); padding cells are -inf and never win.

    The forward pass finds each window's winner and keeps its flat position in the padded
    input; the backward pass is then one scatter-add of dout at those positions and the
    forward-mode pass one gather.  On NumPy the winner comes from separable passes,
    m[r, ow] = max_v x[r, s ow + v] (first winner v*), then out = max_u m[s oh + u, ow] (first
    winner u*): the first maximiser in row-major order is (u*, v*(s oh + u*, ow)).  Elsewhere
    it is an argmax over the gathered windows.  ``cache[0]`` is the winner's offset
    u* size + v*.
    """

    def _partial(self, a, axis: int, offset: int, n_out: int):
        """Cells offset, offset + s, ... of ``a`` along ``axis`` (2 or 3) that lie inside it:
        a strided view of at most ``n_out`` entries (fewer for a partial border window)."""
        size = a.shape[axis]
        count = min(n_out, max(0, -(-(size - offset) // self.stride)))
        sl = slice(offset, offset + self.stride * (count - 1) + 1, self.stride)
        return a[:, :, sl] if axis == 2 else a[:, :, :, sl]

    def _winners(self, x, ho, wo, dtype: str = "int64"):
        """(out, offset u*size + v*, flat position in C-contiguous ``x``) of each window's
        first max, by separable passes over strided views (NumPy); partial border windows
        simply have fewer views, so no padded copy is made.  Positions in ``dtype`` (int32
        where they fit: less memory traffic)."""
        xp = get_xp(x)
        k, (a, b, h, w) = self.size, x.shape
        cols = [self._partial(x, 3, v, wo) for v in range(k)]
        m, av = _first_max(cols)
        rows = [self._partial(m, 2, u, ho) for u in range(k)]
        out, au = _first_max(rows)
        # v* of the winning row: av read at row s*oh + u* of the (A, B, H, Wo) row maxima
        u_star = au.astype(dtype)
        at = u_star * wo
        at += flat_index(xp, (a, b, ho, wo), (b * h * wo, h * wo, self.stride * wo, 1),
                         dtype=dtype)
        v_star = xp.take(av.reshape(-1), at)
        arg = u_star * k
        arg += v_star
        where = u_star * w
        where += v_star
        where += flat_index(xp, (a, b, ho, wo), (b * h * w, h * w, self.stride * w, self.stride),
                            dtype=dtype)
        return out, arg, where

    def _winners_threaded(self, x, ho, wo):
        """:meth:`_winners` on blocks of the leading axis, on :func:`parallel_rows` threads
        (NumPy); the flat positions are shifted to the whole input."""
        xp = get_xp(x)
        a, b, h, w = x.shape
        dtype = "int32" if x.size < 2**31 else "int64"
        out = xp.empty((a, b, ho, wo), dtype=x.dtype)
        arg = xp.empty((a, b, ho, wo), dtype=xp.int32)
        where = xp.empty((a, b, ho, wo), dtype=dtype)

        def block(r0, r1):
            o, ar, wh = self._winners(x[r0:r1], ho, wo, dtype)
            out[r0:r1], arg[r0:r1] = o, ar
            xp.add(wh, r0 * b * h * w, out=where[r0:r1])
        parallel_rows(block, a, x.size)
        return out, arg, where

    def forward(self, x, W=None, ctx=None):
        xp = get_xp(x)
        ho, wo, _, _ = self._geometry(x)
        if few_launches(xp):          # one gather of the clamped windows, one argmax
            index, _ = _clamped_windows(xp, x.shape, self.size, self.stride, ho, wo)
            xc = _pad(x, 0, 0, 0, 0.0)
            win = xp.take(xc.reshape(-1), index)
            arg = xp.argmax(win, axis=-1)
            where = xp.take_along_axis(index, arg[..., None], axis=-1)[..., 0]
            return xp.max(win, axis=-1), (arg, where, x.shape, x.shape)
        out, arg, where = self._winners_threaded(x, ho, wo)
        return out, (arg, where, x.shape, x.shape)

    def backward(self, dout, cache, W=None):
        xp = get_xp(dout)
        _, where, padded_shape, (_, _, h, w) = cache
        dxpad = xp.zeros(padded_shape, dtype=dout.dtype)
        scatter_add(dxpad, where, dout)
        return dxpad[:, :, :h, :w], None

    def infer(self, x, W=None, ctx=None):
        xp = get_xp(x)
        ho, wo, _, _ = self._geometry(x)
        if few_launches(xp):
            index, _ = _clamped_windows(xp, x.shape, self.size, self.stride, ho, wo)
            return xp.max(xp.take(_pad(x, 0, 0, 0, 0.0).reshape(-1), index), axis=-1)
        m = _first_max([self._partial(x, 3, v, wo) for v in range(self.size)], False)[0]
        return _first_max([self._partial(m, 2, u, ho) for u in range(self.size)], False)[0]

    def jvp(self, dx, cache, W=None, dW=None):
        """The tangent at each window's winner: one gather at the kept flat positions (NumPy:
        blocks of maps on parallel threads; the positions are global, so blocks are
        independent)."""
        xp = get_xp(dx)
        _, where, (_, _, hp, wp), (_, _, h, w) = cache
        flat = _pad(dx, 0, hp - h, wp - w, 0.0).reshape(-1)
        if few_launches(xp):
            return xp.take(flat, where)
        out = xp.empty(where.shape, dtype=dx.dtype)

        def block(r0, r1):
            xp.take(flat, where[r0:r1], out=out[r0:r1])
        parallel_rows(block, where.shape[0], where.size)
        return out


def _first_max(views, with_index: bool = True):
    """Elementwise max over strided views whose first entries line up (later views may be
    shorter along the last reduced positions: partial border windows), and the index (int8)
    of the first view attaining it: the number of leading views that miss it (byte compares,
    ands and adds only; where a view is absent the max was already attained)."""
    xp = get_xp(views[0])
    best = views[0].copy()
    for v in views[1:]:
        part = best[tuple(slice(0, n) for n in v.shape)]
        xp.maximum(part, v, out=part)
    if not with_index:
        return best, None
    miss = views[0] != best
    first = miss.astype(xp.int8)
    for v in views[1:-1]:
        region = tuple(slice(0, n) for n in v.shape)
        miss[region] &= v != best[region]
        first += miss
    return best, first


class AvgPool2d(_Pool):
    """Mean over each window of the cells that lie inside the input (cuda-convnet divides a
    partial border window by the number of cells it covers)."""

    def __init__(self, size: int, stride: int | None = None, ceil_mode: bool = False):
        super().__init__(size, stride, ceil_mode)
        self._count_cache: dict = {}

    def _counts(self, like, h, w, ho, wo):
        """Cells of the input in each window, (1, 1, Ho, Wo): a product of per-axis counts,
        computed on the host once per input size and namespace."""
        xp = get_xp(like)
        key = (id(xp), str(like.dtype), h, w)
        counts = self._count_cache.get(key)
        if counts is None:
            s, k = self.stride, self.size
            rows = _host_np.array([min(o * s + k, h) - o * s for o in range(ho)], float)
            cols = _host_np.array([min(o * s + k, w) - o * s for o in range(wo)], float)
            counts = asarray_like(_host_np.outer(rows, cols)[None, None], like)
            self._count_cache[key] = counts
        return counts

    def _weights(self, like, h, w, ho, wo):
        """1/count at the real cells of each clamped window, 0 at the duplicates:
        (Ho, Wo, size*size), on the device of ``like``, once per input size."""
        xp = get_xp(like)
        key = ("weights", id(xp), str(like.dtype), h, w)
        weights = self._count_cache.get(key)
        if weights is None:
            _, valid = _clamped_windows(xp, (1, 1, h, w), self.size, self.stride, ho, wo)
            weights = asarray_like(valid / valid.sum(axis=-1, keepdims=True), like)
            self._count_cache[key] = weights
        return weights

    def _average(self, x, ho, wo, eh, ew):
        """Window means of ``x``: on NumPy separable sums over the zero-padded input divided
        by the counts; elsewhere one gather of the clamped windows and a weighted sum."""
        xp = get_xp(x)
        h, w = x.shape[2:]
        if few_launches(xp):
            index, _ = _clamped_windows(xp, x.shape, self.size, self.stride, ho, wo)
            win = xp.take(_pad(x, 0, 0, 0, 0.0).reshape(-1), index)
            return xp.sum(win * self._weights(x, h, w, ho, wo), axis=-1)
        xpad = _pad(x, 0, eh, ew, 0.0)
        r = sum_views([self._cols(xpad, v, wo) for v in range(self.size)])
        out = sum_views([self._rows(r, u, ho) for u in range(self.size)])
        out /= self._counts(x, h, w, ho, wo)
        return out

    def forward(self, x, W=None, ctx=None):
        """NumPy: on blocks of maps in parallel threads."""
        ho, wo, eh, ew = self._geometry(x)
        if few_launches(get_xp(x)):
            out = self._average(x, ho, wo, eh, ew)
        else:
            out = row_blocks(lambda xb: (self._average(xb, ho, wo, eh, ew),), (x,), 1)[0]
        return out, (x.shape, eh, ew, (ho, wo))

    def backward(self, dout, cache, W=None):
        xp = get_xp(dout)
        (a, b, h, w), eh, ew, (ho, wo) = cache
        if few_launches(xp):          # adjoint of the weighted gather: one scatter-add
            index, _ = _clamped_windows(xp, (a, b, h, w), self.size, self.stride, ho, wo)
            dx = xp.zeros((a, b, h, w), dtype=dout.dtype)
            scatter_add(dx, index, dout[..., None] * self._weights(dout, h, w, ho, wo))
            return dx, None
        return row_blocks(lambda d: (self._separable_backward(d, cache),), (dout,), 1)[0], None

    def _separable_backward(self, dout, cache):
        """Adjoint of the separable sums (NumPy), for a block of maps."""
        xp = get_xp(dout)
        (_, _, h, w), eh, ew, (ho, wo) = cache
        a, b = dout.shape[:2]
        g = dout / self._counts(dout, h, w, ho, wo)
        dr = xp.zeros((a, b, h + eh, wo), dtype=dout.dtype)
        for u in range(self.size):
            self._rows(dr, u, ho)[...] += g
        dxpad = xp.zeros((a, b, h + eh, w + ew), dtype=dout.dtype)
        for v in range(self.size):
            self._cols(dxpad, v, wo)[...] += dr
        return dxpad[:, :, :h, :w]

    def jvp(self, dx, cache, W=None, dW=None):
        """The window means of the tangent (linear layer; NumPy: blocks of maps on threads)."""
        _, eh, ew, (ho, wo) = cache
        if few_launches(get_xp(dx)):
            return self._average(dx, ho, wo, eh, ew)
        return row_blocks(lambda d: (self._average(d, ho, wo, eh, ew),), (dx,), 1)[0]
