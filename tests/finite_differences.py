"""Centred finite differences for checking hand-written backward passes (float64).

``directional_check`` compares <dout, (f(x + eps v) - f(x - eps v)) / (2 eps)> with <g, v>,
where g is the analytic vector-Jacobian product, for a random direction v.  The centred
difference has truncation error O(eps^2 |f'''|) and round-off O(u |f| / eps) with u ~ 1e-16;
eps = 1e-6 balances them near 1e-10 relative for the O(1) functions used here.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6
# Centred-difference error bound above, with head-room for sums over ~1e3 terms.
FD_RTOL = 1e-6


def directional_fd(f, x, v, eps=EPS):
    """(f(x + eps v) - f(x - eps v)) / (2 eps)."""
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def assert_vjp_matches(f, x, dout, grad, seed=0, n_dirs=2):
    """Assert <dout, J v> == <grad, v> (grad = J^T dout) for random directions v."""
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        v = rng.normal(size=x.shape)
        fd = float(np.sum(dout * directional_fd(f, x, v)))
        an = float(np.sum(grad * v))
        scale = max(1.0, abs(fd), abs(an))
        assert abs(fd - an) <= FD_RTOL * scale, f"finite difference {fd!r} vs analytic {an!r}"
