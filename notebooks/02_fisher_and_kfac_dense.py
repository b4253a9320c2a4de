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
# # 2. The exact Fisher, and K-FAC for dense layers
#
# The Fisher matrix (Eq. 3) is $F = \mathbb E_{x\sim\text{data},\,y\sim\text{model}}
# [\mathcal D\theta\,\mathcal D\theta^\top]$ with $\mathcal D\theta = \nabla_\theta
# (-\log p(y\mid x,\theta))$. The labels come from the **model**, not the data; with the data's
# labels one gets the *empirical* Fisher, a different matrix.
#
# K-FAC keeps the diagonal blocks (one per layer) and, assuming activations and derivatives are
# independent, factors each one (Eq. 4): $\mathbb E[\mathrm{vec}(\mathcal D\bar W)\mathrm{vec}
# (\mathcal D\bar W)^\top] \approx \Psi\otimes\Gamma$ with $\Psi = \mathbb E[\bar a\bar a^\top]$
# and $\Gamma = \mathbb E[\mathcal Ds\,\mathcal Ds^\top]$. A dense layer is a conv layer with
# one location ($|\mathcal T| = 1$), so `kfc_ref` computes $\Psi$ with the same code as $\Omega$.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds.
import numpy as np
from nbsetup import QUICK

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %%
from kfc_ref.nn.layers import Dense, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.curvature.fisher import (empirical_fisher, exact_layer_factors, fisher_blocks,
                                      kl_divergence, monte_carlo_fisher, true_fisher)

rng = np.random.default_rng(0)
net = Sequential([Dense(4, 6), Tanh(), Dense(6, 3)], (4,))
params = net.init(0, "float64")
n = 50 if QUICK else 200
x = rng.normal(size=(n, 4))
y = rng.integers(0, 3, n)
F = true_fisher(net, params, x)
print(net, "\nF:", F.shape, "symmetric:", np.allclose(F, F.T),
      "| smallest eigenvalue:", np.linalg.eigvalsh(F).min())

# %% [markdown]
# ## Monte-Carlo vs exact vs empirical
#
# With $k$ sampled labels per example the Monte-Carlo Fisher converges to $F$ like $k^{-1/2}$
# (Section 3.1 samples one label per example). The empirical Fisher does not converge to $F$.

# %%
ks = [1, 4, 16] if QUICK else [1, 4, 16, 64]
for k in ks:
    Fk = monte_carlo_fisher(net, params, x, k, np.random.default_rng(k))
    print(f"k = {k:3d} samples/example: ||F_k - F|| / ||F|| = "
          f"{np.linalg.norm(Fk - F) / np.linalg.norm(F):.3f}")
Fe = empirical_fisher(net, params, x, y)
print(f"empirical Fisher:          ||F_emp - F|| / ||F|| = "
      f"{np.linalg.norm(Fe - F) / np.linalg.norm(F):.3f}")

# %% [markdown]
# ## The Fisher is the curvature of the KL divergence
#
# $\mathrm{KL}(p_\theta \,\|\, p_{\theta+\epsilon v}) \approx \tfrac12\epsilon^2 v^\top F v$
# (Section 2.1; this is also why update clipping in Algorithm 1 bounds $v^\top F v$).

# %%
v = rng.normal(size=net.num_params)
theta = net.flatten(params)
for eps in (1e-1, 1e-2, 1e-3):
    moved = net.unflatten(theta + eps * v)
    kl = float(kl_divergence(net.forward(params, x).output, net.forward(moved, x).output))
    print(f"eps = {eps:g}: KL = {kl:.3e}   0.5 eps^2 v^T F v = {0.5 * eps**2 * v @ F @ v:.3e}")

# %% [markdown]
# ## K-FAC's factors (Eq. 4) against the exact blocks
#
# `exact_layer_factors` returns $\Psi$ (called `Omega`: with $|\mathcal T| = 1$ it is K-FAC's
# $\mathbb E[\bar a\bar a^\top]$, bias coordinate first) and $\Gamma$ with the expectation over
# $y$ taken exactly.

# %%
for layer, block in zip(net.param_layers, fisher_blocks(F, net)):
    fac = exact_layer_factors(net, params, x, layer)
    approx = np.kron(fac.Omega, fac.Gamma)
    print(f"layer {layer}: block {block.shape}, ||F_l - Psi kron Gamma|| / ||F_l|| = "
          f"{np.linalg.norm(block - approx) / np.linalg.norm(block):.3f}")

# %% [markdown]
# IAD fails across the data distribution: both the activations and the derivatives depend on $x$.
# With a single example the activations are fixed numbers, so IAD holds trivially and the block of
# a dense layer is exactly $\Psi\otimes\Gamma$:

# %%
fac = exact_layer_factors(net, params, x[:1], net.param_layers[0])
block = fisher_blocks(true_fisher(net, params, x[:1]), net)[0]
print("one example:", np.linalg.norm(block - np.kron(fac.Omega, fac.Gamma)) / np.linalg.norm(block))

# %% [markdown]
# ## Inverting a Kronecker product (Eqs. 5-6)
#
# $(\Psi\otimes\Gamma)^{-1}\mathrm{vec}(G) = \mathrm{vec}(\Gamma^{-1}G\Psi^{-1})$ in the
# column-stacking `vec` the paper uses (`X.ravel(order="F")`, or `X.T.reshape(-1)`).

# %%
fac = exact_layer_factors(net, params, x, net.param_layers[1])
Psi = fac.Omega + 1e-3 * np.eye(fac.Omega.shape[0])       # a little damping keeps them invertible
Gam = fac.Gamma + 1e-3 * np.eye(fac.Gamma.shape[0])
G = rng.normal(size=(Gam.shape[0], Psi.shape[0]))          # I x (1 + J), like W_bar
fast = np.linalg.solve(Gam, G) @ np.linalg.inv(Psi)        # Gamma^-1 G Psi^-1
dense = np.linalg.solve(np.kron(Psi, Gam), G.ravel(order="F"))
print("Eq. 6 == dense solve:", np.allclose(fast.ravel(order="F"), dense))

# %% [markdown]
# ## Exercises
#
# 1. Replace `Tanh` by `ReLU` (`from kfc_ref.nn.layers import ReLU`): does K-FAC get better or
#    worse?
# 2. How many Monte-Carlo samples per example are needed for a 5% relative error?
# 3. Show numerically that the empirical Fisher equals the Fisher when the labels `y` are drawn from
#    the model (`kfc_ref.nn.losses.sample_targets`) and averaged over many draws.
