"""Curvature: the exact Fisher of tiny nets, Fisher quadratic forms, the KFC factors, damping.

* :mod:`~kfc_ref.curvature.fisher`: the true Fisher (Eq. 3, expectation over the model's labels
  taken exactly), the Monte-Carlo Fisher and the empirical Fisher, full and per-layer blocks;
* :mod:`~kfc_ref.curvature.fvp`: exact u^T F v through the forward-mode pass (K-FAC App. J);
* :mod:`~kfc_ref.curvature.factors`: Omega and Gamma (Theorem 2, Eq. 23), Omega kron Gamma (Eq. 18);
* :mod:`~kfc_ref.curvature.damping`: pi (Eq. 8), factored damping (Eq. 21), exact eigen damping
  (App. B.2), the approximate natural gradient (Eq. 22).
"""
from __future__ import annotations

from kfc_ref.curvature.damping import (
    eigen_factors, factored_inverse, natural_gradient, pi_trace,
)
from kfc_ref.curvature.factors import (
    KroneckerFactors, kron_block, layer_factors, moving_average, network_factors,
)
from kfc_ref.curvature.fisher import (
    empirical_fisher, fisher_blocks, monte_carlo_fisher, per_example_gradients, true_fisher,
)
from kfc_ref.curvature.fvp import fisher_quadratic

__all__ = ["KroneckerFactors", "eigen_factors", "empirical_fisher", "factored_inverse",
           "fisher_blocks", "fisher_quadratic", "kron_block", "layer_factors",
           "monte_carlo_fisher", "moving_average", "natural_gradient", "network_factors",
           "per_example_gradients", "pi_trace", "true_fisher"]
