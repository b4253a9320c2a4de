"""Parametric and elementwise layers with hand-written forward, backward and forward-mode passes.

Every layer has the same small interface (CS231n style, with the parameter passed in):

* ``forward(x, W=None, ctx=None) -> (out, cache)``
* ``backward(dout, cache, W=None) -> (dx, dW)``   (dW is None for layers without parameters)
* ``jvp(dx, cache, W=None, dW=None) -> dout``     forward-mode (Jacobian-vector) product, used
  for exact Fisher-vector products (App. B.1 clipping, App. B.2 quadratic model)
* ``output_shape(in_shape)`` on per-example shapes, ``init_param(in_shape, rng)``.

Parametric layers (``Conv2d``, ``Dense``) hold one matrix W_bar = (b | W) of shape
I x (1 + J|Delta|) with the bias in column 0 (App. A, Eq. 29).  They also say how to read the
two statistics KFC needs from a forward cache and a backward ``dout``:
``patches(cache)`` -> (N, |T|, J|Delta|) and ``derivatives(dout)`` -> DS of shape (N, |T|, I).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as _host_np  # host-side initialisation and dropout masks only (seeded Generators)

from kfc_ref.backend import asarray_like, get_xp
from kfc_ref.nn.expand import ConvGeometry, col2im, im2col, patch_matrix


@dataclass
class Context:
    """What a forward pass may need besides its input: the mode and a host random generator."""

    train: bool = False
    rng: _host_np.random.Generator | None = None


def _check_rank(x, rank: int, layer: str):
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{layer}: input must have rank {rank} "
                         f"(got shape {getattr(x, 'shape', None)})")


class Layer:
    """Base class: a layer without parameters."""

    has_params = False

    def output_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def init_param(self, in_shape, rng, dtype):
        return None

    def forward(self, x, W=None, ctx: Context | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout, cache, W=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def jvp(self, dx, cache, W=None, dW=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- Conv2d
class Conv2d(Layer):
    """2-D convolution S = [[A]]_H W_bar^T (Eq. 10, 26-29), NCHW in and out.

    Parameter W_bar: (I, 1 + J*kh*kw), column 0 the bias, then W.reshape(I, J*kh*kw).
    Shapes: x (N, J, H, W) -> s (N, I, Ho, Wo); |T| = Ho*Wo.
    """

    has_params = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, dilation: int = 1, init_std: float | None = None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.geom = ConvGeometry(kh, kw, stride, padding, dilation)
        for name, val in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Conv2d: {name}={val!r} must be a positive integer")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.init_std = init_std

    @property
    def param_shape(self):
        return (self.out_channels, 1 + self.in_channels * self.geom.num_offsets)

    def output_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"Conv2d expects per-example input (J={self.in_channels}, H, W), "
                             f"got {tuple(in_shape)}")
        ho, wo = self.geom.output_shape(in_shape[1], in_shape[2])
        return (self.out_channels, ho, wo)

    def init_param(self, in_shape, rng, dtype):
        """He-normal weights (std sqrt(2/fan_in)) unless ``init_std`` is given; zero bias."""
        fan_in = self.in_channels * self.geom.num_offsets
        std = self.init_std if self.init_std is not None else (2.0 / fan_in) ** 0.5
        W_bar = _host_np.zeros(self.param_shape, dtype=dtype)
        W_bar[:, 1:] = rng.normal(0.0, std, size=(self.out_channels, fan_in))
        return W_bar

    def _check(self, x, W):
        _check_rank(x, 4, "Conv2d")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: input has {x.shape[1]} channels but the layer's weights "
                             f"expect J={self.in_channels}")
        if tuple(W.shape) != self.param_shape:
            raise ValueError(f"Conv2d: W_bar has shape {tuple(W.shape)}, expected "
                             f"{self.param_shape} (I, 1 + J*kh*kw)")

    def _linear(self, patches, W, n, ho, wo):
        """S = [[A]] W^T + 1 b^T as one GEMM W (I x J|Delta|) [[A]]^T (J|Delta| x N|T|);
        returns (N, I, Ho, Wo)."""
        xp = get_xp(patches, W)
        s = W[:, 1:] @ patch_matrix(patches) + W[:, 0][:, None]      # (I, N|T|)
        return xp.ascontiguousarray(xp.transpose(s.reshape(-1, n, ho, wo), (1, 0, 2, 3)))

    def forward(self, x, W=None, ctx=None):
        self._check(x, W)
        patches = im2col(x, self.geom)
        n, _, h, w = x.shape
        ho, wo = self.geom.output_shape(h, w)
        return self._linear(patches, W, n, ho, wo), (patches, x.shape)

    @staticmethod
    def derivatives(dout):
        """DS per example: (N, I, Ho, Wo) -> (N, |T|, I)."""
        xp = get_xp(dout)
        n, i = dout.shape[:2]
        return xp.transpose(dout.reshape(n, i, -1), (0, 2, 1))

    @staticmethod
    def patches(cache):
        """[[A]] (without the ones column) of the cached input: (N, |T|, J|Delta|)."""
        return cache[0]

    def backward(self, dout, cache, W=None):
        """dW_bar = DS^T [[A]]_H summed over examples (Eq. 28); dx = col2im(DS W) (Eq. 27).
        Both products are single GEMMs over all N|T| rows."""
        xp = get_xp(dout, W)
        patches, in_shape = cache
        i = dout.shape[1]
        ds = xp.transpose(dout, (1, 0, 2, 3)).reshape(i, -1)       # DS^T, (I, N|T|)
        A = patch_matrix(patches)                                  # [[A]]^T, (J|Delta|, N|T|)
        dW = xp.empty(W.shape, dtype=W.dtype)
        dW[:, 0] = xp.sum(ds, axis=1)
        dW[:, 1:] = ds @ xp.transpose(A)
        dA = xp.transpose(W[:, 1:]) @ ds                           # (J|Delta|, N|T|)
        n, t = patches.shape[:2]
        return col2im(xp.transpose(dA.reshape(-1, n, t), (1, 2, 0)), in_shape, self.geom), dW

    def jvp(self, dx, cache, W=None, dW=None):
        """d s = [[dx]] W^T + [[A]]_H dW_bar^T (bilinear in input and parameters)."""
        patches, in_shape = cache
        n, _, h, w = in_shape
        ho, wo = self.geom.output_shape(h, w)
        out = None
        if dW is not None:
            out = self._linear(patches, dW, n, ho, wo)
        if dx is not None:
            xp = get_xp(dx, W)
            zero_bias = xp.zeros(W.shape, dtype=W.dtype)
            zero_bias[:, 1:] = W[:, 1:]
            ds = self._linear(im2col(dx, self.geom), zero_bias, n, ho, wo)
            out = ds if out is None else out + ds
        return out


# --------------------------------------------------------------------------- Dense
class Dense(Layer):
    """Fully connected layer s = W_bar [1; a] (K-FAC's layer with |T| = 1, bias first).

    Parameter W_bar: (I, 1 + J).  Shapes: x (N, J) -> s (N, I).
    """

    has_params = True

    def __init__(self, in_features: int, out_features: int, init_std: float | None = None):
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Dense: {name}={val!r} must be a positive integer")
        self.in_features, self.out_features, self.init_std = in_features, out_features, init_std

    @property
    def param_shape(self):
        return (self.out_features, 1 + self.in_features)

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Dense expects per-example input ({self.in_features},), "
                             f"got {tuple(in_shape)}")
        return (self.out_features,)

    def init_param(self, in_shape, rng, dtype):
        """Glorot-normal-like weights (std sqrt(1/fan_in)) unless ``init_std``; zero bias."""
        std = self.init_std if self.init_std is not None else (1.0 / self.in_features) ** 0.5
        W_bar = _host_np.zeros(self.param_shape, dtype=dtype)
        W_bar[:, 1:] = rng.normal(0.0, std, size=(self.out_features, self.in_features))
        return W_bar

    def forward(self, x, W=None, ctx=None):
        _check_rank(x, 2, "Dense")
        if x.shape[1] != self.in_features or tuple(W.shape) != self.param_shape:
            raise ValueError(f"Dense: input features {x.shape[1]} / W_bar {tuple(W.shape)} do "
                             f"not match J={self.in_features}, W_bar {self.param_shape}")
        xp = get_xp(x, W)
        return x @ xp.transpose(W[:, 1:]) + W[:, 0], x

    @staticmethod
    def derivatives(dout):
        """DS per example with a single location: (N, I) -> (N, 1, I)."""
        return dout[:, None, :]

    @staticmethod
    def patches(cache):
        """The input as (N, 1, J): a dense layer is a 1x1 conv on a 1x1 map."""
        return cache[:, None, :]

    def backward(self, dout, cache, W=None):
        xp = get_xp(dout, W)
        dW = xp.empty(W.shape, dtype=W.dtype)
        dW[:, 0] = xp.sum(dout, axis=0)
        dW[:, 1:] = xp.transpose(dout) @ cache
        return dout @ W[:, 1:], dW

    def jvp(self, dx, cache, W=None, dW=None):
        xp = get_xp(cache, W)
        out = None
        if dW is not None:
            out = cache @ xp.transpose(dW[:, 1:]) + dW[:, 0]
        if dx is not None:
            d = dx @ xp.transpose(W[:, 1:])
            out = d if out is None else out + d
        return out


# --------------------------------------------------------------------------- elementwise
class ReLU(Layer):
    """phi(s) = max(s, 0); derivative 1[s > 0] (0 at s = 0)."""

    def forward(self, x, W=None, ctx=None):
        xp = get_xp(x)
        mask = x > 0
        return xp.where(mask, x, xp.zeros((), dtype=x.dtype)), mask

    def backward(self, dout, cache, W=None):
        return dout * cache, None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx * cache


class Tanh(Layer):
    """phi(s) = tanh(s); derivative 1 - tanh(s)^2 (smooth: used by exact tests)."""

    def forward(self, x, W=None, ctx=None):
        y = get_xp(x).tanh(x)
        return y, y

    def backward(self, dout, cache, W=None):
        return dout * (1 - cache * cache), None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx * (1 - cache * cache)


class Identity(Layer):
    """phi(s) = s (a linear layer; Theorem 1 tests use it)."""

    def forward(self, x, W=None, ctx=None):
        return x, None

    def backward(self, dout, cache, W=None):
        return dout, None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), C-order."""

    def output_shape(self, in_shape):
        size = 1
        for s in in_shape:
            size *= s
        return (size,)

    def forward(self, x, W=None, ctx=None):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, dout, cache, W=None):
        return dout.reshape(cache), None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx.reshape(dx.shape[0], -1)


class Dropout(Layer):
    """Inverted dropout: in training, keep each unit with probability 1 - rate and scale by
    1/(1 - rate); identity at evaluation.  The mask is drawn from ``ctx.rng`` (a NumPy
    Generator), so a seed fixes it on every device."""

    def __init__(self, rate: float):
        if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
            raise ValueError(f"Dropout: rate={rate!r} must be a float in [0, 1)")
        self.rate = float(rate)

    def forward(self, x, W=None, ctx=None):
        if ctx is None or not ctx.train or self.rate == 0.0:
            return x, None
        if ctx.rng is None:
            raise ValueError("Dropout in training mode needs ctx.rng (a numpy Generator)")
        keep = ctx.rng.random(x.shape) >= self.rate
        mask = asarray_like(keep / (1.0 - self.rate), like=x)
        return x * mask, mask

    def backward(self, dout, cache, W=None):
        return (dout if cache is None else dout * cache), None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx if cache is None else dx * cache
