"""Exact Fisher quadratic forms u^T F v through the forward-mode pass (K-FAC App. J).

For the softmax model with logits z = f(x, theta) (N, C) and p = softmax(z), the exact Fisher of
the mini-batch is

    F = (1/N) sum_n J_n^T F_R(p_n) J_n,     F_R(p) = diag(p) - p p^T,

with J_n = dz_n / dtheta the C x P output Jacobian (Section 2.1; K-FAC App. J).  F is never
formed: for a direction u (a parameter list like ``params``) the forward-mode pass
``Sequential.jvp`` gives J u (N, C) for the cost of about one forward pass, and then

    u^T F v = (1/N) sum_n (J_n u)^T F_R(p_n) (J_n v)
            = (1/N) sum_n sum_c p_nc (Ju - <p, Ju>)_nc (Jv - <p, Jv>)_nc,

the centred form used below (it is sum_c p a b - (p.a)(p.b)).  This is what update clipping
(nu = v^T F v + lambda v^T v, App. B.1) and K-FAC's quadratic model (Eq. 30, App. B.2) need:
R directions cost one forward pass and R forward-mode passes.

Directions are lists aligned with ``net.layers`` (None for layers without parameters, as in
``params``); a direction with None for a parametric layer means "no change in that layer".
"""
from __future__ import annotations

from kfc_ref.backend import get_xp
from kfc_ref.nn.losses import softmax
from kfc_ref.validate import ArgumentError


def _check_direction(net, direction, name: str):
    if len(direction) != len(net.layers):
        raise ArgumentError(f"{name} has {len(direction)} entries; the network has "
                         f"{len(net.layers)} layers (use None for layers without parameters)")
    for i in net.param_layers:
        d = direction[i]
        if d is not None and tuple(d.shape) != tuple(net.layers[i].param_shape):
            raise ArgumentError(f"{name}[{i}] has shape {tuple(d.shape)}; layer {i} has W_bar of "
                             f"shape {net.layers[i].param_shape}")


def output_jvp(net, params, tape, direction):
    """J u: the change of the logits (N, C) along the parameter direction ``direction``.

    ``tape`` is the forward pass of ``params`` on the examples (its caches are reused).
    Returns zeros when ``direction`` has no entry for any layer.
    """
    _check_direction(net, direction, "direction")
    out = net.jvp(params, tape, direction)
    if out is None:
        xp = get_xp(tape.output)
        return xp.zeros_like(tape.output)
    return out


def fisher_gram_from_jvps(logits, jvps):
    """The R x R matrix G[r, s] = (1/N) sum_n (J_n u_r)^T F_R(p_n) (J_n u_s).

    logits: (N, C) at the current parameters; jvps: R arrays (N, C) = J u_r.  Symmetric PSD
    (a Gram matrix in the p-weighted inner product of centred outputs).
    """
    xp = get_xp(logits, *jvps)
    p = softmax(logits)
    stacked = xp.stack(list(jvps))                                  # (R, N, C)
    centred = stacked - xp.sum(p * stacked, axis=2, keepdims=True)  # a - <p, a>
    weighted = centred * p
    n = logits.shape[0]
    gram = xp.einsum("rnc,snc->rs", weighted, centred) / n
    return 0.5 * (gram + xp.transpose(gram))


def fisher_gram(net, params, x, directions, *, tape=None):
    """G[r, s] = u_r^T F u_s for the exact Fisher of the mini-batch ``x`` (R x R array).

    One forward pass on ``x`` (skipped when ``tape``, a forward pass of ``params`` on ``x``, is
    given) and one forward-mode pass per direction.  The forward pass runs in evaluation mode
    (no dropout), so F is the Fisher of the deterministic network.
    """
    if not directions:
        raise ArgumentError("directions must hold at least one parameter direction")
    tape = net.forward(params, x) if tape is None else tape
    jvps = [output_jvp(net, params, tape, d) for d in directions]
    return fisher_gram_from_jvps(tape.output, jvps)


def fisher_quadratic(net, params, x, u_list, v_list=None, *, tape=None, check: bool = True):
    """u^T F v (or u^T F u when ``v_list`` is None) for the exact mini-batch Fisher, as a 0-d
    array on the device of the parameters (``float()`` it to read it on the host: that is a
    device-to-host sync, which the optimizers avoid until a log point).

    u_list, v_list: parameter directions aligned with ``params``; x: (N, ...) inputs.
    Costs one forward pass (unless ``tape`` is given) and one or two forward-mode passes;
    u^T F u without a tape is one fused sweep (:meth:`~kfc_ref.nn.network.Sequential.forward_jvp`;
    ``check=False`` skips its input check, a device sync, as the optimizers do).
    """
    if tape is None and v_list is None:
        _check_direction(net, u_list, "direction")
        logits, ju = net.forward_jvp(params, x, u_list, check=check)
        ju = get_xp(logits).zeros_like(logits) if ju is None else ju
        jv = ju
    else:
        tape = net.forward(params, x, check=check) if tape is None else tape
        logits = tape.output
        ju = output_jvp(net, params, tape, u_list)
        jv = ju if v_list is None else output_jvp(net, params, tape, v_list)
    xp = get_xp(logits)
    p = softmax(logits)
    cu = ju - xp.sum(p * ju, axis=1, keepdims=True)
    cv = jv - xp.sum(p * jv, axis=1, keepdims=True)
    return xp.sum(p * cu * cv) / logits.shape[0]
