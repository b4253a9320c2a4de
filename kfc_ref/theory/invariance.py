"""Theorem 3: KFC updates are invariant to pointwise affine reparameterizations (Sec. 4, App. E.2).

The transformed network N-dagger replaces each elementwise nonlinearity phi by (Eq. 24)

    A-dagger = phi(S-dagger U + 1 c^T) V + 1 d^T,

where the |T| x I matrices act *pointwise across feature maps*: U (I x I) mixes the I output maps
of the preceding parametric layer, V mixes the maps of the activations, c and d shift them.  The
input is treated as an activation function phi_0 without argument (only V_0, d_0), and the logits
are left alone apart from (U_L, c_L) (V_L = I, d_L = 0).  :class:`AffineWrapped` is that layer.

Lemma 2 (Eq. 84) gives parameters of N-dagger computing the same function as N:

    W_bar-dagger = U^-T (W_bar - c e^T) [[V]]_H^-T,   e = (1, 0, ..., 0)^T,

with (Eqs. 79-81), for a parametric layer whose K = J m input columns are ordered j m + delta
(m = |Delta| for a conv, m = H W for a Dense after Flatten of (J, H, W), m = 1 after a Dense):

    [[V]]_H = [[1, d^T kron 1_m^T], [0, V kron I_m]]   ((1 + K) x (1 + K)),

because [[A V + 1 d^T]]_H = [[A]]_H [[V]]_H.  **Padding caveat** (E.2 ignores padding): with zero
padding the padded entries of [[A]] stay 0 instead of becoming d_j, so Eq. 79 fails at border
patches when d != 0.  Shifts d are therefore only allowed in front of unpadded ("valid") convs
and dense layers; :func:`dagger_params` raises otherwise, and :func:`random_reparameterization`
draws d = 0 there.  Pointwise *linear* maps and the pre-nonlinearity shifts c (absorbed by the
bias, which is never padded) are unaffected.

Theorem 3 then says one undamped KFC step (Omega-dagger = [[V]]_H^T Omega [[V]]_H, Gamma-dagger =
U Gamma U^T, Eqs. 98-105) on N-dagger, mapped back, is the KFC step on N.  The theorem excludes
damping; :func:`preconditioned_update` also offers SGD, a diagonal Fisher and damped KFC, which
serve as negative controls (they must break invariance for non-orthogonal U, V).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as _host_np  # host-side random draws only (seeded Generators)

from kfc_ref.backend import asarray_like, get_xp
from kfc_ref.curvature.damping import eigen_factors, factored_inverse
from kfc_ref.curvature.factors import network_factors
from kfc_ref.curvature.fisher import layer_gradient_vectors
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Identity, Layer, ReLU, Tanh
from kfc_ref.nn.losses import log_softmax
from kfc_ref.nn.network import Sequential

ELEMENTWISE = (Tanh, ReLU, Identity)
METHODS = ("kfc", "kfc-damped", "sgd", "diagonal-fisher")


def _mix(x, M):
    """Right-multiply the feature-map axis (axis 1) by M: per location, the row x_t -> x_t M.

    x: (N, I, H, W) or (N, I); M: (I, I') -> same layout with I' maps."""
    xp = get_xp(x, M)
    return xp.moveaxis(xp.moveaxis(x, 1, -1) @ M, -1, 1)


def _shift(x, c):
    """x + 1 c^T on the feature-map axis."""
    return x + c.reshape((1, -1) + (1,) * (x.ndim - 2))


@dataclass
class PointwiseAffine:
    """(U, c, V, d) of Eq. 24 for one activation function with I feature maps (all I x I / I)."""

    U: object
    c: object
    V: object
    d: object

    @staticmethod
    def identity(num_maps: int, like) -> PointwiseAffine:
        xp = get_xp(like)
        eye = xp.eye(num_maps, dtype=like.dtype)
        zero = xp.zeros(num_maps, dtype=like.dtype)
        return PointwiseAffine(eye, zero, eye, zero)


class AffineWrapped(Layer):
    """phi-dagger(S) = phi(S U + 1 c^T) V + 1 d^T (Eq. 24), pointwise over the feature maps."""

    def __init__(self, phi: Layer, transform: PointwiseAffine):
        if not isinstance(phi, ELEMENTWISE):
            raise ValueError(f"AffineWrapped: phi={phi!r} must be an elementwise nonlinearity "
                             f"({', '.join(t.__name__ for t in ELEMENTWISE)})")
        self.phi, self.transform = phi, transform

    def output_shape(self, in_shape):
        if in_shape[0] != self.transform.U.shape[0]:
            raise ValueError(f"AffineWrapped: input has {in_shape[0]} maps but U is "
                             f"{tuple(self.transform.U.shape)}")
        return tuple(in_shape)

    def forward(self, x, W=None, ctx=None):
        t = self.transform
        a, cache = self.phi.forward(_shift(_mix(x, t.U), t.c), None, ctx)
        return _shift(_mix(a, t.V), t.d), cache

    def backward(self, dout, cache, W=None):
        xp, t = get_xp(dout), self.transform
        dz, _ = self.phi.backward(_mix(dout, xp.transpose(t.V)), cache)
        return _mix(dz, xp.transpose(t.U)), None

    def jvp(self, dx, cache, W=None, dW=None):
        t = self.transform
        return _mix(self.phi.jvp(_mix(dx, t.U), cache), t.V)

    def __repr__(self):
        return f"AffineWrapped({self.phi!r}, I={self.transform.U.shape[0]})"


@dataclass
class Reparameterization:
    """Eq. 24 for a whole network.

    input: (V_0, d_0) on the input maps (its U = I, c = 0);  hidden: {layer index of an
    elementwise nonlinearity: PointwiseAffine};  output: (U_L, c_L) on the logits (V = I, d = 0).
    """

    input: PointwiseAffine
    hidden: dict
    output: PointwiseAffine


@dataclass
class _Slot:
    """One parametric layer of N and the transforms on either side of it."""

    layer_index: int
    before: PointwiseAffine      # V, d of the activations it reads
    after: PointwiseAffine       # U, c of its pre-activations
    num_maps_in: int             # J of the activations it reads (V is J x J)
    num_maps_out: int            # I of its pre-activations (U is I x I)


def _slots(net: Sequential, reparam: Reparameterization) -> list[_Slot]:
    """Walk N: each parametric layer with the transforms in front of and behind it.

    Allowed: Conv2d, Dense, Flatten and at most one elementwise nonlinearity directly after each
    parametric layer (pooling or normalisation do not commute with pointwise affine maps)."""
    allowed = (Conv2d, Dense, Flatten) + ELEMENTWISE
    elementwise = {k for k, layer in enumerate(net.layers) if isinstance(layer, ELEMENTWISE)}
    extra = set(reparam.hidden) - elementwise
    if extra:
        raise ValueError(f"reparam.hidden has keys {sorted(extra)} that are not elementwise "
                         "layers of the network")
    slots, before, maps_in, pending = [], reparam.input, net.input_shape[0], None
    for k, layer in enumerate(net.layers):
        if not isinstance(layer, allowed):
            raise ValueError(f"Theorem 3 needs a Sequential of Conv2d/Dense/Flatten/elementwise "
                             f"layers; layer {k} is {layer!r}")
        if isinstance(layer, Flatten):
            continue
        if layer.has_params or pending is not None:
            if pending is not None:     # close the previous parametric layer's slot
                t = reparam.hidden.get(k) if not layer.has_params else None
                pending.after = t if t is not None else \
                    PointwiseAffine.identity(pending.num_maps_out, reparam.input.U)
                before, maps_in, pending = pending.after, pending.num_maps_out, None
            if layer.has_params:
                pending = _Slot(k, before, None, maps_in, layer.param_shape[0])
                slots.append(pending)
            continue
        raise ValueError(f"layer {k} ({layer!r}) must directly follow a parametric layer "
                         "(one elementwise nonlinearity per layer; none on the input)")
    if pending is None:
        raise ValueError("the network must end with a parametric layer (the logits)")
    pending.after = reparam.output
    for s in slots:
        for name, t, n in (("U", s.after.U, s.num_maps_out), ("V", s.before.V, s.num_maps_in)):
            if tuple(t.shape) != (n, n):
                raise ValueError(f"parametric layer {s.layer_index}: {name} has shape "
                                 f"{tuple(t.shape)}, expected ({n}, {n})")
    return slots


def expanded_transform(V, d, m: int):
    """[[V]]_H = [[1, d^T kron 1_m^T], [0, V kron I_m]] (Eqs. 79-81), (1 + J m) square."""
    xp = get_xp(V, d)
    j = V.shape[0]
    out = xp.zeros((1 + j * m, 1 + j * m), dtype=V.dtype)
    out[0, 0] = 1
    out[0, 1:] = xp.kron(d, xp.ones(m, dtype=V.dtype))
    out[1:, 1:] = xp.kron(V, xp.eye(m, dtype=V.dtype))
    return out


@dataclass
class LayerTransform:
    """What Lemma 2 needs for parametric layer ``layer_index``: U, c of the activation function
    after it, and [[V]]_H of the activations it reads (V, d of the one before it)."""

    layer_index: int
    U: object
    c: object
    V_H: object


def layer_transforms(net: Sequential, reparam: Reparameterization) -> list[LayerTransform]:
    """One :class:`LayerTransform` per parametric layer; enforces the padding caveat."""
    out = []
    for slot in _slots(net, reparam):
        layer = net.layers[slot.layer_index]
        k = layer.param_shape[1] - 1
        if k % slot.num_maps_in:
            raise ValueError(f"layer {slot.layer_index}: {k} input columns are not a multiple "
                             f"of J={slot.num_maps_in} maps")
        d = slot.before.d
        if isinstance(layer, Conv2d) and layer.geom.padding > 0 and bool(get_xp(d).any(d != 0)):
            raise ValueError(f"layer {slot.layer_index} is a zero-padded conv (padding="
                             f"{layer.geom.padding}); a shift d != 0 in front of it breaks Eq. 79 "
                             "at the border (padded zeros are not shifted) -- use d = 0 or an "
                             "unpadded conv")
        out.append(LayerTransform(slot.layer_index, slot.after.U, slot.after.c,
                                  expanded_transform(slot.before.V, d, k // slot.num_maps_in)))
    return out


def dagger_network(net: Sequential, reparam: Reparameterization) -> Sequential:
    """N-dagger: phi_0-dagger in front, each transformed phi wrapped, (U_L, c_L) at the end.

    Parametric layer k of N is layer k + 1 of N-dagger."""
    _slots(net, reparam)  # validates the structure
    layers = [AffineWrapped(Identity(), reparam.input)]
    layers += [AffineWrapped(layer, reparam.hidden[k]) if k in reparam.hidden else layer
               for k, layer in enumerate(net.layers)]
    layers.append(AffineWrapped(Identity(), reparam.output))
    return Sequential(layers, net.input_shape)


def dagger_params(net: Sequential, params: list, reparam: Reparameterization) -> list:
    """Lemma 2, Eq. 84: W_bar-dagger = U^-T (W_bar - c e^T) [[V]]_H^-T, aligned with
    :func:`dagger_network`'s layers."""
    out = [None] * (len(net.layers) + 2)
    for t in layer_transforms(net, reparam):
        xp = get_xp(params[t.layer_index])
        M = xp.array(params[t.layer_index], copy=True)
        M[:, 0] = M[:, 0] - t.c
        X = xp.linalg.solve(xp.transpose(t.U), M)                   # U^-T (W_bar - c e^T)
        out[t.layer_index + 1] = xp.transpose(xp.linalg.solve(t.V_H, xp.transpose(X)))
    return out


def original_params(net: Sequential, params_dagger: list, reparam: Reparameterization) -> list:
    """Inverse of :func:`dagger_params`: W_bar = U^T W_bar-dagger [[V]]_H^T + c e^T."""
    out = [None] * len(net.layers)
    for t in layer_transforms(net, reparam):
        xp = get_xp(params_dagger[t.layer_index + 1])
        W = xp.transpose(t.U) @ params_dagger[t.layer_index + 1] @ xp.transpose(t.V_H)
        W[:, 0] = W[:, 0] + t.c
        out[t.layer_index] = W
    return out


# --------------------------------------------------------------------------- random transforms
def random_invertible(rng: _host_np.random.Generator, n: int, *, orthogonal: bool = False,
                      max_scale: float = 2.0):
    """Host float64 Q1 diag(s) Q2^T with Haar-like orthogonal Q's and log-uniform s in
    [1/max_scale, max_scale] (condition number <= max_scale^2); s = 1 when ``orthogonal``."""
    def haar():
        q, r = _host_np.linalg.qr(rng.normal(size=(n, n)))
        return q * _host_np.sign(_host_np.diag(r))
    if orthogonal:
        return haar()
    s = _host_np.exp(rng.uniform(-_host_np.log(max_scale), _host_np.log(max_scale), size=n))
    return (haar() * s) @ haar().T


def random_reparameterization(net: Sequential, rng, like, *, orthogonal: bool = False,
                              shifts: bool = True, shift_std: float = 0.5) -> Reparameterization:
    """Random (U, c, V, d) for the input, every elementwise nonlinearity and the logits.

    ``orthogonal``: U, V orthogonal instead of general invertible.  ``shifts``: draw c, d ~
    N(0, shift_std^2); d is drawn as 0 in front of a zero-padded conv (module docstring).
    Arrays take the namespace and dtype of ``like``."""
    if not isinstance(rng, _host_np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    def matrix(n, on):
        return random_invertible(rng, n, orthogonal=orthogonal) if on else _host_np.eye(n)

    def shift(n, on):
        return rng.normal(0.0, shift_std, n) if (shifts and on) else _host_np.zeros(n)

    def affine(n, U=True, V=True, shift_c=True, shift_d=True):
        parts = (matrix(n, U), shift(n, shift_c), matrix(n, V), shift(n, shift_d))
        return PointwiseAffine(*(asarray_like(p, like) for p in parts))

    def feeds_padded_conv(k):
        nxt = next((l for l in net.layers[k + 1:] if l.has_params), None)
        return isinstance(nxt, Conv2d) and nxt.geom.padding > 0

    hidden = {k: affine(net.shapes[k][0], shift_d=not feeds_padded_conv(k))
              for k, layer in enumerate(net.layers) if isinstance(layer, ELEMENTWISE)}
    return Reparameterization(
        input=affine(net.input_shape[0], U=False, shift_c=False,
                     shift_d=not feeds_padded_conv(-1)),
        hidden=hidden,
        output=affine(net.shapes[-1][0], V=False, shift_d=False))


# --------------------------------------------------------------------------- one update
def _pseudo_inverse_direction(Omega, Gamma, G, rcond):
    """Gamma^+ G Omega^+ (the undamped KFC direction, Eq. 22 without damping).

    Eigenvalues below rcond * max are treated as 0.  In a well-posed test the only singular
    factor is the softmax layer's Gamma: every DS row p - e_y sums to 0, so Gamma 1 = 0.  Its
    null direction adds the same amount to every logit of an example, which leaves the predictive
    distribution unchanged; the gradient has no component there."""
    xp = get_xp(Omega, Gamma, G)
    eig = eigen_factors(Omega, Gamma)

    def inv(d):
        keep = d > rcond * xp.max(d)
        return xp.where(keep, 1 / xp.where(keep, d, xp.ones_like(d)), xp.zeros_like(d))
    V1 = xp.transpose(eig.Q_Gamma) @ G @ eig.Q_Omega
    V2 = inv(eig.d_Gamma)[:, None] * V1 * inv(eig.d_Omega)[None, :]
    return eig.Q_Gamma @ V2 @ xp.transpose(eig.Q_Omega)


def _diagonal_fisher(record):
    """Monte-Carlo diagonal Fisher of one layer, I x (1 + J|Delta|) aligned with W_bar:
    mean_n (DW_bar_n)^2 with DW_bar_n = DS_n^T [[A_n]]_H (one sampled target per example)."""
    xp = get_xp(record.DS)
    g = layer_gradient_vectors(record.A_H, record.DS)                  # (N, K I), vec order
    diag = xp.mean(g * g, axis=0)
    return xp.transpose(diag.reshape(record.A_H.shape[2], record.DS.shape[2]))


def preconditioned_update(net: Sequential, params: list, x, y, rng, *, lr: float,
                          method: str = "kfc", damping: float | None = None,
                          rcond: float | None = None) -> list:
    """W_bar <- W_bar - lr * P(grad) for every parametric layer; returns new params.

    method: 'kfc' undamped Gamma^+ G Omega^+ (Theorem 3's update; ``rcond`` defaults to
    1000 eps of the dtype); 'kfc-damped' factored damping with pi (Eqs. 20-22, ``damping``);
    'sgd' the plain gradient; 'diagonal-fisher' G / (diag F + damping).  Factors come from the
    batch x with one target per example sampled with ``rng`` (numpy Generator) (Sec. 3.1)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}")
    needs_damping = method in ("kfc-damped", "diagonal-fisher")
    if needs_damping and (damping is None or not damping > 0):
        raise ValueError(f"method={method!r} needs damping > 0, got damping={damping!r}")
    if not needs_damping and damping is not None:
        raise ValueError(f"method={method!r} is undamped; got damping={damping!r}")
    _, grads, tape = net.loss_and_grads(params, x, y)
    records = net.sampled_records(params, x, rng, tape=tape)
    new = list(params)
    for rec, fac in zip(records, network_factors(records)):
        G = grads[rec.layer_index]
        xp = get_xp(G)
        if method == "kfc":
            tol = 1000 * float(xp.finfo(G.dtype).eps) if rcond is None else rcond
            step = _pseudo_inverse_direction(fac.Omega, fac.Gamma, G, tol)
        elif method == "kfc-damped":
            step = factored_inverse(fac.Omega, fac.Gamma, damping).apply(G)
        elif method == "sgd":
            step = G
        else:
            step = G / (_diagonal_fisher(rec) + damping)
        new[rec.layer_index] = params[rec.layer_index] - lr * step
    return new


def function_discrepancy(net_a, params_a, net_b, params_b, x) -> float:
    """max |log p_a(y|x) - log p_b(y|x)| over the examples and classes of x: compares the
    predictive distributions, i.e. logits up to a per-example constant."""
    xp = get_xp(x)
    la = log_softmax(net_a.forward(params_a, x).output)
    lb = log_softmax(net_b.forward(params_b, x).output)
    return float(xp.max(xp.abs(la - lb)))


def invariance_error(net: Sequential, params: list, reparam: Reparameterization, x, y,
                     x_test, *, seed: int, lr: float, method: str = "kfc",
                     damping: float | None = None) -> float:
    """Theorem 3 measured: one update on N and one on N-dagger (same batch, same sampled
    targets from ``seed``), then the discrepancy of the two updated networks on ``x_test``
    (0 up to round-off when the update is invariant)."""
    net_d = dagger_network(net, reparam)
    params_d = dagger_params(net, params, reparam)
    new = preconditioned_update(net, params, x, y, _host_np.random.default_rng(seed), lr=lr,
                                method=method, damping=damping)
    new_d = preconditioned_update(net_d, params_d, x, y, _host_np.random.default_rng(seed),
                                  lr=lr, method=method, damping=damping)
    return function_discrepancy(net, new, net, original_params(net, new_d, reparam), x_test)
