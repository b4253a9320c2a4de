"""The paper's theory, made measurable: Theorem 1, the approximation ladder, Theorem 3, SUD.

* :mod:`~kfc_ref.theory.theorem1`: beta (Eq. 17), the Theorem 1 construction (Eqs. 16-19, 47),
  the plug-in estimator, stationary Gaussian fields with exact moments;
* :mod:`~kfc_ref.theory.ladder`: exact -> IAD -> IAD+SUD -> KFC, plus KFC-SUA (App. C, Thm 4)
  and the diagonal, as dense matrices for one layer;
* :mod:`~kfc_ref.theory.invariance`: Theorem 3 (Section 4, App. E.2): the reparameterised
  network of Eq. 24 and Lemma 2's parameters;
* :mod:`~kfc_ref.theory.correlation`: spatial and cross-map correlation estimators (App. D.1);
* :mod:`~kfc_ref.theory.sud`: the SUD analysis of a network (App. D.1, Figures 3 and 4).
"""
from __future__ import annotations

from kfc_ref.theory.correlation import (
    cross_map_correlation, mean_offcentre_correlation, spatial_autocorrelation,
)
from kfc_ref.theory.invariance import invariance_error
from kfc_ref.theory.ladder import approximation_ladder, format_ladder
from kfc_ref.theory.sud import sud_analysis, sud_summary
from kfc_ref.theory.theorem1 import beta, exact_omega, omega_from_autocovariance

__all__ = ["approximation_ladder", "beta", "cross_map_correlation", "exact_omega",
           "format_ladder", "invariance_error", "mean_offcentre_correlation",
           "omega_from_autocovariance", "spatial_autocorrelation", "sud_analysis", "sud_summary"]
