"""Damping of the Kronecker-factored Fisher and the approximate natural gradient.

Two ways to damp a block F_hat = Omega kron Gamma (column-stacking order, Eq. 18):

* **factored** (Eqs. 7, 20-21): (Omega + pi sqrt(lambda+gamma) I) kron
  (Gamma + sqrt(lambda+gamma)/pi I), with pi from the trace norm (Eq. 8):
  pi = sqrt((tr Omega / dim Omega) / (tr Gamma / dim Gamma));
* **exact** (App. B.2, Eqs. 33-38): (F_hat + gamma I)^-1 vec(G) =
  vec(Q_G [(Q_G^T G Q_O) / (d_G d_O^T + gamma)] Q_O^T) from eigendecompositions of both factors.

The natural gradient of one layer (Eq. 22) is Gamma_d^-1 G Omega_d^-1 for the gradient matrix
G = grad_{W_bar} h (I x (1 + J|Delta|)), which is (F_hat_d)^-1 vec(G) in vec order.

Rank-deficient factors: ``eigh`` runs on the symmetrised factor (X + X^T)/2, and eigenvalues are
clipped at 0 (a Gram matrix has none below 0; round-off can make tiny negatives).  Then every
denominator is at least gamma > 0 (exact) or the damped factor is positive definite (factored),
so no NaN appears for damping > 0; damping <= 0 is rejected.

The damped factors are inverted as symmetric positive definite matrices
(:func:`kfc_ref.backend.spd_inverse`: Cholesky on NumPy, ``inv`` elsewhere).

Failure semantics (the same on every device): NumPy's ``inv``/``eigh`` may raise
``LinAlgError`` on NaN input or return NaN, while CuPy's return NaN/inf silently.  So every
factor is checked for finiteness *before* it is inverted or decomposed, and eigendecompositions
are checked *after*, and a failure raises :class:`NonFiniteCurvatureError` naming the layer and
the factor on CPU and GPU alike.  Each check over all layers is one fused device reduction read
back once (one host sync); the functions for all layers at once (:func:`factored_inverses`,
:func:`eigen_decompositions`) are what the optimizers call.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import get_xp, spd_inverse
from kfc_ref.validate import ArgumentError, check_positive


class NonFiniteCurvatureError(FloatingPointError, RuntimeError):
    """A Kronecker factor or its eigendecomposition holds NaN or inf (the run diverged, or the
    statistics overflowed).  Raised identically on CPU and GPU."""


def _check_damping(damping, weight_decay=0.0):
    check_positive("damping", damping)
    check_positive("weight_decay", weight_decay, allow_zero=True)


def check_finite(named_arrays, when: str) -> None:
    """Raise :class:`NonFiniteCurvatureError` unless every array is finite.

    ``named_arrays``: (name, array) pairs, e.g. ("layer 2 Omega", Omega); ``when`` says at which
    stage ("before inversion").  One fused reduction over all arrays and one host read (sync);
    only on failure are the arrays inspected one by one to name the culprits.
    """
    named_arrays = list(named_arrays)
    if not named_arrays:
        return
    xp = get_xp(*[a for _, a in named_arrays])
    flags = xp.stack([xp.all(xp.isfinite(a)) for _, a in named_arrays])
    if bool(xp.all(flags)):
        return
    bad = [name for name, a in named_arrays if not bool(xp.all(xp.isfinite(a)))]
    raise NonFiniteCurvatureError(
        f"non-finite (NaN/inf) entries {when} in: {', '.join(bad)}. The curvature statistics "
        "diverged (usually a too large learning rate or too small damping); stop, and restart "
        "from the last good checkpoint with a smaller lr or a larger damping")


def _factor_pairs(factors):
    """(name, array) pairs of a list of KroneckerFactors-like objects, for check_finite."""
    return [pair for l, f in enumerate(factors)
            for pair in ((f"layer {l} Omega", f.Omega), (f"layer {l} Gamma", f.Gamma))]


def symmetrize(X):
    """(X + X^T) / 2."""
    return 0.5 * (X + get_xp(X).transpose(X))


def pi_trace_array(Omega, Gamma):
    """pi of Eq. 8 with the trace norm, sqrt((tr Omega/dim Omega) / (tr Gamma/dim Gamma)), as a
    0-d array on the factors' device (no host read).  1 when either trace is <= 0 (a dead
    layer), where Eq. 8 is undefined."""
    xp = get_xp(Omega, Gamma)
    a = xp.trace(Omega) / Omega.shape[0]
    g = xp.trace(Gamma) / Gamma.shape[0]
    live = (a > 0) & (g > 0)
    ratio = xp.where(live, a, 1.0) / xp.where(live, g, 1.0)
    return xp.sqrt(ratio).astype(Omega.dtype)


def pi_trace(Omega, Gamma) -> float:
    """pi of Eq. 8 (see :func:`pi_trace_array`) as a host float (one host read)."""
    return float(pi_trace_array(Omega, Gamma))


@dataclass
class FactoredInverse:
    """Inverses of the factored-damped factors (Eq. 21) and the pi that was used (a 0-d array
    on the factors' device).  The optimizers store a list of these as KFC-pre's ``inverses``
    (the checkpoint schema is these fields)."""

    Omega_inv: object
    Gamma_inv: object
    pi: object

    def apply(self, G):
        """Eq. 22 for one layer: Gamma_d^-1 G Omega_d^-1 (I x (1 + J|Delta|))."""
        return self.Gamma_inv @ G @ self.Omega_inv


def factored_inverse(Omega, Gamma, damping: float, weight_decay: float = 0.0,
                     use_pi: bool = True, *, check: bool = True) -> FactoredInverse:
    """Damped inverses of Eq. 21 with strength sqrt(weight_decay + damping).

    ``check``: verify the factors are finite first (one host read; see the module doc).
    """
    _check_damping(damping, weight_decay)
    if check:
        check_finite([("Omega", Omega), ("Gamma", Gamma)], "before inversion")
    xp = get_xp(Omega, Gamma)
    pi = pi_trace_array(Omega, Gamma) if use_pi else xp.ones((), dtype=Omega.dtype)
    root = (weight_decay + damping) ** 0.5
    eye_o = xp.eye(Omega.shape[0], dtype=Omega.dtype)
    eye_g = xp.eye(Gamma.shape[0], dtype=Gamma.dtype)
    Omega_inv = spd_inverse(symmetrize(Omega) + (pi * root) * eye_o)
    Gamma_inv = spd_inverse(symmetrize(Gamma) + (root / pi) * eye_g)
    return FactoredInverse(symmetrize(Omega_inv), symmetrize(Gamma_inv), pi)


def factored_inverses(factors, damping: float, weight_decay: float = 0.0,
                      use_pi: bool = True, *, distribute=None) -> list[FactoredInverse]:
    """:func:`factored_inverse` (Eq. 21) of every layer's KroneckerFactors, with one finiteness
    check (one host read) for all layers.

    ``distribute(count, compute, templates)`` says where the layers are inverted: it returns
    [compute(0), ..., compute(count - 1)], each a list (Omega_inv, Gamma_inv, pi), and
    ``templates(l)`` gives arrays of their shapes and dtypes (default: every layer here, in
    order; data-parallel KFC-pre passes the round robin over ranks,
    ``kfc_ref.optim.data_parallel.round_robin``)."""
    check_finite(_factor_pairs(factors), "before inversion")

    def invert(layer):
        f = factors[layer]
        inv = factored_inverse(f.Omega, f.Gamma, damping, weight_decay, use_pi, check=False)
        return [inv.Omega_inv, inv.Gamma_inv, inv.pi]

    def templates(layer):
        f = factors[layer]
        return [f.Omega, f.Gamma, get_xp(f.Omega).zeros((), dtype=f.Omega.dtype)]
    if distribute is None:
        parts = [invert(layer) for layer in range(len(factors))]
    else:
        parts = distribute(len(factors), invert, templates)
    return [FactoredInverse(*arrays) for arrays in parts]


@dataclass
class EigenFactors:
    """Eigendecompositions Omega = Q_O diag(d_O) Q_O^T, Gamma = Q_G diag(d_G) Q_G^T.  The
    optimizers store a list of these as K-FAC's ``inverses`` (the checkpoint schema)."""

    d_Omega: object
    Q_Omega: object
    d_Gamma: object
    Q_Gamma: object

    def apply(self, G, damping: float):
        """(Omega kron Gamma + damping I)^-1 vec(G) as a matrix (Eqs. 36-38)."""
        _check_damping(damping)
        xp = get_xp(G)
        V1 = xp.transpose(self.Q_Gamma) @ G @ self.Q_Omega
        V2 = V1 / (self.d_Gamma[:, None] * self.d_Omega[None, :] + damping)
        return self.Q_Gamma @ V2 @ xp.transpose(self.Q_Omega)


def _eigen_pairs(eigs):
    return [pair for l, e in enumerate(eigs)
            for pair in ((f"layer {l} eigh(Omega)", e.d_Omega), (f"layer {l} Q_Omega", e.Q_Omega),
                         (f"layer {l} eigh(Gamma)", e.d_Gamma), (f"layer {l} Q_Gamma", e.Q_Gamma))]


def eigen_factors(Omega, Gamma, *, check: bool = True) -> EigenFactors:
    """Symmetrise, ``eigh`` and clip negative round-off eigenvalues at 0 (see module doc).

    ``check``: verify the factors are finite before and the decomposition after (two host
    reads), raising :class:`NonFiniteCurvatureError` on every device.
    """
    if check:
        check_finite([("Omega", Omega), ("Gamma", Gamma)], "before the eigendecomposition")
    xp = get_xp(Omega, Gamma)
    dO, QO = xp.linalg.eigh(symmetrize(Omega))
    dG, QG = xp.linalg.eigh(symmetrize(Gamma))
    eig = EigenFactors(xp.maximum(dO, 0), QO, xp.maximum(dG, 0), QG)
    if check:
        check_finite(_eigen_pairs([eig]), "after the eigendecomposition")
    return eig


def eigen_decompositions(factors) -> list[EigenFactors]:
    """:func:`eigen_factors` of every layer's KroneckerFactors, with one finiteness check of
    all factors before and one of all decompositions after (two host reads in all)."""
    check_finite(_factor_pairs(factors), "before the eigendecomposition")
    eigs = [eigen_factors(f.Omega, f.Gamma, check=False) for f in factors]
    check_finite(_eigen_pairs(eigs), "after the eigendecomposition")
    return eigs


def natural_gradient(grads_W_bar: list, inverses: list) -> list:
    """Eq. 22: apply each layer's damped inverse (FactoredInverse) to its gradient matrix."""
    if len(grads_W_bar) != len(inverses):
        raise ArgumentError(f"{len(grads_W_bar)} gradients but {len(inverses)} inverses")
    return [inv.apply(g) for g, inv in zip(grads_W_bar, inverses)]
