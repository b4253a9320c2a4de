"""Exact Fisher matrices of tiny networks (Eq. 3), built from per-example gradients.

For a batch x of N examples and softmax outputs p_n = p(. | x_n, theta), the Fisher matrix
(Eq. 3, "the true Fisher") is

    F = (1/N) sum_n E_{y ~ p_n}[g_{n,y} g_{n,y}^T] = (1/N) sum_n sum_c p_{n,c} g_{n,c} g_{n,c}^T,

where g_{n,c} = grad_theta -log p(c | x_n) is the per-example gradient for target c, flattened in
the network's flat order (``Sequential.flatten``: column-stacking vec of each W_bar, layer after
layer).  The expectation over y is taken *analytically*: one backward pass per class c (all
examples get target c at once), never a Python loop over examples.

Per-example gradients of a parametric layer (Eq. 28, App. A): DW_bar_n = DS_n^T [[A_n]]_H with
DS_n (|T|, I) and [[A_n]]_H (|T|, K), K = 1 + J|Delta|; in column-stacking order
vec(DW_bar_n) = sum_t a_t kron d_t, i.e. entry k*I + i holds ([[A_n]]_H^T DS_n)[k, i].

Everything here is a dense P x P matrix: meant for P up to a few thousand.
"""
from __future__ import annotations

from kfc_ref.backend import get_xp
from kfc_ref.curvature.factors import KroneckerFactors, gamma_from_derivatives, omega_from_patches
from kfc_ref.nn.losses import (check_labels, log_softmax, sample_targets, softmax,
                               softmax_cross_entropy)
from kfc_ref.validate import ArgumentError, check_choice, check_generator, check_int


# --------------------------------------------------------------------------- per-example gradients
def layer_gradient_vectors(A_H, DS):
    """Per-example vec(DW_bar_n) = vec(DS_n^T [[A_n]]_H) = sum_t a_t kron d_t (Eq. 28).

    A_H: [[A]]_H (N, |T|, K);  DS: (N, |T|, I)  ->  (N, K*I), column-stacking order.
    Leading axes broadcast like matmul's, e.g. A_H (Ka, 1, |T|, K) with DS (1, Kd, |T|, I)
    gives all (Ka, Kd, K*I) pairs without copying either operand.
    """
    xp = get_xp(A_H, DS)
    G = xp.swapaxes(A_H, -1, -2) @ DS                          # (..., K, I) = (DS^T A_H)^T
    return G.reshape(G.shape[:-2] + (G.shape[-2] * G.shape[-1],))


def _gradients_for_targets(net, params, tape, targets):
    """(N, P) per-example gradients of -log p(targets_n | x_n) from one backward pass."""
    xp = get_xp(tape.output)
    _, dlogits = softmax_cross_entropy(tape.output, targets)
    _, douts = net.backward(params, tape, dlogits)
    records = net.records(tape, douts)   # DS already scaled to per-example derivatives
    return xp.concatenate([layer_gradient_vectors(r.A_H, r.DS) for r in records], axis=1)


def _class_targets(xp, n: int, c: int):
    return xp.full((n,), c, dtype=xp.int64)


def per_example_gradients(net, params, x, y):
    """Gradients of the per-example losses -log p(y_n | x_n): (N, P), flat order.

    Their mean over n is the gradient of the mean loss (``Sequential.loss_and_grads``).
    """
    tape = net.forward(params, x)
    check_labels(y, tape.output.shape[0], tape.output.shape[1], name="y",
                 range_on_device=True)
    return _gradients_for_targets(net, params, tape, y)


# --------------------------------------------------------------------------- Fisher matrices
def true_fisher(net, params, x):
    """The Fisher matrix of Eq. 3 with the expectation over y ~ p(y|x) taken exactly: (P, P).

    F = (1/N) sum_c G_c^T diag(p_{:,c}) G_c, with G_c (N, P) the per-example gradients for target
    c (one backward pass per class; the loop is over the C classes, not over examples).
    """
    tape = net.forward(params, x)
    xp = get_xp(tape.output)
    p = softmax(tape.output)
    n, num_classes = p.shape
    F = None
    for c in range(num_classes):
        G = _gradients_for_targets(net, params, tape, _class_targets(xp, n, c))
        Gw = G * xp.sqrt(p[:, c])[:, None]
        F = xp.transpose(Gw) @ Gw if F is None else F + xp.transpose(Gw) @ Gw
    return F / n


def monte_carlo_fisher(net, params, x, num_samples: int, rng):
    """Monte-Carlo Fisher: k = ``num_samples`` targets per example drawn from the model
    (Section 3.1), F_k = (1/(N k)) sum_n sum_s g_{n, y_ns} g_{n, y_ns}^T.  Unbiased for F.

    ``rng`` is a numpy Generator (the draws happen on the host, see ``losses.sample_targets``).
    """
    num_samples = check_int("num_samples", num_samples, minimum=1)
    check_generator("rng", rng)
    tape = net.forward(params, x)
    xp = get_xp(tape.output)
    F = None
    for _ in range(num_samples):
        G = _gradients_for_targets(net, params, tape, sample_targets(tape.output, rng))
        F = xp.transpose(G) @ G if F is None else F + xp.transpose(G) @ G
    return F / (tape.output.shape[0] * num_samples)


def empirical_fisher(net, params, x, y):
    """The *empirical* Fisher (1/N) sum_n g_{n,y_n} g_{n,y_n}^T with the training labels y.

    This is a different object from the Fisher of Eq. 3: the targets are the data's, not draws
    from the model, so it is not the expected outer product of the score and does not converge
    to the Fisher (KFC/K-FAC never use it; it is here only for comparison).
    """
    G = per_example_gradients(net, params, x, y)
    return get_xp(G).transpose(G) @ G / G.shape[0]


def fisher_blocks(F, net) -> list:
    """The per-layer diagonal blocks F[s_l, s_l] (block-diagonal approximation, Section 2.2),
    one per parametric layer in flat order, using ``net.param_slices()``."""
    if getattr(F, "shape", None) != (net.num_params, net.num_params):
        raise ArgumentError(f"F must have shape (P, P) = ({net.num_params}, {net.num_params}), "
                         f"got {getattr(F, 'shape', None)}")
    return [F[s, s] for s in net.param_slices()]


# --------------------------------------------------------------------------- exact Gamma
def class_records(net, params, x):
    """p (N, C) and, for every class c, the LayerRecords with all targets set to c.

    The records' DS are the per-example derivatives DS_{n,c}; the patches do not depend on c.
    """
    tape = net.forward(params, x)
    xp = get_xp(tape.output)
    n, num_classes = tape.output.shape
    per_class = []
    for c in range(num_classes):
        _, dlogits = softmax_cross_entropy(tape.output, _class_targets(xp, n, c))
        _, douts = net.backward(params, tape, dlogits)
        per_class.append(net.records(tape, douts))
    return softmax(tape.output), per_class


def expected_gamma(p, DS_per_class):
    """Gamma (Eq. 23) with the expectation over y ~ p taken exactly:
    (1/(N|T|)) sum_n sum_c p_{n,c} DS_{n,c}^T DS_{n,c}.

    p: (N, C);  DS_per_class: (C, N, |T|, I).  Reuses ``factors.gamma_from_derivatives`` on the
    sqrt(p)-weighted derivatives of all (class, example) pairs.
    """
    xp = get_xp(p, DS_per_class)
    num_classes, n, t, i = DS_per_class.shape
    weights = xp.sqrt(xp.transpose(p))[:, :, None, None]           # (C, N, 1, 1)
    weighted = (DS_per_class * weights).reshape(num_classes * n, t, i)
    return num_classes * gamma_from_derivatives(weighted)


def exact_layer_factors(net, params, x, layer_index: int) -> KroneckerFactors:
    """KFC factors of one parametric layer (index into ``net.layers``) on the batch x, with Gamma
    from the exact expectation over y (``expected_gamma``) instead of one sampled target."""
    check_choice("layer_index", layer_index, net.param_layers)
    xp = get_xp(x)
    p, per_class = class_records(net, params, x)
    k = net.param_layers.index(layer_index)
    DS = xp.stack([records[k].DS for records in per_class])
    record = per_class[0][k]
    return KroneckerFactors(omega_from_patches(record.patches), expected_gamma(p, DS),
                            record.num_locations)


# --------------------------------------------------------------------------- KL
def kl_divergence(logits_p, logits_q):
    """Mean over examples of KL(p || q) for p = softmax(logits_p), q = softmax(logits_q) (N, C).

    Near theta, KL(p_theta || p_{theta + eps v}) = 0.5 eps^2 v^T F v + O(eps^3) (Section 2.1).
    """
    if getattr(logits_p, "shape", None) != getattr(logits_q, "shape", None):
        raise ArgumentError("logits_p and logits_q must have the same shape (N, C); got "
                         f"{getattr(logits_p, 'shape', None)} and "
                         f"{getattr(logits_q, 'shape', None)}")
    xp = get_xp(logits_p, logits_q)
    logp, logq = log_softmax(logits_p), log_softmax(logits_q)
    return xp.mean(xp.sum(xp.exp(logp) * (logp - logq), axis=1))
