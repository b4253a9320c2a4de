"""cuda-convnet's response normalisation (``rnorm``), the CIFAR-10 net's normalisation layer
(Section 5): a window sum of squares within each map, separable on NumPy and one gather of the
windows elsewhere (:func:`kfc_ref.backend.few_launches`), with forward-mode passes for update
clipping (App. B.1, B.3).  Checked against ``kfc_ref.nn.loops.response_norm_loops``.
"""
from __future__ import annotations

import numpy as _host_np  # host-side constant weights only

from kfc_ref.backend import cached_index, few_launches, get_xp, strided_gather
from kfc_ref.nn.layers import Layer, _check_rank
from kfc_ref.nn.map_blocks import row_blocks, sum_views
from kfc_ref.validate import check_int, check_number


class ResponseNorm(Layer):
    """cuda-convnet ``rnorm``: y = x / (1 + scale/size^2 * sum_{size x size window} x^2)^power.

    The window is centred (offsets -(size//2) .. size-1-size//2 on each axis), within one map,
    and cells outside the map contribute 0.  Default constants are the CIFAR-10 "18%" net's
    (size 3, scale 5e-5, power 0.75).  Writing D = 1 + c * box(x^2) with c = scale/size^2:
    dx = dout * D^-p - 2 c p x * box^T(dout * x * D^(-p-1)).  The box sum is separable (a
    1-D sum over columns, then over rows) on NumPy and one window gather times a constant
    vector elsewhere; its field is written straight into a zero-bordered buffer (``out=``).
    """

    channel_major = True

    def __init__(self, size: int = 3, scale: float = 5e-5, power: float = 0.75):
        self.size = check_int("ResponseNorm: size", size, minimum=1)
        self.scale = check_number("ResponseNorm: scale", scale, minimum=0.0)
        self.power = check_number("ResponseNorm: power", power, minimum=0.0)

    def _padded(self, z):
        """A zero (A, B, H + 2 lo, W + 2 lo) array (lo = size // 2, the widest reach of the
        window and of its transpose) and its interior view, into which the caller writes the
        field to be box-summed."""
        xp = get_xp(z)
        a, b, h, w = z.shape
        lo = self.size // 2
        buf = xp.zeros((a, b, h + 2 * lo, w + 2 * lo), dtype=z.dtype)
        return buf, buf[:, :, lo:lo + h, lo:lo + w]

    def _box(self, buf, h, w, transpose=False, weight: float = 1.0):
        """``weight`` times the sum over the window around each cell (or the transposed
        window) of the field held in the interior of ``buf`` (from :meth:`_padded`).  NumPy:
        separable, 2(size-1) additions and a scaling; elsewhere one gather of every window and
        one product with the constant weight vector."""
        xp = get_xp(buf)
        lo = self.size // 2
        offsets = range(-lo, self.size - lo)
        starts = [lo - d if transpose else lo + d for d in offsets]
        if few_launches(xp):
            first, wp = min(starts), buf.shape[3]
            a, b, hp, _ = buf.shape
            shape = (a, b, h, w, self.size, self.size)
            strides = (b * hp * wp, hp * wp, wp, 1, wp, 1)
            win = strided_gather(buf, shape, strides, offset=first * wp + first)
            ones = cached_index(xp, ("box", self.size, weight, str(buf.dtype)),
                                lambda: _host_np.full(self.size ** 2, weight, buf.dtype))
            return win.reshape(a, b, h, w, -1) @ ones
        r = sum_views([buf[:, :, :, s:s + w] for s in starts])
        out = sum_views([r[:, :, s:s + h] for s in starts])
        if weight != 1.0:
            out *= weight
        return out

    def _forward(self, x):
        """(y, D, D^-p) of an (A, B, H, W) block."""
        xp = get_xp(x)
        c = self.scale / self.size ** 2
        buf, inner = self._padded(x)
        xp.multiply(x, x, out=inner)
        denom = self._box(buf, *x.shape[2:], weight=c)
        denom += 1
        scale = denom ** (-self.power)
        return x * scale, denom, scale

    def _backward(self, dout, x, denom, scale):
        xp = get_xp(dout)
        c = self.scale / self.size ** 2
        g = dout * scale
        buf, inner = self._padded(x)
        xp.multiply(g, x, out=inner)
        inner /= denom
        t = self._box(buf, *x.shape[2:], transpose=True, weight=2 * c * self.power)
        t *= x
        g -= t
        return (g,)

    def forward(self, x, W=None, ctx=None):
        """NumPy: on blocks of maps in parallel threads (the windows stay inside a map)."""
        _check_rank(x, 4, "ResponseNorm")
        if few_launches(get_xp(x)):
            y, denom, scale = self._forward(x)
        else:
            y, denom, scale = row_blocks(self._forward, (x,), 3)
        return y, (x, denom, scale)

    def backward(self, dout, cache, W=None):
        x, denom, scale = cache
        if few_launches(get_xp(dout)):
            return self._backward(dout, x, denom, scale)[0], None
        return row_blocks(self._backward, (dout, x, denom, scale), 1)[0], None

    def _tangent(self, dx, x, denom, scale):
        """dy = dx D^-p - 2 c p x D^-p box(x dx) / D of a block of maps."""
        xp = get_xp(dx)
        c = self.scale / self.size ** 2
        buf, inner = self._padded(x)
        xp.multiply(x, dx, out=inner)
        t = self._box(buf, *x.shape[2:], weight=2 * c * self.power)
        t *= x
        t *= scale
        t /= denom
        return (dx * scale - t,)

    def jvp(self, dx, cache, W=None, dW=None):
        """NumPy: on blocks of maps in parallel threads."""
        if few_launches(get_xp(dx)):
            return self._tangent(dx, *cache)[0]
        return row_blocks(self._tangent, (dx, *cache), 1)[0]

    def forward_jvp(self, x, dx, W=None, dW=None, ctx=None):
        """NumPy, with a tangent: y and dy of each block of maps in one thread hand-off."""
        if dx is None or few_launches(get_xp(x)):
            return super().forward_jvp(x, dx, W, dW, ctx)
        _check_rank(x, 4, "ResponseNorm")

        def both(xb, db):
            y, denom, scale = self._forward(xb)
            return y, self._tangent(db, xb, denom, scale)[0]
        return row_blocks(both, (x, dx), 2)
