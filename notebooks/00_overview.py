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
# # 0. Overview: what KFC is, and a map of `kfc_ref`
#
# Grosse & Martens (ICML 2016) extend **K-FAC** (Kronecker-factored approximate curvature) from
# fully connected layers to **convolution layers**. The chain of ideas, with the equations this
# repository implements:
#
# 1. Natural gradient preconditions the gradient with the **Fisher matrix**
#    $F = \mathbb E[\mathcal D\theta\,\mathcal D\theta^\top]$ (Eq. 3), with targets drawn
#    from the *model's* predictive distribution.
# 2. K-FAC keeps one block per layer and factors it as a Kronecker product (Eq. 4):
#    activations $\otimes$ derivatives.
# 3. For a conv layer the weight derivative sums over the spatial locations $t$ (Eq. 11), so the
#    block (Eq. 12) has four-fold sums. Three assumptions -- **IAD** (independent activations and
#    derivatives), **SH** (spatial homogeneity, Eqs. 13-15) and **SUD** (spatially uncorrelated
#    derivatives) -- give Theorem 1 (Eqs. 16-17) and the KFC factorisation
#    $\hat F_\ell = \Omega_{\ell-1}\otimes\Gamma_\ell$ (Eqs. 18-19).
# 4. Theorem 2 (Eq. 23) estimates the factors directly from mini-batches:
#    $\Omega = \mathbb E[[\![A]\!]_H^\top[\![A]\!]_H]$,
#    $\Gamma = \frac1{|\mathcal T|}\mathbb E[\mathcal DS^\top\mathcal DS]$.
# 5. Damping (Eqs. 7-8, 20-21) and the approximate natural gradient (Eq. 22) make an optimizer:
#    **KFC-pre** (Algorithm 1, App. B.1) or full K-FAC (App. B.2).
# 6. Theorem 3: the updates are invariant to pointwise affine reparameterisations (Eq. 24).
#
# **Reading order** (see `README.md` in this folder): 00 overview -> 01 conv layers and [[A]] ->
# 02 Fisher and K-FAC for dense layers -> 03 KFC and Theorems 1-2 -> 04 the SUD assumption
# measured -> 05 invariance (Theorem 3) -> 06 damping -> 07 training KFC-pre vs SGD.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds.
import numpy as np
from nbsetup import QUICK

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %% [markdown]
# ## The package at a glance
#
# * `kfc_ref.nn`: [[A]] (im2col, Eq. 25), layers with forward, backward and forward-mode passes,
#   losses, `Sequential`, models;
# * `kfc_ref.curvature`: exact, Monte-Carlo and empirical Fisher (Eq. 3), $\Omega$ and $\Gamma$
#   (Eq. 23), damping (Eqs. 8, 21, 33-38);
# * `kfc_ref.theory`: Theorem 1's beta construction, the approximation ladder, Theorem 3, the
#   SUD analysis (App. D.1);
# * `kfc_ref.optim`: SGD, KFC-pre (Algorithm 1), K-FAC with KFC blocks (App. B.2);
# * `kfc_ref.data`: the built-in and downloadable datasets, preprocessing, mini-batches;
# * `kfc_ref.experiments`: training, sweeps, the theorem checks, figures, the tour, benchmarks.
#
# The conventions (bias column first, vec order, where $1/|\mathcal T|$ goes) are in
# [docs/conventions.md](../docs/conventions.md); [docs/paper_map.md](../docs/paper_map.md) maps
# every equation of the paper to the function that implements it and the test that checks it.
#
# ## A first taste: one conv layer, exact Fisher block vs KFC
#
# A tiny two-conv net on 6x6 inputs has a few hundred parameters, so its exact Fisher (Eq. 3, the
# expectation over the model's labels taken exactly) fits in memory. Compare the block of the
# second conv layer with $\Omega\otimes\Gamma$.

# %%
from kfc_ref.nn.models import tiny_convnet
from kfc_ref.curvature.fisher import true_fisher, fisher_blocks, exact_layer_factors

rng = np.random.default_rng(0)
net = tiny_convnet((1, 6, 6), channels=(3, 3), num_classes=3)
params = net.init(0, "float64")
x = rng.normal(size=(16 if QUICK else 64, 1, 6, 6))
print(net)

F = true_fisher(net, params, x)                      # (P, P), Eq. 3
layer = net.param_layers[1]                          # the second conv layer
block = fisher_blocks(F, net)[1]                     # its diagonal block
fac = exact_layer_factors(net, params, x, layer)     # Omega, Gamma (Eq. 23, exact over y)
kfc = np.kron(fac.Omega, fac.Gamma)                  # Eq. 18, column-stacking vec order
print("block", block.shape, " Omega", fac.Omega.shape, " Gamma", fac.Gamma.shape)
print("relative error ||F_l - Omega kron Gamma|| / ||F_l|| =",
      np.linalg.norm(block - kfc) / np.linalg.norm(block))

# %% [markdown]
# The error is far from zero: at random initialisation and random inputs none of IAD, SH, SUD holds
# exactly. What matters for optimisation is whether the *direction* of the approximate natural
# gradient is good; notebooks 03 and 06 measure that. The committed figure below (made by
# `python -m kfc_ref figures`) shows the same comparison on a net trained briefly on MNIST:
#
# ![exact Fisher block vs KFC](../figures/exact_vs_kfc.png)
#
# And the headline experiment in miniature (notebook 07):
#
# ![KFC-pre vs SGD](../figures/training.png)

# %% [markdown]
# ## One approximate natural-gradient step (Eq. 22)
#
# For each layer, $[\hat F^{(\gamma)}_\ell]^{-1}\nabla h = \mathrm{vec}(\Gamma^{(\gamma)-1}
# \nabla_{\bar W}h\,\Omega^{(\gamma)-1})$ with the factored damping of Eq. 21.

# %%
from kfc_ref.curvature.damping import factored_inverse

y = rng.integers(0, 3, size=x.shape[0])
loss, grads, _ = net.loss_and_grads(params, x, y)
inv = factored_inverse(fac.Omega, fac.Gamma, damping=1e-3)
step = inv.apply(grads[layer])                        # Gamma_d^-1 G Omega_d^-1, shape of W_bar
dense = np.linalg.solve(np.kron(fac.Omega + inv.pi * 1e-3**0.5 * np.eye(fac.Omega.shape[0]),
                                 fac.Gamma + 1e-3**0.5 / inv.pi * np.eye(fac.Gamma.shape[0])),
                         grads[layer].T.reshape(-1))    # the same thing as one dense solve
print("pi =", inv.pi, "| max difference to the dense solve:",
      np.abs(step.T.reshape(-1) - dense).max())

# %% [markdown]
# ## Exercises
#
# 1. Change `channels=(3, 3)` to `(2, 4)` or the activation (`activation="relu"`): how does the
#    relative error change?
# 2. Replace the random `x` by spatially constant images,
#    `x = np.tile(rng.normal(size=(len(x), 1, 1, 1)), (1, 1, 6, 6))` (one value repeated along
#    both spatial axes). The first layer's input is then spatially homogeneous (SH) apart from
#    the zero padding. Does the error of either conv layer's block go down? (Hint: what do
#    constant images do to the spatial correlation of the derivatives, i.e. to SUD?)
# 3. Run `python -m kfc_ref tour --quick --out /tmp/tour` in a terminal and open `summary.md`.
