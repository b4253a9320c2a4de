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
# # 6. Damping: factored (Eqs. 7-8, 20-21) vs exact (App. B.2)
#
# We want $[\hat F_\ell + (\lambda+\gamma)I]^{-1}\nabla h$, but adding a multiple of the identity
# breaks the Kronecker structure. Two answers:
#
# * **factored** (Eq. 7 / 21): $(\Omega + \pi\sqrt{\lambda+\gamma}I)\otimes(\Gamma + \tfrac1\pi
#   \sqrt{\lambda+\gamma}I)$, with $\pi$ from Eq. 8 (trace norm) minimising a bound on the residual;
#   its inverse is cheap (Eq. 22). KFC-pre uses it.
# * **exact** (Eqs. 33-38): eigendecompose both factors; then
#   $(\hat F + \gamma I)^{-1}\mathrm{vec}(G) =
#   \mathrm{vec}(Q_\Gamma[(Q_\Gamma^\top G Q_\Omega)\oslash
#   (d_\Gamma d_\Omega^\top + \gamma)]Q_\Omega^\top)$. K-FAC (App. B.2) uses it.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds; show(png) displays a figure.
import numpy as np
from nbsetup import QUICK, show

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %%
from kfc_ref.curvature.damping import pi_trace, factored_inverse, eigen_factors

rng = np.random.default_rng(0)
def gram(d, scale):
    B = rng.normal(size=(d, d)) * scale
    return B @ B.T
Omega, Gamma = gram(7, 3.0), gram(3, 0.1)        # very different scales, as in real layers
G = rng.normal(size=(3, 7))
gamma = 1e-2
pi = pi_trace(Omega, Gamma)
# the residual of Eq. 7 is pi r (I kron Gamma) + (r/pi) (Omega kron I); its trace-norm bound is
# minimised at Eq. 8's pi:
r = gamma ** 0.5
def bound(p):
    return (p * r * np.trace(np.kron(np.eye(7), Gamma))
            + r / p * np.trace(np.kron(Omega, np.eye(3))))


grid = pi * np.exp(np.linspace(-3, 3, 601))
print(f"pi (Eq. 8) = {pi:.4f}; grid minimiser = {grid[np.argmin([bound(p) for p in grid])]:.4f}")

dense = np.kron(Omega, Gamma) + gamma * np.eye(21)
exact = eigen_factors(Omega, Gamma).apply(G, gamma)        # Eqs. 36-38
fact = factored_inverse(Omega, Gamma, gamma).apply(G)      # Eqs. 21-22
ref = np.linalg.solve(dense, G.ravel(order="F"))
print("exact eigen solve == dense solve:", np.allclose(exact.ravel(order="F"), ref))
print("factored vs exact: relative difference",
      np.linalg.norm(fact - exact) / np.linalg.norm(exact))

# %% [markdown]
# ## On a real layer, against the exact Fisher block
#
# `experiments.damping_sweep` compares, over a range of $\gamma$, the factored solve with the exact
# damped KFC solve, and both with the damped solve of the *exact* Fisher block
# $(F+\gamma I)^{-1}g$ of the same layer.

# %%
from kfc_ref.experiments import studies as ex
from kfc_ref.data import load_dataset, preprocess
from kfc_ref.experiments.figures import figure_damping, Results
import tempfile

data = preprocess(load_dataset("digits"))
budget = ex.QUICK if QUICK else ex.TOUR
problem = ex.tiny_problem(data, budget)
ladder = ex.exact_vs_kfc(problem, budget.ladder_examples)
sweep = ex.damping_sweep(problem, ladder, budget.ladder_examples, budget.dampings)
for g, e, a, af, ae in zip(sweep.dampings, sweep.factored_vs_exact_error,
                           sweep.factored_vs_exact_angle, sweep.factored_vs_fisher_angle,
                           sweep.exact_vs_fisher_angle):
    print(f"gamma {g:8.1e}: factored vs exact {e:6.3f} ({a:5.2f} deg) | "
          f"angle to (F+gamma I)^-1 g: factored {af:5.2f}, exact {ae:5.2f} deg")
res = Results("digits", budget, damping=sweep)
show(figure_damping(res, tempfile.mkdtemp())[0])

# %% [markdown]
# The factored and exact damped solves can differ a lot as vectors while being about equally far
# from the exact Fisher's solve: the KFC approximation itself, not the damping, dominates the
# error at small $\gamma$; at large $\gamma$ everything tends to a scaled gradient.
#
# ## Exercises
#
# 1. Set `use_pi=False` in `factored_inverse`: how much worse is the factored solve?
# 2. With weight decay $\lambda$ the strength is $\sqrt{\lambda+\gamma}$: pass `weight_decay=1e-3`.
# 3. Is the factored damping ever *exactly* the damped matrix $\Omega\otimes\Gamma + \gamma I$?
#    Expand $(\Omega + \pi\sqrt\gamma I)\otimes(\Gamma + \tfrac{\sqrt\gamma}{\pi}I)$: it has the
#    extra term $\sqrt\gamma\,(\pi\,I\otimes\Gamma + \tfrac1\pi\,\Omega\otimes I)$, PSD and
#    non-zero: the factored damping is always stronger than $\gamma I$, even when
#    $\Omega\propto I$ (with Eq. 8's $\pi$, `Omega = a * np.eye(7)` in the first cell still gives
#    a relative difference of about 0.5 and an angle of a few degrees). The two solves point the
#    same way only in special cases: both factors multiples of $I$, or
#    $\Omega = aI$ with $\pi = a/\sqrt\gamma$ (or $\Gamma = bI$ with $\pi = \sqrt\gamma/b$). Check
#    it in the first cell: `Omega = 0.1 * np.eye(7)` and `use_pi=False` ($\pi = 1 = a/\sqrt\gamma$
#    for $\gamma = 0.01$) give parallel solves of half the length.
