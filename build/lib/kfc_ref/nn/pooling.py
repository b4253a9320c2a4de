"""Spatial layers without parameters: max pooling, average pooling, response normalisation.

All three are written as loops over window offsets with strided slicing (no scatter-add), so
they run unchanged on CuPy.  ``ceil_mode=True`` gives cuda-convnet's pools: the number of outputs
per axis is ceil((T - size)/stride) + 1 and windows at the bottom/right border are partial
(32 -> 16 -> 8 -> 4 for size 3, stride 2).  Forward-mode passes (``jvp``) are included because
exact Fisher-vector products for update clipping (App. B.1, B.3) go through these layers.
"""
from __future__ import annotations

import math

from kfc_ref.backend import get_xp
from kfc_ref.nn.expand import pad_spatial
from kfc_ref.nn.layers import Layer, _check_rank


def _pool_out(size: int, window: int, stride: int, ceil_mode: bool) -> int:
    if window > size:
        raise ValueError(f"pooling window {window} is larger than the input size {size}")
    steps = (size - window) / stride
    out = (math.ceil(steps) if ceil_mode else math.floor(steps)) + 1
    if (out - 1) * stride >= size:      # ceil mode: a last window must start inside the input
        out -= 1
    return out


class _Pool(Layer):
    def __init__(self, size: int, stride: int | None = None, ceil_mode: bool = False):
        stride = size if stride is None else stride
        for name, val in (("size", size), ("stride", stride)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{type(self).__name__}: {name}={val!r} must be a positive "
                                 "integer")
        self.size, self.stride, self.ceil_mode = size, stride, bool(ceil_mode)

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

    @staticmethod
    def _pad_bottom_right(x, eh, ew, value):
        if eh == 0 and ew == 0:
            return x
        xp = get_xp(x)
        n, c, h, w = x.shape
        out = xp.full((n, c, h + eh, w + ew), value, dtype=x.dtype)
        out[:, :, :h, :w] = x
        return out

    def _window(self, u, v, ho, wo):
        s = self.stride
        return slice(u, u + s * (ho - 1) + 1, s), slice(v, v + s * (wo - 1) + 1, s)

    def _offsets(self):
        for u in range(self.size):
            for v in range(self.size):
                yield u * self.size + v, u, v


class MaxPool2d(_Pool):
    """Max over each size x size window.  The derivative goes to the first maximiser of each
    window (row-major offset order); padding cells are -inf and never win."""

    def forward(self, x, W=None, ctx=None):
        xp = get_xp(x)
        ho, wo, eh, ew = self._geometry(x)
        xpad = self._pad_bottom_right(x, eh, ew, -xp.inf)
        best = arg = None
        for k, u, v in self._offsets():
            r, s = self._window(u, v, ho, wo)
            cand = xpad[:, :, r, s]
            if best is None:
                best = cand.copy()
                arg = xp.zeros(cand.shape, dtype=xp.int32)
            else:
                better = cand > best
                best = xp.where(better, cand, best)
                arg = xp.where(better, xp.asarray(k, dtype=xp.int32), arg)
        return best, (arg, x.shape, eh, ew)

    def backward(self, dout, cache, W=None):
        xp = get_xp(dout)
        arg, (n, c, h, w), eh, ew = cache
        ho, wo = dout.shape[2:]
        dxpad = xp.zeros((n, c, h + eh, w + ew), dtype=dout.dtype)
        zero = xp.zeros((), dtype=dout.dtype)
        for k, u, v in self._offsets():
            r, s = self._window(u, v, ho, wo)
            dxpad[:, :, r, s] += xp.where(arg == k, dout, zero)
        return dxpad[:, :, :h, :w], None

    def jvp(self, dx, cache, W=None, dW=None):
        xp = get_xp(dx)
        arg, _, eh, ew = cache
        ho, wo = arg.shape[2:]
        dxpad = self._pad_bottom_right(dx, eh, ew, 0.0)
        out = xp.zeros(arg.shape, dtype=dx.dtype)
        for k, u, v in self._offsets():
            r, s = self._window(u, v, ho, wo)
            out = xp.where(arg == k, dxpad[:, :, r, s], out)
        return out


class AvgPool2d(_Pool):
    """Mean over each window of the cells that lie inside the input (cuda-convnet divides a
    partial border window by the number of cells it covers)."""

    def _sum_windows(self, xpad, ho, wo):
        out = None
        for _, u, v in self._offsets():
            r, s = self._window(u, v, ho, wo)
            out = xpad[:, :, r, s].copy() if out is None else out + xpad[:, :, r, s]
        return out

    def _counts(self, like, h, w, ho, wo, eh, ew):
        xp = get_xp(like)
        ones = xp.ones((1, 1, h, w), dtype=like.dtype)
        return self._sum_windows(self._pad_bottom_right(ones, eh, ew, 0.0), ho, wo)

    def forward(self, x, W=None, ctx=None):
        ho, wo, eh, ew = self._geometry(x)
        counts = self._counts(x, x.shape[2], x.shape[3], ho, wo, eh, ew)
        out = self._sum_windows(self._pad_bottom_right(x, eh, ew, 0.0), ho, wo) / counts
        return out, (x.shape, eh, ew, counts)

    def backward(self, dout, cache, W=None):
        xp = get_xp(dout)
        (n, c, h, w), eh, ew, counts = cache
        ho, wo = dout.shape[2:]
        g = dout / counts
        dxpad = xp.zeros((n, c, h + eh, w + ew), dtype=dout.dtype)
        for _, u, v in self._offsets():
            r, s = self._window(u, v, ho, wo)
            dxpad[:, :, r, s] += g
        return dxpad[:, :, :h, :w], None

    def jvp(self, dx, cache, W=None, dW=None):
        _, eh, ew, counts = cache
        ho, wo = counts.shape[2:]
        return self._sum_windows(self._pad_bottom_right(dx, eh, ew, 0.0), ho, wo) / counts


class ResponseNorm(Layer):
    """cuda-convnet ``rnorm``: y = x / (1 + scale/size^2 * sum_{size x size window} x^2)^power.

    The window is centred (offsets -(size//2) .. size-1-size//2 on each axis), within one map,
    and cells outside the map contribute 0.  Default constants are the CIFAR-10 "18%" net's
    (size 3, scale 5e-5, power 0.75).  Writing D = 1 + c * box(x^2) with c = scale/size^2:
    dx = dout * D^-p - 2 c p x * box^T(dout * x * D^(-p-1)).
    """

    def __init__(self, size: int = 3, scale: float = 5e-5, power: float = 0.75):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"ResponseNorm: size={size!r} must be a positive integer")
        if not scale >= 0 or not power >= 0:
            raise ValueError(f"ResponseNorm: scale={scale!r} and power={power!r} must be >= 0")
        self.size, self.scale, self.power = size, float(scale), float(power)

    def _box(self, z, transpose=False):
        """Sum of z over the window around each cell (or the transposed window)."""
        lo = -(self.size // 2)
        offsets = range(lo, lo + self.size)
        pad = self.size
        zpad = pad_spatial(z, pad)
        h, w = z.shape[2:]
        out = None
        for du in offsets:
            for dv in offsets:
                a, b = (-du, -dv) if transpose else (du, dv)
                part = zpad[:, :, pad + a:pad + a + h, pad + b:pad + b + w]
                out = part.copy() if out is None else out + part
        return out

    def forward(self, x, W=None, ctx=None):
        _check_rank(x, 4, "ResponseNorm")
        c = self.scale / self.size ** 2
        denom = 1 + c * self._box(x * x)
        scale = denom ** (-self.power)
        return x * scale, (x, denom, scale)

    def backward(self, dout, cache, W=None):
        x, denom, scale = cache
        c = self.scale / self.size ** 2
        inner = dout * x * scale / denom
        return dout * scale - 2 * c * self.power * x * self._box(inner, transpose=True), None

    def jvp(self, dx, cache, W=None, dW=None):
        x, denom, scale = cache
        c = self.scale / self.size ** 2
        return dx * scale - 2 * c * self.power * x * scale / denom * self._box(x * dx)
