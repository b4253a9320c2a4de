# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. KFC: Theorems 1 and 2 alongside the code
#
# For one conv layer the Fisher block entries are (Eq. 12)
# $\mathbb E[\mathcal Dw_{i,j,\delta}\mathcal Dw_{i',j',\delta'}] = \mathbb E[(\sum_t a_{j,t+\delta}
# \mathcal Ds_{i,t})(\sum_{t'} a_{j',t'+\delta'}\mathcal Ds_{i',t'})]$.
#
# * **IAD**: activations independent of derivatives;
# * **SH** (Eqs. 13-15): $\mathbb E[a_{j,t}] = M(j)$,
#   $\mathbb E[a_{j,t}a_{j',t'}] = \Omega(j,j',t'-t)$,
#   $\mathbb E[\mathcal Ds_{i,t}\mathcal Ds_{i',t'}] = \Gamma(i,i',t'-t)$;
# * **SUD**: $\Gamma(i,i',\delta) = 0$ for $\delta\ne 0$.
#
# **Theorem 1** (Eqs. 16-17): under all three,
# $\mathbb E[\mathcal Dw_{i,j,\delta}\mathcal Dw_{i',j',\delta'}] = \beta(\delta,\delta')\,
# \Omega(j,j',\delta'-\delta)\,\Gamma(i,i',0)$, i.e. the block is $\Omega\otimes\Gamma$
# (Eqs. 18-19),
# where $\beta$ counts the locations at which both offsets fall inside the map.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds.
import numpy as np
from nbsetup import QUICK

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %%
from kfc_ref.nn.expand import ConvGeometry
from kfc_ref.theory.theorem1 import (StationaryGaussianField, beta, beta_matrix,
                                     exact_gradient_second_moment, theorem1_prediction,
                                     exact_omega, omega_from_autocovariance, plugin_omega)

geom = ConvGeometry(3, 3, stride=1, padding=1)
T1 = T2 = 4
print("beta(delta, delta') for the 3x3 offsets on a 4x4 map (Eq. 17), rows/cols = u*3 + v:")
print(beta_matrix(geom, T1, T2).astype(int))
print("e.g. beta((-1,-1), (1,1)) =", beta((-1, -1), (1, 1), T1, T2), "locations")

# %% [markdown]
# ## Theorem 1, exactly
#
# `StationaryGaussianField` builds random fields on which the assumptions hold **by construction**:
# activations with any spatial covariance (SH on a torus), derivatives that are white across
# locations (SUD), drawn independently (IAD). `exact_gradient_second_moment` computes
# $\mathbb E[\mathrm{vec}(\mathcal D\bar W)\mathrm{vec}(\mathcal D\bar W)^\top]$ *without sampling*
# (the gradient is bilinear in Gaussian inputs), and `theorem1_prediction` builds
# $\Omega\otimes\Gamma(\cdot,\cdot,0)$ from the fields' exact statistics via Eqs. 18-19 and 47.

# %%
rng = np.random.default_rng(1)
J, I = 2, 2
act = StationaryGaussianField.random(rng, J, (T1, T2), noise_channels=2, filter_size=(2, 2))
der = StationaryGaussianField.random(rng, I, (T1, T2), noise_channels=I, filter_size=(1, 1),
                                     mean_scale=0.0)                    # SUD: white in space
exact = exact_gradient_second_moment(act, der, geom)
pred = theorem1_prediction(act, der, geom)
print("SUD holds:   ||exact - Omega kron Gamma|| / ||exact|| =",
      np.linalg.norm(exact - pred) / np.linalg.norm(exact))
der_corr = StationaryGaussianField.random(rng, I, (T1, T2), noise_channels=I, filter_size=(2, 2),
                                          mean_scale=0.0)               # SUD broken
exact2 = exact_gradient_second_moment(act, der_corr, geom)
pred2 = theorem1_prediction(act, der_corr, geom)
print("SUD broken:  ||exact - Omega kron Gamma|| / ||exact|| =",
      np.linalg.norm(exact2 - pred2) / np.linalg.norm(exact2))

# %% [markdown]
# ## Theorem 2: estimate $\Omega$ and $\Gamma$ from mini-batches (Eq. 23)
#
# Plugging an *estimated* autocovariance into Eq. 19 can give an indefinite $\Omega$ (Section 3.1).
# Theorem 2 says that under SH, $\Omega = \mathbb E[[\![A]\!]_H^\top[\![A]\!]_H]$ and
# $\Gamma = \frac1{|\mathcal T|}\mathbb E[\mathcal DS^\top\mathcal DS]$: Gram matrices, PSD by
# construction (`kfc_ref.curvature.factors`).

# %%
from kfc_ref.curvature.factors import omega_from_patches
from kfc_ref.nn.expand import im2col

Om_theorem1 = omega_from_autocovariance(act.autocovariance(geom), act.mean, geom, T1, T2)
print("E[[[A]]_H^T [[A]]_H] == beta construction (Theorem 2 vs Eq. 19):",
      np.allclose(exact_omega(act, geom), Om_theorem1))
n = 2000 if QUICK else 20000
samples = act.sample(n, np.random.default_rng(2))
Om_hat = omega_from_patches(im2col(samples, geom))          # the Gram estimator from n samples
print(f"Gram estimate from {n} samples: relative error",
      np.linalg.norm(Om_hat - Om_theorem1) / np.linalg.norm(Om_theorem1))

# the plug-in estimator on one 2x2 image (a counterexample kept in tests/test_theorem2.py)
x_bad = np.array([[[[1.0, 2.0], [-3.0, 0.0]]]])
print("smallest eigenvalue, plug-in Omega:", np.linalg.eigvalsh(plugin_omega(x_bad, geom)).min(),
      "| Gram Omega:", np.linalg.eigvalsh(omega_from_patches(im2col(x_bad, geom))).min())

# %% [markdown]
# ## How far is a real layer from KFC? The approximation ladder
#
# On a real network none of the assumptions holds exactly. `approximation_ladder` applies them one
# at a time to the exact block of one conv layer
# ([docs/ladder.md](../docs/ladder.md) gives the formulas):
# exact -> IAD -> IAD+SUD -> KFC (+SH), plus KFC-SUA (Appendix C) and the diagonal, reporting the
# relative error and the angle between the damped solves $F^{-1}g$ and $F_k^{-1}g$.

# %%
from kfc_ref.experiments import studies as ex
from kfc_ref.data import load_dataset, preprocess
from kfc_ref.theory.ladder import format_ladder

data = preprocess(load_dataset("digits"))                   # 8x8 digits: the fastest built-in data
budget = ex.QUICK if QUICK else ex.TOUR
problem = ex.tiny_problem(data, budget)                    # tiny tanh net, a few SGD steps, float64
ladder = ex.exact_vs_kfc(problem, budget.ladder_examples)
print(format_ladder(ladder))

# %% [markdown]
# The same comparison on MNIST, drawn by `python -m kfc_ref figures`:
#
# ![ladder](../figures/ladder.png)
#
# ## Exercises
#
# 1. In the Theorem 1 cell, break IAD instead of SUD: use the same noise for activations and
#    derivatives (hint: `exact_gradient_second_moment` assumes independence -- build a case where
#    the prediction fails by sampling both from one field and estimating with `im2col`).
# 2. Change `geom` to stride 2 or padding 0: Theorem 1 still holds with the general $\beta$
#    (`beta_axis` counts, per axis, the output locations at which both offsets read inside the
#    input). Check it.
# 3. Which rung of the ladder loses the most? Try
#    `problem.layer_index = problem.net.param_layers[0]`.
