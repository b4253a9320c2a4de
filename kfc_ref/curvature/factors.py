"""The KFC Kronecker factors Omega and Gamma (Theorem 2, Eq. 23) and K-FAC's for dense layers.

For one parametric layer with records over a mini-batch of N examples:

* Omega = E[[[A]]_H^T [[A]]_H]   (1 + J|Delta|) x (1 + J|Delta|), per example, **no 1/|T|**:
  its (0, 0) entry is exactly |T| and its (0, 1 + j|Delta| + delta) entries are
  E[sum_t a_{j, t+delta}] = beta(delta) M(j) under spatial homogeneity (Eqs. 62-66);
* Gamma = (1/|T|) E[DS^T DS]     I x I, with DS the derivatives of the per-example loss under
  targets sampled from the model (Eqs. 67-69).

A dense layer is the case |T| = 1, where these are K-FAC's factors (Eq. 4 with the homogeneous
coordinate first).  The approximate Fisher block is F_hat = Omega kron Gamma (Eq. 18) in the
column-stacking order of ``kfc_ref.nn.network``.  Both estimators are Gram matrices, hence PSD.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import get_xp
from kfc_ref.validate import check_int, check_number


@dataclass
class KroneckerFactors:
    """Omega ((1+J|Delta|) square) and Gamma (I x I) of one layer, plus |T| for reference."""

    Omega: object
    Gamma: object
    num_locations: int


def omega_from_moments(column_sums, gram, n: int, t: int):
    """Omega = (1/N) sum_n [[A_n]]_H^T [[A_n]]_H assembled from the two sums over the N|T|
    patch rows, ``column_sums`` (K,) and ``gram`` = [[A]]^T [[A]] (K, K): the ones column
    contributes |T| at (0, 0) and the patch sums in row/column 0."""
    xp = get_xp(gram)
    k = gram.shape[0]
    omega = xp.empty((k + 1, k + 1), dtype=gram.dtype)
    omega[0, 0] = t
    col_sum = column_sums / n
    omega[0, 1:] = col_sum
    omega[1:, 0] = col_sum
    omega[1:, 1:] = gram / n
    return omega


def omega_from_patches(patches):
    """Omega = (1/N) sum_n [[A_n]]_H^T [[A_n]]_H from patches (N, |T|, K) without building
    [[A]]_H (:func:`omega_from_moments`)."""
    xp = get_xp(patches)
    n, t, k = patches.shape
    flat = patches.reshape(n * t, k)
    return omega_from_moments(xp.sum(flat, axis=0), xp.transpose(flat) @ flat, n, t)


def gamma_from_derivative_matrix(D, scale: float, n: int):
    """Gamma = (1/(N|T|)) sum_n DS_n^T DS_n with DS^T = ``scale`` * D, from the (I, N|T|)
    matrix D of N examples: scale^2 D D^T / (N |T|), one symmetric rank-k update, no
    (N, |T|, I) copy.  The records pass the backpropagated douts of the mean loss with
    scale = N (per-example derivatives, docs/conventions.md)."""
    t = D.shape[1] // n
    return (D @ D.T) * (scale * scale / (n * t))


def gamma_from_derivatives(DS):
    """Gamma = (1/(N|T|)) sum_n DS_n^T DS_n from per-example derivatives DS (N, |T|, I)
    (:func:`gamma_from_derivative_matrix`)."""
    n, t, i = DS.shape
    return gamma_from_derivative_matrix(DS.reshape(n * t, i).T, 1.0, n)


def layer_factors(record) -> KroneckerFactors:
    """Omega and Gamma of one :class:`kfc_ref.nn.network.LayerRecord` (DS must be present),
    from its patch moments and derivative matrix (neither [[A]] nor DS is built)."""
    D = record.derivative_matrix()
    if D is None:
        raise ValueError(f"record of layer {record.layer_index} has no DS; run a backward pass "
                         "with sampled targets (Sequential.sampled_records) first")
    n, t = record.num_examples, record.num_locations
    return KroneckerFactors(omega_from_moments(*record.patch_moments(), n, t),
                            gamma_from_derivative_matrix(D, record.scale, n), t)


def network_factors(records) -> list[KroneckerFactors]:
    """Factors for every parametric layer, in flat-vector order."""
    return [layer_factors(r) for r in records]


def kron_block(factors: KroneckerFactors):
    """The dense approximate Fisher block Omega kron Gamma (column-stacking vec order)."""
    xp = get_xp(factors.Omega)
    return xp.kron(factors.Omega, factors.Gamma)


def moving_average_decay(count: int, max_decay: float) -> float:
    """eps = min(1 - 1/count, max_decay) for the ``count``-th estimate (K-FAC App. D).

    count = 1 gives 0 (the average is the estimate); with ``max_decay`` = 1 the average is the
    equally weighted mean of all ``count`` estimates so far.
    """
    count = check_int("count", count, minimum=1)
    max_decay = check_number("max_decay", max_decay, minimum=0.0, maximum=1.0)
    return min(1.0 - 1.0 / count, max_decay)


def moving_average(old: KroneckerFactors | None, new: KroneckerFactors,
                   decay: float) -> KroneckerFactors:
    """Exponential moving average: decay * old + (1 - decay) * new (K-FAC App. D).

    The one moving average of the factors: KFC-pre and K-FAC refresh their factors with it
    (decay from :func:`moving_average_decay`), and their multi-batch initialisation is the same
    recursion with decay 1 - 1/count, i.e. the running mean.  ``old`` None -> ``new``.
    """
    decay = check_number("decay", decay, minimum=0.0, maximum=1.0)
    if old is None or decay == 0.0:
        return new
    return KroneckerFactors(decay * old.Omega + (1 - decay) * new.Omega,
                            decay * old.Gamma + (1 - decay) * new.Gamma, new.num_locations)
