"""The approximation ladder from the exact Fisher block of one conv layer down to KFC
(docs/ladder.md; Section 3's assumptions IAD, SUD, SH applied one at a time), plus
KFC-SUA (App. C, Theorem 4) and the diagonal of the exact block.

Per example n write a_t for row t of [[A_n]]_H (length K = 1 + J|Delta|) and d_t for row t of
DS_{n,y} (length I); vec(DW_bar) = sum_t a_t kron d_t (column stacking).  Expectations are over
the fixed batch x (mean over n) and *exactly* over y ~ p(y|x_n) (sum over classes weighted by
p), so the ladder has no sampling noise:

    F    = E[ sum_{t,t'} (a_t a_t'^T) kron (d_t d_t'^T) ]                  exact block
    F_1  = sum_{t,t'} E[a_t a_t'^T] kron E[d_t d_t'^T]                     IAD
    F_2  = sum_t E[a_t a_t^T] kron E[d_t d_t^T]                            IAD + SUD
    F_3  = (sum_t E[a_t a_t^T]) kron ((1/|T|) sum_t E[d_t d_t^T])   + SH: KFC, Omega kron Gamma
    SUA  = Omega_SUA kron Gamma, Omega_SUA from
           Omega(j,j',delta) = Sigma(j,j') 1[delta=0] + M(j)M(j')
           put through Theorem 1's beta construction (Eqs. 16-19, 47)
    diag = diag(F)

Each rung is reported by ||F_k - F||_F / ||F||_F and by the angle between (F + gamma I)^-1 g and
(F_k + gamma I)^-1 g for the layer's mean-loss gradient g and one small damping gamma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kfc_ref.backend import get_xp
from kfc_ref.curvature.fisher import class_records, layer_gradient_vectors
from kfc_ref.nn.layers import Conv2d
from kfc_ref.theory.theorem1 import omega_from_autocovariance

RUNGS = ("exact", "IAD", "IAD+SUD", "KFC", "KFC-SUA", "diagonal")


@dataclass
class LadderRow:
    """One rung: its name, ||F_k - F||_F / ||F||_F and the angle (degrees) between the damped
    solves F^-1 g and F_k^-1 g."""

    name: str
    rel_error: float
    angle_deg: float

    def __iter__(self):  # unpacks as (name, rel_error, angle_deg)
        return iter((self.name, self.rel_error, self.angle_deg))


@dataclass
class Ladder:
    """``rows`` in ``RUNGS`` order; ``matrices[name]`` the dense (K I) x (K I) rung; ``gradient``
    the layer's mean-loss gradient in vec order; ``damping`` the gamma used for the angles."""

    rows: list
    matrices: dict = field(repr=False)
    gradient: object = field(repr=False)
    damping: float = 0.0


def location_moments(A_H, DS_per_class, p):
    """Second moments between output locations, exact over y:

    E[a_t a_t'^T]: (|T|, |T|, K, K) = (1/N) sum_n a_{n,t} a_{n,t'}^T;
    E[d_t d_t'^T]: (|T|, |T|, I, I) = (1/N) sum_n sum_c p_{n,c} d_{n,c,t} d_{n,c,t'}^T.
    A_H (N, |T|, K); DS_per_class (C, N, |T|, I); p (N, C).
    """
    xp = get_xp(A_H, DS_per_class, p)
    n = A_H.shape[0]
    AA = xp.einsum("nta,nsb->tsab", A_H, A_H) / n
    w = xp.transpose(p)[:, :, None, None]
    DD = xp.einsum("cnti,cnsj->tsij", DS_per_class * w, DS_per_class) / n
    return AA, DD


def _kron_sum(AA, DD):
    """sum over the leading location axes of kron(AA[...], DD[...]): (K I, K I)."""
    xp = get_xp(AA, DD)
    K, I = AA.shape[-1], DD.shape[-1]
    AA, DD = AA.reshape(-1, K, K), DD.reshape(-1, I, I)
    return xp.einsum("lab,lcd->acbd", AA, DD).reshape(K * I, K * I)


def _diagonal_pairs(M):
    """M[t, t] for a (|T|, |T|, ...) array -> (|T|, ...)."""
    xp = get_xp(M)
    t = M.shape[0]
    return M[xp.arange(t), xp.arange(t)]


def sua_omega(x, geom):
    """Omega under SUA (Theorem 4): Omega(j,j',delta) = Sigma(j,j') 1[delta=0] + M(j)M(j'),
    with M and Sigma the mean and covariance across maps of the layer input x (N, J, H, W) over
    examples and locations, through ``omega_from_autocovariance``."""
    xp = get_xp(x)
    n, J, H, W = x.shape
    flat = xp.transpose(x, (0, 2, 3, 1)).reshape(-1, J)
    M = xp.mean(flat, axis=0)
    centred = flat - M
    Sigma = xp.transpose(centred) @ centred / flat.shape[0]
    Omega_fn = xp.broadcast_to((M[:, None] * M[None, :])[:, :, None, None],
                               (J, J, 2 * geom.kh - 1, 2 * geom.kw - 1)).copy()
    Omega_fn[:, :, geom.kh - 1, geom.kw - 1] += Sigma
    return omega_from_autocovariance(Omega_fn, M, geom, H, W)


def _angle_deg(u, v) -> float:
    xp = get_xp(u, v)
    cos = float(xp.sum(u * v)) / (float(xp.linalg.norm(u)) * float(xp.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def approximation_ladder(net, params, x, y, layer_index: int, damping: float = 1e-3) -> Ladder:
    """The ladder of the module doc for parametric layer ``net.layers[layer_index]`` on batch x.

    y: the training labels, used only for the gradient g in the angles.  KFC-SUA needs a conv
    layer (Dense layers get no SUA rung).  Returns a :class:`Ladder`.
    """
    if layer_index not in net.param_layers:
        raise ValueError(f"layer_index={layer_index!r} is not a parametric layer; allowed are "
                         f"{net.param_layers}")
    if not damping > 0:
        raise ValueError(f"damping={damping!r} must be > 0")
    xp = get_xp(x)
    k = net.param_layers.index(layer_index)
    p, per_class = class_records(net, params, x)
    A_H = per_class[0][k].A_H
    DS = xp.stack([records[k].DS for records in per_class])           # (C, N, |T|, I)
    num_locations = A_H.shape[1]

    # exact block: (1/N) sum_n sum_c p_nc g_nc g_nc^T with g_nc = sum_t a_t kron d_t
    n = A_H.shape[0]
    G = layer_gradient_vectors(A_H[None], DS)                         # (C, N, K*I)
    G = (G * xp.sqrt(xp.transpose(p))[:, :, None]).reshape(-1, G.shape[-1])
    matrices = {"exact": xp.transpose(G) @ G / n}

    AA, DD = location_moments(A_H, DS, p)
    AA_tt, DD_tt = _diagonal_pairs(AA), _diagonal_pairs(DD)
    matrices["IAD"] = _kron_sum(AA, DD)
    matrices["IAD+SUD"] = _kron_sum(AA_tt, DD_tt)
    Gamma = xp.sum(DD_tt, axis=0) / num_locations
    matrices["KFC"] = xp.kron(xp.sum(AA_tt, axis=0), Gamma)
    layer = net.layers[layer_index]
    if isinstance(layer, Conv2d):
        x_in = net.layer_inputs(params, x)[layer_index]
        matrices["KFC-SUA"] = xp.kron(sua_omega(x_in, layer.geom), Gamma)
    F = matrices["exact"]
    matrices["diagonal"] = xp.diag(xp.diag(F))

    _, grads, _ = net.loss_and_grads(params, x, y)
    g = xp.transpose(grads[layer_index]).reshape(-1)
    eye = xp.eye(F.shape[0], dtype=F.dtype)
    ref = xp.linalg.solve(F + damping * eye, g)
    norm_F = float(xp.linalg.norm(F))
    rows = []
    for name in RUNGS:
        if name not in matrices:
            continue
        Fk = matrices[name]
        rows.append(LadderRow(name, float(xp.linalg.norm(Fk - F)) / norm_F,
                              _angle_deg(ref, xp.linalg.solve(Fk + damping * eye, g))))
    return Ladder(rows, matrices, g, damping)


def format_ladder(ladder: Ladder) -> str:
    """A small text table of the rows."""
    lines = [f"{'rung':<10} {'rel. error':>11} {'angle (deg)':>12}"]
    lines += [f"{r.name:<10} {r.rel_error:>11.4f} {r.angle_deg:>12.3f}" for r in ladder.rows]
    return "\n".join(lines)
