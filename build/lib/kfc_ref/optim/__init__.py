"""Optimizers behind one interface with explicit, checkpointable state (Section 5, App. B).

* :mod:`~kfc_ref.optim.base`: the :class:`Optimizer` interface, parameter averaging (App. B.1)
  and state serialisation;
* :mod:`~kfc_ref.optim.kronecker`: the Kronecker-factor state KFC-pre and K-FAC share;
* :mod:`~kfc_ref.optim.sgd`: SGD with momentum, the paper's baseline;
* :mod:`~kfc_ref.optim.kfc_pre`: KFC-pre, KFC as a preconditioner for SGD (App. B.1, Algorithm 1);
* :mod:`~kfc_ref.optim.kfac`: K-FAC with KFC blocks (App. B.2).

:func:`make_optimizer` builds one by name; ``OPTIMIZER_NAMES`` lists the names.
"""
from __future__ import annotations

from kfc_ref.optim.base import Optimizer, state_from_numpy, state_to_numpy
from kfc_ref.optim.kfac import KFAC
from kfc_ref.optim.kfc_pre import KFCPre
from kfc_ref.optim.sgd import SGD

#: name -> class, in the order the CLI lists them.
OPTIMIZERS = {"sgd": SGD, "kfc-pre": KFCPre, "kfac": KFAC}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def make_optimizer(name: str, **hyperparameters) -> Optimizer:
    """Build an optimizer by name ('sgd', 'kfc-pre' or 'kfac') from its hyperparameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; use one of {OPTIMIZER_NAMES}")
    return OPTIMIZERS[name](**hyperparameters)


__all__ = ["KFAC", "KFCPre", "OPTIMIZERS", "OPTIMIZER_NAMES", "Optimizer", "SGD",
           "make_optimizer", "state_from_numpy", "state_to_numpy"]
