"""Softmax cross-entropy: the loss, its gradient, and targets sampled from the model.

The network's output z (N, C) are logits; the predictive distribution is p = softmax(z)
(Section 2.1: -log p(y|x) is the per-example loss L).  Two kinds of targets go through the same
backward pass:

* the true labels, for the gradient of the objective;
* labels ~ p (one sample per example), for the Fisher statistics (Section 3.1, K-FAC App. D):
  the derivatives of the *per-example* loss with sampled targets are the DS of Eq. 23.
"""
from __future__ import annotations

import numpy as _host_np  # host-side label-range checks only

from kfc_ref.backend import get_xp
from kfc_ref.nn.keyed_random import draw_uniform
from kfc_ref.validate import ArgumentError


def log_softmax(z):
    """log softmax over the last axis, stable for large |z|.  (N, C) -> (N, C)."""
    xp = get_xp(z)
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(z):
    """Predictive probabilities p = softmax(z) over the last axis."""
    return get_xp(z).exp(log_softmax(z))


def check_labels(labels, n: int, num_classes: int | None = None, *, name: str = "labels",
                 range_on_device: bool = False):
    """Check class labels y (N,) for a batch of ``n`` examples: an integer array (NumPy or
    device) of shape (n,), n >= 1, and 0 <= y_n < ``num_classes`` when that is given.

    The range needs a reduction read back on the host: it is checked for host (NumPy) arrays
    always and for device arrays only with ``range_on_device`` (the training loop checks its
    dataset's labels once on the host instead of syncing every step).  Raises
    :class:`~kfc_ref.validate.ArgumentError` naming ``name``.
    """
    shape, dtype = getattr(labels, "shape", None), getattr(labels, "dtype", None)
    if shape is None or dtype is None:
        raise ArgumentError(f"{name} must be an integer array of shape (N,) = ({n},), got "
                            f"{type(labels).__name__}")
    if len(shape) != 1 or shape[0] != n:
        raise ArgumentError(f"{name} must have shape (N,) = ({n},), one label per example; "
                            f"got {tuple(shape)}")
    if n < 1:
        raise ArgumentError(f"{name} is empty: a batch needs at least one example (N >= 1)")
    if getattr(dtype, "kind", None) not in ("i", "u"):
        raise ArgumentError(f"{name} must hold integer class indices, got dtype {dtype}")
    xp = get_xp(labels)
    if num_classes is not None and (range_on_device or xp is _host_np):
        lo, hi = int(xp.min(labels)), int(xp.max(labels))
        if lo < 0 or hi >= num_classes:
            raise ArgumentError(f"{name} holds labels in [{lo}, {hi}]; allowed are 0 .. "
                                f"{num_classes - 1} (C = {num_classes} classes)")


def _check_logits_and_labels(logits, labels):
    if getattr(logits, "ndim", None) != 2:
        raise ArgumentError(f"logits must have shape (N, C), got {getattr(logits, 'shape', None)}")
    check_labels(labels, logits.shape[0], logits.shape[1])


def one_hot(labels, num_classes: int, like):
    """(N,) integer labels -> (N, C) one-hot rows with the dtype and namespace of ``like``."""
    xp = get_xp(like)
    classes = xp.arange(num_classes)
    return (labels[:, None] == classes[None, :]).astype(like.dtype)


def cross_entropy(logits, labels):
    """Per-example losses -log p(y_n | x_n): (N, C), (N,) -> (N,)."""
    _check_logits_and_labels(logits, labels)
    logp = log_softmax(logits)
    return -(logp * one_hot(labels, logits.shape[1], logits)).sum(axis=1)


def softmax_cross_entropy(logits, labels):
    """Mean loss over the batch and its gradient with respect to the logits.

    Returns (loss, dlogits) with loss = (1/N) sum_n -log p(y_n|x_n) (a 0-d array) and
    dlogits = (p - onehot(y)) / N, shape (N, C).  Multiply dlogits by N to get per-example
    loss derivatives (what Gamma needs).
    """
    _check_logits_and_labels(logits, labels)
    n, c = logits.shape
    logp = log_softmax(logits)
    onehot = one_hot(labels, c, logits)
    loss = -(logp * onehot).sum() / n
    return loss, (get_xp(logits).exp(logp) - onehot) / n


def sample_targets(logits, rng):
    """Draw one label per example from p = softmax(logits) by inverse-CDF sampling.

    The N uniforms come from ``rng``: a NumPy Generator (drawn on the host) or an
    :class:`~kfc_ref.nn.keyed_random.ExampleRandom` (keyed by each example's row in the global
    mini-batch); either way the same seed gives the same labels on CPU and GPU.  Returns int64
    labels (N,) in the namespace of ``logits``.
    """
    xp = get_xp(logits)
    p = softmax(logits)
    cdf = xp.cumsum(p, axis=1)
    u = draw_uniform(rng, (logits.shape[0], 1), like=p).astype(p.dtype)
    # label = number of CDF entries strictly below u, clipped against round-off at the top.
    labels = xp.sum((cdf < u).astype(xp.int64), axis=1)
    return xp.minimum(labels, logits.shape[1] - 1)


def classification_error(logits, labels):
    """Fraction of examples whose arg-max class differs from the label (a Python float)."""
    _check_logits_and_labels(logits, labels)
    xp = get_xp(logits)
    return float(xp.mean((xp.argmax(logits, axis=1) != labels).astype(logits.dtype)))
