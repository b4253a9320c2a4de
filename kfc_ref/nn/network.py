"""Sequential networks: initialisation, forward/backward/forward-mode passes, KFC records, and
the flat parameter vector.

Parameters are a list ``params`` aligned with ``net.layers``: ``params[l]`` is the W_bar matrix
of a parametric layer (I x (1 + J|Delta|), bias column first) and None otherwise.

Flat vector order (the one order used everywhere in kfc_ref): the paper's column-stacking vec of
each W_bar, layer after layer, theta = concat_l vec(W_bar_l), vec(X) = X.ravel(order="F").
In this order the KFC block of layer l is Omega_l kron Gamma_l (Eq. 18) and
(Omega kron Gamma) vec(X) = vec(Gamma X Omega).

Records (``LayerRecord``): what curvature code reads from a parametric layer, per example:
the patches [[A]] (N, |T|, J|Delta|) of its input and the pre-activation derivatives DS
(N, |T|, I) of the *per-example* loss.  The backward pass runs on the *mean* loss, so DS is the
backpropagated dout times N (docs/conventions.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as _host_np  # seeded host initialisation only

from kfc_ref.backend import get_xp, namespace_for
from kfc_ref.nn.expand import expand_homogeneous
from kfc_ref.nn.layers import Context, Layer
from kfc_ref.nn.losses import sample_targets, softmax_cross_entropy

DTYPES = ("float32", "float64")


@dataclass
class LayerRecord:
    """Statistics of one parametric layer for one mini-batch, read on request from what the
    passes hold (the layer's forward cache and the dout of a backward pass).

    ``patches``: [[A]] of the layer input, (N, |T|, J|Delta|); ``DS``: (N, |T|, I) derivatives
    of the per-example loss w.r.t. the layer's pre-activations, ``scale`` (= N) times the
    backpropagated ``dout`` of the mean loss (None until a backward pass ran).  Both are built
    when first read.  KFC's factors need less: :meth:`patch_moments` gives the column sums and
    the Gram matrix of [[A]] without building it (blockwise on NumPy), and
    :meth:`derivative_matrix` the (I, N|T|) matrix DS^T / scale, a view in the network's
    channel-major layout.
    """

    layer_index: int
    layer: object
    cache: object
    dout: object = None
    scale: float = 1.0

    @property
    def patches(self):
        return self.layer.patches(self.cache)

    @functools.cached_property
    def DS(self):
        if self.dout is None:
            return None
        return self.layer.derivatives(self.dout) * self.scale

    @property
    def A_H(self):
        """[[A]]_H = (1 | [[A]]), (N, |T|, 1 + J|Delta|) (Eq. 29)."""
        return expand_homogeneous(self.patches)

    @property
    def num_examples(self) -> int:
        return self.layer.num_examples(self.cache)

    @property
    def num_locations(self) -> int:
        """|T|, the number of output locations of the layer."""
        return self.layer.num_locations(self.cache)

    def patch_moments(self):
        """(sum of the N|T| rows of [[A]], (K,); [[A]]^T [[A]], (K, K))."""
        return self.layer.patch_moments(self.cache)

    def derivative_matrix(self):
        """DS^T / scale: the dout as an (I, N|T|) matrix (None before a backward pass)."""
        return None if self.dout is None else self.layer.derivative_matrix(self.dout)


@dataclass
class Tape:
    """What a forward pass keeps for the backward and forward-mode passes.  ``output`` is in
    the public layout; ``caches`` hold the layers' own (channel-major when ``channel_major``)."""

    output: object
    caches: list
    input_shape: tuple
    channel_major: bool = False


def _swap_leading(a, swap: bool):
    """(N, C, H, W) <-> (C, N, H, W) as a view when ``swap`` and ``a`` is 4-D; else ``a``."""
    if not swap or getattr(a, "ndim", 0) != 4:
        return a
    return a.transpose(1, 0, 2, 3)


class Sequential:
    """A chain of layers on per-example input shape ``input_shape`` (e.g. (1, 28, 28))."""

    def __init__(self, layers: list[Layer], input_shape: tuple):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        self.layers = list(layers)
        self.input_shape = tuple(input_shape)
        shape = self.input_shape
        self.shapes = [shape]                         # per-example shape entering each layer
        for layer in self.layers:
            shape = layer.output_shape(shape)
            self.shapes.append(shape)
        self.param_layers = [i for i, layer in enumerate(self.layers) if layer.has_params]
        #: spatial activations run channel-major when every layer supports it
        self.channel_major = all(getattr(layer, "channel_major", False)
                                 for layer in self.layers)

    # ---------------------------------------------------------------- parameters
    def init(self, seed=0, dtype: str = "float32", device: str = "cpu") -> list:
        """Seeded initial parameters (each layer's ``init_param``) on ``device``."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
        rng = (seed if isinstance(seed, _host_np.random.Generator)
               else _host_np.random.default_rng(seed))
        xp = namespace_for(device)
        params = []
        for layer, shape in zip(self.layers, self.shapes):
            W = layer.init_param(shape, rng, dtype) if layer.has_params else None
            params.append(None if W is None else xp.asarray(W))
        return params

    def param_sizes(self) -> list[tuple[int, tuple]]:
        """(layer index, W_bar shape) for each parametric layer, in flat-vector order."""
        return [(i, self.layers[i].param_shape) for i in self.param_layers]

    @property
    def num_params(self) -> int:
        return sum(s[0] * s[1] for _, s in self.param_sizes())

    def param_slices(self) -> list[slice]:
        """Slice of the flat vector holding vec(W_bar_l), one per parametric layer, in order."""
        slices, offset = [], 0
        for _, (rows, cols) in self.param_sizes():
            slices.append(slice(offset, offset + rows * cols))
            offset += rows * cols
        return slices

    def flatten(self, params):
        """theta = concat_l vec(W_bar_l) (column stacking), shape (P,)."""
        xp = get_xp(*[params[i] for i in self.param_layers])
        return xp.concatenate([xp.transpose(params[i]).reshape(-1) for i in self.param_layers])

    def unflatten(self, theta) -> list:
        """Inverse of :meth:`flatten`: a params list (None for layers without parameters)."""
        xp = get_xp(theta)
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        params, offset = [None] * len(self.layers), 0
        for i, (rows, cols) in self.param_sizes():
            block = theta[offset:offset + rows * cols].reshape(cols, rows)
            params[i] = xp.ascontiguousarray(xp.transpose(block))
            offset += rows * cols
        return params

    def _check_params(self, params):
        if len(params) != len(self.layers):
            raise ValueError(f"params has {len(params)} entries; the network has "
                             f"{len(self.layers)} layers")

    def _check_input(self, x):
        xp = get_xp(x)
        if getattr(x, "ndim", None) != len(self.input_shape) + 1 or \
                tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {getattr(x, 'shape', None)}")
        if x.shape[0] < 1:
            raise ValueError("x must hold at least one example (N >= 1)")
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError("x contains NaN or inf values")

    def _channel_major_for(self, x) -> bool:
        return self.channel_major and x.ndim == 4

    # ---------------------------------------------------------------- passes
    def forward(self, params, x, *, train: bool = False, rng=None, check: bool = True) -> Tape:
        """Run all layers; returns a Tape with the logits (N, C) and every layer's cache.

        Spatial activations run channel-major, (C, N, H, W), inside the network (the layout of
        the paper's GPU code, in which a conv's output W_bar [[A]]_H^T needs no transpose): the
        input is read through a transposed view (the first conv's padding copy converts it) and
        Flatten converts back, so every public array keeps the (N, C, H, W) convention.
        """
        self._check_params(params)
        if check:
            self._check_input(x)
        cm = self._channel_major_for(x)
        ctx = Context(train=train, rng=rng, channel_major=cm)
        caches, h = [], _swap_leading(x, cm)
        for layer, W in zip(self.layers, params):
            h, cache = layer.forward(h, W, ctx)
            caches.append(cache)
        return Tape(_swap_leading(h, cm), caches, tuple(x.shape), cm)

    def evaluate(self, params, x):
        """Logits (N, C) in evaluation mode without a tape: caches are dropped layer by layer
        (no input checks; :meth:`predict_logits` is the chunked, public entry point)."""
        self._check_params(params)
        cm = self._channel_major_for(x)
        ctx = Context(channel_major=cm)
        h = _swap_leading(x, cm)
        for layer, W in zip(self.layers, params):
            h = layer.infer(h, W, ctx)
        return _swap_leading(h, cm)

    def backward(self, params, tape: Tape, dout, *, param_grads: bool = True):
        """Backpropagate ``dout`` (gradient w.r.t. the output) through the tape.

        Returns (grads, douts): grads aligned with params (None for parameter-free layers, and
        for every layer with ``param_grads=False``: the backward pass of the KFC statistics,
        which needs only the douts); douts[l] the gradient w.r.t. the pre-activation output of
        parametric layer l (public layout, a view).  The pass stops at the first parametric
        layer and skips its input gradient, which nothing reads.
        """
        grads = [None] * len(self.layers)
        douts = {}
        dout = _swap_leading(dout, tape.channel_major)
        for i in range(len(self.layers) - 1, self._first_backward_layer - 1, -1):
            dout = self._backward_layer(i, params, tape, dout, grads, douts, param_grads)
        return grads, douts

    @property
    def _first_backward_layer(self) -> int:
        """The backward pass stops at the first parametric layer (nothing before it has a
        gradient to receive)."""
        return self.param_layers[0] if self.param_layers else 0

    def _backward_layer(self, i, params, tape: Tape, dout, grads: list, douts: dict,
                        param_grads: bool = True):
        """One layer of :meth:`backward` (``dout`` in the tape's layout); returns its input
        gradient (None for the first parametric layer)."""
        layer = self.layers[i]
        if not layer.has_params:
            dout, grads[i] = layer.backward(dout, tape.caches[i], params[i])
            return dout
        douts[i] = _swap_leading(dout, tape.channel_major)
        if i == self._first_backward_layer and not param_grads:
            return None
        dout, grads[i] = layer.backward(dout, tape.caches[i], params[i],
                                        input_grad=i > self._first_backward_layer,
                                        weight_grad=param_grads)
        return dout

    def forward_jvp(self, params, x, dparams, *, check: bool = True):
        """The evaluation-mode forward pass and the forward-mode pass in one sweep:
        (logits (N, C), J dparams (N, C) or None when ``dparams`` has no entry), without a
        tape.  Equals ``forward`` then ``jvp`` (:meth:`Layer.forward_jvp`); a conv multiplies
        the patches of its input once by W_bar and dW_bar stacked, a GEMM with 2I rows (the
        exact-Fisher nu of update clipping, App. B.1, costs this one sweep)."""
        self._check_params(params)
        if check:
            self._check_input(x)
        cm = self._channel_major_for(x)
        ctx = Context(channel_major=cm)
        h, d = _swap_leading(x, cm), None
        for i, layer in enumerate(self.layers):
            h, d = layer.forward_jvp(h, d, params[i], dparams[i] if layer.has_params else None,
                                     ctx)
        return _swap_leading(h, cm), _swap_leading(d, cm)

    def jvp(self, params, tape: Tape, dparams):
        """Forward-mode pass: J_theta v for a parameter direction ``dparams`` (list like params).

        Returns d(logits), shape (N, C).  Used for exact Fisher-vector products
        v^T F v = mean_n (J v)_n^T F_R (J v)_n (K-FAC App. J).
        """
        d = None
        for i, layer in enumerate(self.layers):
            dW = dparams[i] if layer.has_params else None
            if d is None and dW is None:
                continue
            d = layer.jvp(d, tape.caches[i], params[i], dW)
        return _swap_leading(d, tape.channel_major)

    # ---------------------------------------------------------------- conveniences
    def loss_and_grads(self, params, x, y, *, train=False, rng=None):
        """Mean cross-entropy on (x, y), its gradient (list like params), and the tape."""
        tape = self.forward(params, x, train=train, rng=rng)
        loss, dlogits = softmax_cross_entropy(tape.output, y)
        grads, _ = self.backward(params, tape, dlogits)
        return loss, grads, tape

    def records(self, tape: Tape, douts: dict) -> list[LayerRecord]:
        """LayerRecords for every parametric layer from a tape and the douts of a backward pass
        on the *mean* loss (DS is scaled by N to per-example derivatives)."""
        n = tape.output.shape[0]
        return [LayerRecord(i, self.layers[i], tape.caches[i], douts.get(i), n)
                for i in self.param_layers]

    def sampled_records(self, params, x, rng, *, tape: Tape | None = None):
        """Records with DS from targets sampled from the model (Section 3.1), one per example.

        Reuses ``tape`` when given (the forward pass of the gradient computation), so the extra
        cost is one backward pass.
        """
        tape = self.forward(params, x) if tape is None else tape
        y_model = sample_targets(tape.output, rng)
        _, dlogits = softmax_cross_entropy(tape.output, y_model)
        _, douts = self.backward(params, tape, dlogits, param_grads=False)
        return self.records(tape, douts)

    def layer_inputs(self, params, x) -> list:
        """The input of every layer (evaluation mode): inputs[l] has shape (N, *shapes[l])."""
        self._check_params(params)
        cm = self._channel_major_for(x)
        ctx = Context(channel_major=cm)
        inputs, h = [], _swap_leading(x, cm)
        for layer, W in zip(self.layers, params):
            inputs.append(_swap_leading(h, cm))
            h = layer.infer(h, W, ctx)
        return inputs

    def predict_logits(self, params, x, batch_size: int = 1000):
        """Logits in evaluation mode, computed in chunks of ``batch_size`` examples."""
        xp = get_xp(x)
        self._check_input(x)
        outs = [self.evaluate(params, x[s:s + batch_size])
                for s in range(0, x.shape[0], batch_size)]
        return xp.concatenate(outs, axis=0)

    def __repr__(self):
        lines = [f"Sequential(input_shape={self.input_shape}, params={self.num_params})"]
        for layer, shape in zip(self.layers, self.shapes[1:]):
            lines.append(f"  {layer!r} -> {shape}")
        return "\n".join(lines)


class stage_runner:
    """:meth:`Sequential.forward` and :meth:`Sequential.backward` one layer at a time, for
    per-stage profiles (``bench conv --profile``): ``forward_next()`` per layer, ``output()``,
    ``start_backward(dlogits)``, then ``backward_next()`` per layer, last to first (a no-op for
    the layers in front of the first parametric one, which the backward pass skips)."""

    def __init__(self, net: Sequential, params, x):
        self.net, self.params = net, params
        cm = net._channel_major_for(x)
        self.tape = Tape(None, [], tuple(x.shape), cm)
        self.ctx = Context(channel_major=cm)
        self.h = _swap_leading(x, cm)

    def forward_next(self):
        i = len(self.tape.caches)
        self.h, cache = self.net.layers[i].forward(self.h, self.params[i], self.ctx)
        self.tape.caches.append(cache)

    def output(self):
        return _swap_leading(self.h, self.tape.channel_major)

    def start_backward(self, dout):
        self.i, self.grads, self.douts = len(self.net.layers) - 1, [None] * len(self.net.layers), {}
        self.d = _swap_leading(dout, self.tape.channel_major)

    def backward_next(self):
        if self.i >= self.net._first_backward_layer:
            self.d = self.net._backward_layer(self.i, self.params, self.tape, self.d,
                                              self.grads, self.douts)
        self.i -= 1
