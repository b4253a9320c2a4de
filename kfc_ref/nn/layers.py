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

import numpy as _host_np  # host-side initialisation only (seeded Generators)

from kfc_ref.backend import asarray_like, get_xp
from kfc_ref.nn.keyed_random import draw_uniform
from kfc_ref.nn.conv_products import (
    col2im_of_product,
    conv_product,
    patch_gradient,
    patch_moments,
)
from kfc_ref.nn.expand import (
    ConvGeometry,
    padded_input,
    patch_matrix_of_padded,
    patches_view,
)
from kfc_ref.validate import check_int, check_number


@dataclass
class Context:
    """What a forward pass may need besides its input: the mode and a host random generator."""

    train: bool = False
    rng: _host_np.random.Generator | None = None
    #: spatial activations are (C, N, H, W) instead of (N, C, H, W) (the network's internal
    #: layout; only Conv2d, Flatten and Dropout read it, the other layers act per map)
    channel_major: bool = False


def _channel_major(ctx) -> bool:
    return bool(ctx is not None and ctx.channel_major)


def _check_rank(x, rank: int, layer: str):
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{layer}: input must have rank {rank} "
                         f"(got shape {getattr(x, 'shape', None)})")


class Layer:
    """Base class: a layer without parameters.

    ``channel_major``: the layer accepts (C, N, H, W) activations when ``ctx.channel_major``
    (all layers of kfc_ref do; a layer written for (N, C, H, W) only, e.g. one that mixes
    channels on axis 1, keeps the default False and :class:`Sequential` then runs the whole
    network in the public layout)."""

    has_params = False
    channel_major = False

    def output_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def init_param(self, in_shape, rng, dtype):
        return None

    def forward(self, x, W=None, ctx: Context | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout, cache, W=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, x, W=None, ctx: Context | None = None):
        """Output only (evaluation path, nothing kept for a backward pass)."""
        return self.forward(x, W, ctx)[0]

    def jvp(self, dx, cache, W=None, dW=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_jvp(self, x, dx, W=None, dW=None, ctx: Context | None = None):
        """(output, its tangent) for input tangent ``dx`` and parameter tangent ``dW`` (either
        may be None; the tangent is None when both are): :meth:`forward` then :meth:`jvp`."""
        out, cache = self.forward(x, W, ctx)
        if dx is None and dW is None:
            return out, None
        return out, self.jvp(dx, cache, W, dW)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- Conv2d
@dataclass
class ConvCache:
    """What Conv2d keeps: its input, zero-padded and channel-major, (J, N, H + 2p, W + 2p)
    (:func:`~kfc_ref.nn.expand.padded_input`), the input's shape (in its own layout) and
    whether that layout is channel-major.

    [[A]]^T, |Delta| times larger, is not kept by the forward pass: ``matrix`` builds the
    (J|Delta|, N|T|) matrix on first request (``patches``, read by the theory tools and
    ``LayerRecord.patches``) and keeps it; the backward pass and the KFC statistics use it when
    it exists and otherwise rebuild cache-sized blocks from the padded input.  ``cache[0]`` is
    the (N, |T|, J|Delta|) patches view."""

    padded: object
    geom: ConvGeometry
    input_shape: tuple
    channel_major: bool
    built: object = None

    @property
    def batch(self) -> int:
        return self.input_shape[1] if self.channel_major else self.input_shape[0]

    @property
    def matrix(self):
        """[[A]]^T (J|Delta|, N|T|), gathered once (Eq. 25)."""
        if self.built is None:
            self.built = patch_matrix_of_padded(self.padded, self.geom)
        return self.built

    def __getitem__(self, k):
        return (patches_view(self.matrix, self.batch), self.input_shape)[k]


class Conv2d(Layer):
    """2-D convolution S = [[A]]_H W_bar^T (Eq. 10, 26-29), NCHW in and out by default, and
    (C, N, H, W) in and out when ``ctx.channel_major`` (inside :class:`Sequential`).

    Parameter W_bar: (I, 1 + J*kh*kw), column 0 the bias, then W.reshape(I, J*kh*kw).
    Shapes: x (N, J, H, W) -> s (N, I, Ho, Wo); |T| = Ho*Wo.  All products are single GEMMs
    over the N|T| columns of [[A]]^T.
    """

    channel_major = True

    has_params = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, dilation: int = 1, init_std: float | None = None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.geom = ConvGeometry(kh, kw, stride, padding, dilation)
        self.in_channels = check_int("Conv2d: in_channels", in_channels, minimum=1)
        self.out_channels = check_int("Conv2d: out_channels", out_channels, minimum=1)
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

    def _check(self, x, W, channel_major):
        _check_rank(x, 4, "Conv2d")
        channels = x.shape[0] if channel_major else x.shape[1]
        if channels != self.in_channels:
            raise ValueError(f"Conv2d: input has {channels} channels but the layer's weights "
                             f"expect J={self.in_channels}")
        if tuple(W.shape) != self.param_shape:
            raise ValueError(f"Conv2d: W_bar has shape {tuple(W.shape)}, expected "
                             f"{self.param_shape} (I, 1 + J*kh*kw)")

    @staticmethod
    def _layout(s, channel_major: bool):
        """An (I, N, Ho, Wo) result as is (channel-major) or as an (N, I, Ho, Wo) copy."""
        if channel_major:
            return s
        return get_xp(s).ascontiguousarray(s.transpose(1, 0, 2, 3))

    def forward(self, x, W=None, ctx=None):
        """S^T = W [[A]]^T + b 1^T, one (I x J|Delta|)(J|Delta| x N|T|) product
        (:func:`~kfc_ref.nn.conv_products.conv_product`) -> (I, N, Ho, Wo) in the input's layout."""
        cm = _channel_major(ctx)
        self._check(x, W, cm)
        xpad = padded_input(x, self.geom, cm)
        s = conv_product(xpad, W[:, 1:], self.geom, bias=W[:, 0])
        return self._layout(s, cm), ConvCache(xpad, self.geom, tuple(x.shape), cm)

    @staticmethod
    def derivatives(dout):
        """DS per example: (N, I, Ho, Wo) -> (N, |T|, I)."""
        n, i = dout.shape[:2]
        return dout.reshape(n, i, -1).transpose(0, 2, 1)

    @staticmethod
    def patches(cache):
        """[[A]] (without the ones column) of the cached input: (N, |T|, J|Delta|) (a view)."""
        return cache[0]

    @staticmethod
    def num_examples(cache) -> int:
        return cache.batch

    def num_locations(self, cache) -> int:
        """|T| = Ho Wo."""
        ho, wo = self.geom.output_shape(*cache.input_shape[2:])
        return ho * wo

    def patch_moments(self, cache):
        """(column sums (J|Delta|,), [[A]]^T [[A]]) over the N|T| patch rows, without building
        [[A]]^T unless it exists (:func:`~kfc_ref.nn.conv_products.patch_moments`)."""
        return patch_moments(cache.padded, self.geom, cache.built)

    @staticmethod
    def derivative_matrix(dout):
        """dout (N, I, Ho, Wo) as the (I, N|T|) matrix DS^T: a view of the network's
        channel-major array."""
        return dout.transpose(1, 0, 2, 3).reshape(dout.shape[1], -1)

    @staticmethod
    def _ds_matrix(dout, cache: ConvCache):
        """DS^T as an (I, N|T|) matrix from dout in the cache's layout."""
        if cache.channel_major:
            return dout.reshape(dout.shape[0], -1)
        return Conv2d.derivative_matrix(dout)

    def backward(self, dout, cache, W=None, input_grad: bool = True, weight_grad: bool = True):
        """dW_bar = DS^T [[A]]_H summed over examples (Eq. 28); dx = col2im(W^T DS^T) (Eq. 27).
        Both are products over all N|T| columns (:mod:`kfc_ref.nn.conv_products`: blockwise
        from the padded input on NumPy, single GEMMs elsewhere).  ``input_grad=False`` skips
        dx (returns None): the network's first layer, whose input gradient nobody reads;
        ``weight_grad=False`` skips dW_bar (the backward pass of the KFC statistics)."""
        xp = get_xp(dout, W)
        ds = self._ds_matrix(dout, cache)                         # DS^T, (I, N|T|)
        dW = None
        if weight_grad:
            dW = xp.concatenate([xp.sum(ds, axis=1)[:, None],
                                 patch_gradient(cache.padded, self.geom, ds, cache.built)],
                                axis=1)
        if not input_grad:
            return None, dW
        shape = cache.input_shape
        shape_cm = shape if cache.channel_major else (shape[1], shape[0]) + tuple(shape[2:])
        dx = col2im_of_product(W[:, 1:], ds, shape_cm, self.geom)      # col2im(W^T DS^T)
        return (dx if cache.channel_major else dx.transpose(1, 0, 2, 3)), dW

    def forward_jvp(self, x, dx, W=None, dW=None, ctx=None):
        """s and d s together: the input's patches are gathered once and multiplied by W and
        dW stacked, (2I x J|Delta|), in one GEMM (Eq. 26 and its tangent)."""
        if dW is None:
            return super().forward_jvp(x, dx, W, dW, ctx)
        cm = _channel_major(ctx)
        self._check(x, W, cm)
        xp = get_xp(x, W, dW)
        xpad = padded_input(x, self.geom, cm)
        both = conv_product(xpad, xp.concatenate([W[:, 1:], dW[:, 1:]]), self.geom,
                            bias=xp.concatenate([W[:, 0], dW[:, 0]]))
        s, ds = both[:self.out_channels], both[self.out_channels:]
        if dx is not None:
            ds += conv_product(padded_input(dx, self.geom, cm), W[:, 1:], self.geom)
        return self._layout(s, cm), self._layout(ds, cm)

    def jvp(self, dx, cache, W=None, dW=None):
        """d s = [[dx]] W^T + [[A]]_H dW_bar^T (bilinear in input and parameters)."""
        cm, out = cache.channel_major, None
        if dW is not None:
            out = conv_product(cache.padded, dW[:, 1:], self.geom, bias=dW[:, 0])
        if dx is not None:
            ds = conv_product(padded_input(dx, self.geom, cm), W[:, 1:], self.geom)
            if out is None:
                out = ds
            else:
                out += ds                 # both fresh arrays: no third temporary
        return None if out is None else self._layout(out, cm)


# --------------------------------------------------------------------------- Dense
class Dense(Layer):
    """Fully connected layer s = W_bar [1; a] (K-FAC's layer with |T| = 1, bias first).

    Parameter W_bar: (I, 1 + J).  Shapes: x (N, J) -> s (N, I).
    """

    channel_major = True

    has_params = True

    def __init__(self, in_features: int, out_features: int, init_std: float | None = None):
        self.in_features = check_int("Dense: in_features", in_features, minimum=1)
        self.out_features = check_int("Dense: out_features", out_features, minimum=1)
        self.init_std = init_std

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
        return x @ W[:, 1:].T + W[:, 0], x

    @staticmethod
    def derivatives(dout):
        """DS per example with a single location: (N, I) -> (N, 1, I)."""
        return dout[:, None, :]

    @staticmethod
    def patches(cache):
        """The input as (N, 1, J): a dense layer is a 1x1 conv on a 1x1 map."""
        return cache[:, None, :]

    @staticmethod
    def num_examples(cache) -> int:
        return cache.shape[0]

    @staticmethod
    def num_locations(cache) -> int:
        return 1

    @staticmethod
    def patch_moments(cache):
        """(column sums (J,), A^T A (J, J)) of the (N, J) input."""
        return get_xp(cache).sum(cache, axis=0), cache.T @ cache

    @staticmethod
    def derivative_matrix(dout):
        """dout (N, I) as the (I, N) matrix DS^T (a view)."""
        return dout.T

    def backward(self, dout, cache, W=None, input_grad: bool = True, weight_grad: bool = True):
        xp = get_xp(dout, W)
        dW = None
        if weight_grad:
            dW = xp.concatenate([xp.sum(dout, axis=0)[:, None], dout.T @ cache], axis=1)
        return (dout @ W[:, 1:] if input_grad else None), dW

    def jvp(self, dx, cache, W=None, dW=None):
        out = None
        if dW is not None:
            out = cache @ dW[:, 1:].T + dW[:, 0]
        if dx is not None:
            d = dx @ W[:, 1:].T
            out = d if out is None else out + d
        return out


# --------------------------------------------------------------------------- elementwise
class ReLU(Layer):
    """phi(s) = max(s, 0); derivative 1[s > 0] (0 at s = 0).  The cache is the mask."""

    channel_major = True

    def forward(self, x, W=None, ctx=None):
        return get_xp(x).maximum(x, 0), x > 0

    def backward(self, dout, cache, W=None):
        return dout * cache, None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx * cache


class Tanh(Layer):
    """phi(s) = tanh(s); derivative 1 - tanh(s)^2 (smooth: used by exact tests)."""

    channel_major = True

    def forward(self, x, W=None, ctx=None):
        y = get_xp(x).tanh(x)
        return y, y

    def backward(self, dout, cache, W=None):
        return dout * (1 - cache * cache), None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx * (1 - cache * cache)


class Identity(Layer):
    """phi(s) = s (a linear layer; Theorem 1 tests use it)."""

    channel_major = True

    def forward(self, x, W=None, ctx=None):
        return x, None

    def backward(self, dout, cache, W=None):
        return dout, None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), C-order.  With ``ctx.channel_major`` the input is
    (C, N, H, W) and the output is the same (N, C*H*W) matrix: the network's one conversion
    back from the channel-major layout."""

    channel_major = True

    def output_shape(self, in_shape):
        size = 1
        for s in in_shape:
            size *= s
        return (size,)

    def forward(self, x, W=None, ctx=None):
        cm = _channel_major(ctx) and x.ndim == 4
        return self._flat(x, cm), (x.shape, cm)

    @staticmethod
    def _flat(x, cm):
        if cm:
            x = x.transpose(1, 0, 2, 3)
        return x.reshape(x.shape[0], -1)

    def backward(self, dout, cache, W=None):
        shape, cm = cache
        if not cm:
            return dout.reshape(shape), None
        c, n, h, w = shape
        return dout.reshape(n, c, h, w).transpose(1, 0, 2, 3), None

    def jvp(self, dx, cache, W=None, dW=None):
        return self._flat(dx, cache[1])


class Dropout(Layer):
    """Inverted dropout: in training, keep each unit with probability 1 - rate and scale by
    1/(1 - rate); identity at evaluation.  The mask is drawn from ``ctx.rng`` (a NumPy
    Generator, or a :class:`~kfc_ref.nn.keyed_random.ExampleRandom` that keys each example's
    mask by its row in the global mini-batch), so a seed fixes it on every device."""

    channel_major = True

    def __init__(self, rate: float):
        self.rate = check_number("Dropout: rate", rate, minimum=0.0, maximum=1.0,
                                 exclusive_maximum=True)

    def forward(self, x, W=None, ctx=None):
        if ctx is None or not ctx.train or self.rate == 0.0:
            return x, None
        if ctx.rng is None:
            raise ValueError("Dropout in training mode needs ctx.rng (a numpy Generator or an "
                             "ExampleRandom)")
        cm = ctx.channel_major and x.ndim == 4
        shape = (x.shape[1], x.shape[0]) + tuple(x.shape[2:]) if cm else x.shape
        keep = draw_uniform(ctx.rng, shape, like=x) >= self.rate  # in the public (N, C, ...) order
        if cm:
            keep = keep.transpose(1, 0, 2, 3)
        mask = asarray_like(keep / (1.0 - self.rate), like=x)
        return x * mask, mask

    def backward(self, dout, cache, W=None):
        return (dout if cache is None else dout * cache), None

    def jvp(self, dx, cache, W=None, dW=None):
        return dx if cache is None else dx * cache
