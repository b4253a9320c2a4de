"""Optimizers behind one interface with explicit, checkpointable state (Section 5, App. B).

* :mod:`~kfc_ref.optim.base`: the :class:`Optimizer` interface, parameter averaging (App. B.1)
  and the pieces the optimizers share;
* :mod:`~kfc_ref.optim.state`: each optimizer's state as a dataclass that is also its
  checkpoint schema (``SGDState``, ``KFCPreState``, ``KFACState``);
* :mod:`~kfc_ref.optim.kronecker`: the Kronecker-factor statistics KFC-pre and K-FAC share;
* :mod:`~kfc_ref.optim.sgd`: SGD with momentum, the paper's baseline;
* :mod:`~kfc_ref.optim.kfc_pre`: KFC-pre, KFC as a preconditioner for SGD (App. B.1, Algorithm 1);
* :mod:`~kfc_ref.optim.kfac`: K-FAC with KFC blocks (App. B.2).

:func:`make_optimizer` builds one by name; ``OPTIMIZER_NAMES`` lists the names.
"""
from __future__ import annotations

from kfc_ref.optim.base import Optimizer, info_to_host
from kfc_ref.optim.kfac import KFAC
from kfc_ref.optim.kfc_pre import KFCPre
from kfc_ref.optim.sgd import SGD
from kfc_ref.optim.state import (
    KFACState, KFCPreState, OptimizerState, SGDState, state_from_numpy, state_to_numpy,
)
from kfc_ref.validate import check_choice

#: name -> class, in the order the CLI lists them.
OPTIMIZERS = {"sgd": SGD, "kfc-pre": KFCPre, "kfac": KFAC}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def make_optimizer(name: str, **hyperparameters) -> Optimizer:
    """Build an optimizer by name ('sgd', 'kfc-pre' or 'kfac') from its hyperparameters."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZER_NAMES)](**hyperparameters)


__all__ = ["KFAC", "KFACState", "KFCPre", "KFCPreState", "OPTIMIZERS", "OPTIMIZER_NAMES",
           "Optimizer", "OptimizerState", "SGD", "SGDState", "info_to_host", "make_optimizer",
           "state_from_numpy", "state_to_numpy"]
