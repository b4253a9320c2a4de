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
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import get_xp


def _check_damping(damping, weight_decay=0.0):
    if not damping > 0:
        raise ValueError(f"damping={damping!r} must be > 0 (it keeps the inverse finite)")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")


def symmetrize(X):
    """(X + X^T) / 2."""
    return 0.5 * (X + get_xp(X).transpose(X))


def pi_trace(Omega, Gamma) -> float:
    """pi of Eq. 8 with the trace norm: sqrt((tr Omega/dim Omega) / (tr Gamma/dim Gamma)).

    Returns 1.0 when either trace is zero (a dead layer), where Eq. 8 is undefined.
    """
    xp = get_xp(Omega, Gamma)
    a = float(xp.trace(Omega)) / Omega.shape[0]
    g = float(xp.trace(Gamma)) / Gamma.shape[0]
    if a <= 0 or g <= 0:
        return 1.0
    return (a / g) ** 0.5


@dataclass
class FactoredInverse:
    """Inverses of the factored-damped factors (Eq. 21) and the pi that was used."""

    Omega_inv: object
    Gamma_inv: object
    pi: float

    def apply(self, G):
        """Eq. 22 for one layer: Gamma_d^-1 G Omega_d^-1 (I x (1 + J|Delta|))."""
        return self.Gamma_inv @ G @ self.Omega_inv


def factored_inverse(Omega, Gamma, damping: float, weight_decay: float = 0.0,
                     use_pi: bool = True) -> FactoredInverse:
    """Damped inverses of Eq. 21 with strength sqrt(weight_decay + damping)."""
    _check_damping(damping, weight_decay)
    xp = get_xp(Omega, Gamma)
    pi = pi_trace(Omega, Gamma) if use_pi else 1.0
    root = (weight_decay + damping) ** 0.5
    eye_o = xp.eye(Omega.shape[0], dtype=Omega.dtype)
    eye_g = xp.eye(Gamma.shape[0], dtype=Gamma.dtype)
    Omega_inv = xp.linalg.inv(symmetrize(Omega) + pi * root * eye_o)
    Gamma_inv = xp.linalg.inv(symmetrize(Gamma) + (root / pi) * eye_g)
    return FactoredInverse(symmetrize(Omega_inv), symmetrize(Gamma_inv), pi)


@dataclass
class EigenFactors:
    """Eigendecompositions Omega = Q_O diag(d_O) Q_O^T, Gamma = Q_G diag(d_G) Q_G^T."""

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


def eigen_factors(Omega, Gamma) -> EigenFactors:
    """Symmetrise, ``eigh`` and clip negative round-off eigenvalues at 0 (see module doc)."""
    xp = get_xp(Omega, Gamma)
    dO, QO = xp.linalg.eigh(symmetrize(Omega))
    dG, QG = xp.linalg.eigh(symmetrize(Gamma))
    return EigenFactors(xp.maximum(dO, 0), QO, xp.maximum(dG, 0), QG)


def natural_gradient(grads_W_bar: list, inverses: list) -> list:
    """Eq. 22: apply each layer's damped inverse (FactoredInverse) to its gradient matrix."""
    if len(grads_W_bar) != len(inverses):
        raise ValueError(f"{len(grads_W_bar)} gradients but {len(inverses)} inverses")
    return [inv.apply(g) for g, inv in zip(grads_W_bar, inverses)]
