"""Write the reading notebooks (``python notebooks/build_notebooks.py``).

The notebooks are generated from the cells below so that they stay small, reviewable and free
of outputs in git; ``tests/test_notebooks.py`` executes every one of them in quick mode
(``KFC_REF_QUICK=1``).  Edit the cells here, rerun this script, commit both.
"""
from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
# Setup. KFC_REF_QUICK=1 (what CI sets) shrinks every experiment so the notebook runs in seconds.
import os, sys
QUICK = os.environ.get("KFC_REF_QUICK", "0") == "1"
try:
    import kfc_ref
except ImportError:                       # running from notebooks/ without installing kfc_ref
    sys.path.insert(0, os.path.abspath(".."))
    import kfc_ref
import numpy as np
import matplotlib.pyplot as plt
np.set_printoptions(precision=4, suppress=True, linewidth=110)
FIGURES = os.path.join(os.path.dirname(os.path.abspath(kfc_ref.__file__)), "..", "figures")
print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)'''

SHOW = '''\
from IPython.display import Image, display
def show(path):
    """Display a PNG written by a kfc_ref.experiments.plotting function."""
    display(Image(filename=path))'''


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


NOTEBOOKS = {}

# --------------------------------------------------------------------------- 00 overview
NOTEBOOKS["00_overview"] = [
    md('''
# 0. Overview: what KFC is, and a map of `kfc_ref`

Grosse & Martens (ICML 2016) extend **K-FAC** (Kronecker-factored approximate curvature) from
fully connected layers to **convolution layers**. The chain of ideas, with the equations this
repository implements:

1. Natural gradient preconditions the gradient with the **Fisher matrix**
   $F = \\mathbb E[\\mathcal D\\theta\\,\\mathcal D\\theta^\\top]$ (Eq. 3), with targets drawn
   from the *model's* predictive distribution.
2. K-FAC keeps one block per layer and factors it as a Kronecker product (Eq. 4):
   activations $\\otimes$ derivatives.
3. For a conv layer the weight derivative sums over the spatial locations $t$ (Eq. 11), so the
   block (Eq. 12) has four-fold sums. Three assumptions -- **IAD** (independent activations and
   derivatives), **SH** (spatial homogeneity, Eqs. 13-15) and **SUD** (spatially uncorrelated
   derivatives) -- give Theorem 1 (Eqs. 16-17) and the KFC factorisation
   $\\hat F_\\ell = \\Omega_{\\ell-1}\\otimes\\Gamma_\\ell$ (Eqs. 18-19).
4. Theorem 2 (Eq. 23) estimates the factors directly from mini-batches:
   $\\Omega = \\mathbb E[[\\![A]\\!]_H^\\top[\\![A]\\!]_H]$,
   $\\Gamma = \\frac1{|\\mathcal T|}\\mathbb E[\\mathcal DS^\\top\\mathcal DS]$.
5. Damping (Eqs. 7-8, 20-21) and the approximate natural gradient (Eq. 22) make an optimizer:
   **KFC-pre** (Algorithm 1, App. B.1) or full K-FAC (App. B.2).
6. Theorem 3: the updates are invariant to pointwise affine reparameterisations (Eq. 24).

**Reading order** (see `README.md` in this folder): 00 overview -> 01 conv layers and [[A]] ->
02 Fisher and K-FAC for dense layers -> 03 KFC and Theorems 1-2 -> 04 the SUD assumption
measured -> 05 invariance (Theorem 3) -> 06 damping -> 07 training KFC-pre vs SGD.
'''),
    code(SETUP),
    md('''
## The package at a glance

| module | what it holds |
|---|---|
| `expand` | [[A]] (im2col, Eq. 25) and its adjoint |
| `layers`, `pooling`, `network`, `models` | layers with forward/backward/forward-mode passes, `Sequential`, model zoo |
| `losses` | softmax cross-entropy, targets sampled from the model |
| `fisher` | exact / Monte-Carlo / empirical Fisher of tiny nets (Eq. 3) |
| `factors` | $\\Omega$, $\\Gamma$ (Theorem 2, Eq. 23) |
| `theorem1`, `ladder` | Theorem 1's beta construction; exact -> IAD -> SUD -> KFC ladder |
| `damping` | $\\pi$ (Eq. 8), factored (Eq. 21) and exact (App. B.2) damping |
| `invariance` | Theorem 3 (Eq. 24, Lemma 2) |
| `correlation`, `sud` | the SUD analysis of App. D.1 |
| `optim`, `kfc_pre`, `kfac`, `train` | SGD, KFC-pre, K-FAC and the training loop |

## A first taste: one conv layer, exact Fisher block vs KFC

A tiny two-conv net on 6x6 inputs has a few hundred parameters, so its exact Fisher (Eq. 3, the
expectation over the model's labels taken exactly) fits in memory. Compare the block of the
second conv layer with $\\Omega\\otimes\\Gamma$.
'''),
    code('''
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
      np.linalg.norm(block - kfc) / np.linalg.norm(block))'''),
    md('''
The error is far from zero: at random initialisation and random inputs none of IAD, SH, SUD holds
exactly. What matters for optimisation is whether the *direction* of the approximate natural
gradient is good; notebooks 03 and 06 measure that. The committed figure below (made by
`python -m kfc_ref figures`) shows the same comparison on a net trained briefly on MNIST:

![exact Fisher block vs KFC](../figures/exact_vs_kfc.png)

And the headline experiment in miniature (notebook 07, `python -m kfc_ref tour`):

![KFC-pre vs SGD](../figures/training.png)
'''),
    md('''
## One approximate natural-gradient step (Eq. 22)

For each layer, $[\\hat F^{(\\gamma)}_\\ell]^{-1}\\nabla h = \\mathrm{vec}(\\Gamma^{(\\gamma)-1}
\\nabla_{\\bar W}h\\,\\Omega^{(\\gamma)-1})$ with the factored damping of Eq. 21.
'''),
    code('''
from kfc_ref.curvature.damping import factored_inverse

y = rng.integers(0, 3, size=x.shape[0])
loss, grads, _ = net.loss_and_grads(params, x, y)
inv = factored_inverse(fac.Omega, fac.Gamma, damping=1e-3)
step = inv.apply(grads[layer])                        # Gamma_d^-1 G Omega_d^-1, same shape as W_bar
dense = np.linalg.solve(np.kron(fac.Omega + inv.pi * 1e-3**0.5 * np.eye(fac.Omega.shape[0]),
                                 fac.Gamma + 1e-3**0.5 / inv.pi * np.eye(fac.Gamma.shape[0])),
                         grads[layer].T.reshape(-1))    # the same thing as one dense solve
print("pi =", inv.pi, "| max difference to the dense solve:",
      np.abs(step.T.reshape(-1) - dense).max())'''),
    md('''
## Exercises

1. Change `channels=(3, 3)` to `(2, 4)` or the activation (`activation="relu"`): how does the
   relative error change?
2. Replace the random `x` by structured inputs, e.g. `np.repeat(rng.normal(size=(n, 1, 1, 1)), 6, 2)`
   repeated along both spatial axes: spatially constant images make SH hold exactly. What
   happens to the error?
3. Run `python -m kfc_ref tour --quick --out /tmp/tour` in a terminal and open `summary.md`.
'''),
]

# --------------------------------------------------------------------------- 01 conv
NOTEBOOKS["01_conv_and_expansion"] = [
    md('''
# 1. Convolution layers and the expansion operator [[A]]

A conv layer computes (Eq. 10) $s_{i,t} = \\sum_{\\delta\\in\\Delta} w_{i,j,\\delta}\\,a_{j,t+\\delta} + b_i$
and its weight derivatives are sums over locations (Eq. 11):
$\\mathcal Dw_{i,j,\\delta} = \\sum_{t\\in\\mathcal T} a_{j,t+\\delta}\\,\\mathcal Ds_{i,t}$.

Appendix A writes both as matrix products with the **expansion operator** $[\\![A]\\!]$ (im2col,
Eq. 25): row $t$ holds the patch around location $t$, column $j|\\Delta| + \\delta$ the input map
$j$ at offset $\\delta$. With the homogeneous column of ones in front (Eq. 29),
$S = [\\![A]\\!]_H \\bar W^\\top$ (Eqs. 26, 29) and $\\mathcal D\\bar W = \\mathcal DS^\\top [\\![A]\\!]_H$
(Eq. 28). `kfc_ref` stores $\\bar W = (b \\mid W)$ with the bias in **column 0**.
'''),
    code(SETUP),
    code('''
from kfc_ref.nn.expand import ConvGeometry, im2col, col2im, expand_homogeneous
from kfc_ref.nn.loops import im2col_loops

rng = np.random.default_rng(0)
N, J, H, W = 2, 2, 5, 5
x = rng.normal(size=(N, J, H, W))
geom = ConvGeometry(kh=3, kw=3, stride=1, padding=1)       # "same" padding, as in the paper
P = im2col(x, geom)                                        # [[A]]: (N, |T|, J|Delta|)
print("[[A]] shape:", P.shape, "= (N, |T|, J*|Delta|) =", (N, H * W, J * 9))
print("equals the loop transcription of Eq. 25:", np.array_equal(P, im2col_loops(x, 3, 3, 1, 1)))
A_H = expand_homogeneous(P)                                # Eq. 29: ones column 0
print("[[A]]_H row of the top-left location (zeros come from the padding):")
print(A_H[0, 0])'''),
    md('''
## The forward pass is one matrix product (Eqs. 26, 29)

`Conv2d.forward` computes exactly $[\\![A]\\!]_H\\bar W^\\top$, reshaped to NCHW. Compare with
the definition (Eq. 10) written as loops (`reference.conv2d_loops`).
'''),
    code('''
from kfc_ref.nn.layers import Conv2d
from kfc_ref.nn.loops import conv2d_loops

I = 3
conv = Conv2d(J, I, 3, padding=1)
W_bar = conv.init_param((J, H, W), rng, "float64")
W_bar[:, 0] = rng.normal(size=I)                           # a non-zero bias, column 0
S, cache = conv.forward(x, W_bar)
S_matrix = A_H @ W_bar.T                                    # (N, |T|, I)
print("forward == [[A]]_H W_bar^T:", np.allclose(S, S_matrix.transpose(0, 2, 1).reshape(N, I, H, W)))
S_loops = conv2d_loops(x, W_bar[:, 1:].reshape(I, J, 3, 3), W_bar[:, 0], 1, 1)
print("forward == Eq. 10 loops:  ", np.allclose(S, S_loops))'''),
    md('''
## The weight gradient is $\\mathcal DS^\\top[\\![A]\\!]_H$ (Eq. 28), i.e. Eq. 11

Take a loss $L = \\sum_{n,i,t} c_{n,i,t}\\,s_{n,i,t}$ so that $\\mathcal DS = c$, backpropagate, and
compare with Eq. 11 for one weight and with a centred finite difference.
'''),
    code('''
dS = rng.normal(size=S.shape)                               # dL/dS for L = <dS, S>
dx, dW_bar = conv.backward(dS, cache, W_bar)
DS = Conv2d.derivatives(dS)                                 # (N, |T|, I)
print("dW_bar == sum_n DS_n^T [[A_n]]_H:", np.allclose(dW_bar, np.einsum("nti,ntk->ik", DS, A_H)))

i, j, u, v = 1, 0, 2, 1                                     # one weight w_{i,j,delta}
col = 1 + j * 9 + u * 3 + v
eq11 = sum(P[n, t, col - 1] * DS[n, t, i] for n in range(N) for t in range(H * W))
eps = 1e-6
Wp, Wm = W_bar.copy(), W_bar.copy()
Wp[i, col] += eps; Wm[i, col] -= eps
fd = (np.sum(dS * conv.forward(x, Wp)[0]) - np.sum(dS * conv.forward(x, Wm)[0])) / (2 * eps)
print(f"Eq. 11: {eq11:.8f}   backward: {dW_bar[i, col]:.8f}   finite difference: {fd:.8f}")'''),
    md('''
## The input gradient uses the adjoint col2im (Eq. 27)

Eq. 27 is schematic (it needs flipped offsets): the exact backward pass
to the input scatters $\\mathcal DS\\,W$ back onto the input grid. `col2im` is the exact adjoint of
`im2col`: $\\langle \\mathrm{im2col}(x), Y\\rangle = \\langle x, \\mathrm{col2im}(Y)\\rangle$.
'''),
    code('''
Y = rng.normal(size=P.shape)
lhs, rhs = np.sum(im2col(x, geom) * Y), np.sum(x * col2im(Y, x.shape, geom))
print("<im2col(x), Y> =", lhs, " <x, col2im(Y)> =", rhs)
print("dx == col2im(DS W):", np.allclose(dx, col2im(DS @ W_bar[:, 1:], x.shape, geom)))'''),
    md('''
## Exercises

1. Use `ConvGeometry(3, 3, stride=2, padding=0)` or `dilation=2`: how do $|\\mathcal T|$ and the
   patch rows change? Do the checks above still pass?
2. Count the zeros coming from the padding in `A_H`; which rows have none? (These are the
   locations where $\\beta(\\delta,\\delta')$ of Eq. 17 counts every offset.)
3. Write the backward pass for the bias alone from Eq. 28: why is it $\\sum_{n,t}\\mathcal Ds_{i,t}$?
'''),
]

# --------------------------------------------------------------------------- 02 fisher / K-FAC
NOTEBOOKS["02_fisher_and_kfac_dense"] = [
    md('''
# 2. The exact Fisher, and K-FAC for dense layers

The Fisher matrix (Eq. 3) is $F = \\mathbb E_{x\\sim\\text{data},\\,y\\sim\\text{model}}
[\\mathcal D\\theta\\,\\mathcal D\\theta^\\top]$ with $\\mathcal D\\theta = \\nabla_\\theta
(-\\log p(y\\mid x,\\theta))$. The labels come from the **model**, not the data; with the data's
labels one gets the *empirical* Fisher, a different matrix.

K-FAC keeps the diagonal blocks (one per layer) and, assuming activations and derivatives are
independent, factors each one (Eq. 4): $\\mathbb E[\\mathrm{vec}(\\mathcal D\\bar W)\\mathrm{vec}
(\\mathcal D\\bar W)^\\top] \\approx \\Psi\\otimes\\Gamma$ with $\\Psi = \\mathbb E[\\bar a\\bar a^\\top]$
and $\\Gamma = \\mathbb E[\\mathcal Ds\\,\\mathcal Ds^\\top]$. A dense layer is a conv layer with
one location ($|\\mathcal T| = 1$), so `kfc_ref` computes $\\Psi$ with the same code as $\\Omega$.
'''),
    code(SETUP),
    code('''
from kfc_ref.nn.layers import Dense, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.curvature.fisher import true_fisher, monte_carlo_fisher, empirical_fisher, fisher_blocks, \\
    exact_layer_factors, kl_divergence

rng = np.random.default_rng(0)
net = Sequential([Dense(4, 6), Tanh(), Dense(6, 3)], (4,))
params = net.init(0, "float64")
n = 50 if QUICK else 200
x = rng.normal(size=(n, 4))
y = rng.integers(0, 3, n)
F = true_fisher(net, params, x)
print(net, "\\nF:", F.shape, "symmetric:", np.allclose(F, F.T),
      "| smallest eigenvalue:", np.linalg.eigvalsh(F).min())'''),
    md('''
## Monte-Carlo vs exact vs empirical

With $k$ sampled labels per example the Monte-Carlo Fisher converges to $F$ like $k^{-1/2}$
(Section 3.1 samples one label per example). The empirical Fisher does not converge to $F$.
'''),
    code('''
ks = [1, 4, 16] if QUICK else [1, 4, 16, 64]
for k in ks:
    Fk = monte_carlo_fisher(net, params, x, k, np.random.default_rng(k))
    print(f"k = {k:3d} samples/example: ||F_k - F|| / ||F|| = "
          f"{np.linalg.norm(Fk - F) / np.linalg.norm(F):.3f}")
Fe = empirical_fisher(net, params, x, y)
print(f"empirical Fisher:          ||F_emp - F|| / ||F|| = {np.linalg.norm(Fe - F) / np.linalg.norm(F):.3f}")'''),
    md('''
## The Fisher is the curvature of the KL divergence

$\\mathrm{KL}(p_\\theta \\,\\|\\, p_{\\theta+\\epsilon v}) \\approx \\tfrac12\\epsilon^2 v^\\top F v$
(Section 2.1; this is also why update clipping in Algorithm 1 bounds $v^\\top F v$).
'''),
    code('''
v = rng.normal(size=net.num_params)
theta = net.flatten(params)
for eps in (1e-1, 1e-2, 1e-3):
    moved = net.unflatten(theta + eps * v)
    kl = float(kl_divergence(net.forward(params, x).output, net.forward(moved, x).output))
    print(f"eps = {eps:g}: KL = {kl:.3e}   0.5 eps^2 v^T F v = {0.5 * eps**2 * v @ F @ v:.3e}")'''),
    md('''
## K-FAC's factors (Eq. 4) against the exact blocks

`exact_layer_factors` returns $\\Psi$ (called `Omega`: with $|\\mathcal T| = 1$ it is K-FAC's
$\\mathbb E[\\bar a\\bar a^\\top]$, bias coordinate first) and $\\Gamma$ with the expectation over
$y$ taken exactly.
'''),
    code('''
for k, (layer, block) in enumerate(zip(net.param_layers, fisher_blocks(F, net))):
    fac = exact_layer_factors(net, params, x, layer)
    approx = np.kron(fac.Omega, fac.Gamma)
    print(f"layer {layer}: block {block.shape}, ||F_l - Psi kron Gamma|| / ||F_l|| = "
          f"{np.linalg.norm(block - approx) / np.linalg.norm(block):.3f}")'''),
    md('''
IAD fails across the data distribution: both the activations and the derivatives depend on $x$.
With a single example the activations are fixed numbers, so IAD holds trivially and the block of
a dense layer is exactly $\\Psi\\otimes\\Gamma$:
'''),
    code('''
fac = exact_layer_factors(net, params, x[:1], net.param_layers[0])
block = fisher_blocks(true_fisher(net, params, x[:1]), net)[0]
print("one example:", np.linalg.norm(block - np.kron(fac.Omega, fac.Gamma)) / np.linalg.norm(block))'''),
    md('''
## Inverting a Kronecker product (Eqs. 5-6)

$(\\Psi\\otimes\\Gamma)^{-1}\\mathrm{vec}(G) = \\mathrm{vec}(\\Gamma^{-1}G\\Psi^{-1})$ in the
column-stacking `vec` the paper uses (`X.ravel(order="F")`, or `X.T.reshape(-1)`).
'''),
    code('''
fac = exact_layer_factors(net, params, x, net.param_layers[1])
Psi = fac.Omega + 1e-3 * np.eye(fac.Omega.shape[0])       # a little damping keeps them invertible
Gam = fac.Gamma + 1e-3 * np.eye(fac.Gamma.shape[0])
G = rng.normal(size=(Gam.shape[0], Psi.shape[0]))          # I x (1 + J), like W_bar
fast = np.linalg.solve(Gam, G) @ np.linalg.inv(Psi)        # Gamma^-1 G Psi^-1
dense = np.linalg.solve(np.kron(Psi, Gam), G.ravel(order="F"))
print("Eq. 6 == dense solve:", np.allclose(fast.ravel(order="F"), dense))'''),
    md('''
## Exercises

1. Replace `Tanh` by `ReLU` (`from kfc_ref.nn.layers import ReLU`): does K-FAC get better or worse?
2. How many Monte-Carlo samples per example are needed for a 5% relative error?
3. Show numerically that the empirical Fisher equals the Fisher when the labels `y` are drawn from
   the model (`kfc_ref.nn.losses.sample_targets`) and averaged over many draws.
'''),
]

# --------------------------------------------------------------------------- 03 KFC theorems
NOTEBOOKS["03_kfc_theorems"] = [
    md('''
# 3. KFC: Theorems 1 and 2 alongside the code

For one conv layer the Fisher block entries are (Eq. 12)
$\\mathbb E[\\mathcal Dw_{i,j,\\delta}\\mathcal Dw_{i',j',\\delta'}] = \\mathbb E[(\\sum_t a_{j,t+\\delta}
\\mathcal Ds_{i,t})(\\sum_{t'} a_{j',t'+\\delta'}\\mathcal Ds_{i',t'})]$.

* **IAD**: activations independent of derivatives;
* **SH** (Eqs. 13-15): $\\mathbb E[a_{j,t}] = M(j)$, $\\mathbb E[a_{j,t}a_{j',t'}] = \\Omega(j,j',t'-t)$,
  $\\mathbb E[\\mathcal Ds_{i,t}\\mathcal Ds_{i',t'}] = \\Gamma(i,i',t'-t)$;
* **SUD**: $\\Gamma(i,i',\\delta) = 0$ for $\\delta\\ne 0$.

**Theorem 1** (Eqs. 16-17): under all three,
$\\mathbb E[\\mathcal Dw_{i,j,\\delta}\\mathcal Dw_{i',j',\\delta'}] = \\beta(\\delta,\\delta')\\,
\\Omega(j,j',\\delta'-\\delta)\\,\\Gamma(i,i',0)$, i.e. the block is $\\Omega\\otimes\\Gamma$ (Eqs. 18-19),
where $\\beta$ counts the locations at which both offsets fall inside the map.
'''),
    code(SETUP),
    code('''
from kfc_ref.nn.expand import ConvGeometry
from kfc_ref.theory.theorem1 import (StationaryGaussianField, beta, beta_matrix, exact_gradient_second_moment,
                              theorem1_prediction, exact_omega, omega_from_autocovariance, plugin_omega)

geom = ConvGeometry(3, 3, stride=1, padding=1)
T1 = T2 = 4
print("beta(delta, delta') for the 3x3 offsets on a 4x4 map (Eq. 17), rows/cols = u*3 + v:")
print(beta_matrix(geom, T1, T2).astype(int))
print("e.g. beta((-1,-1), (1,1)) =", beta((-1, -1), (1, 1), T1, T2), "locations")'''),
    md('''
## Theorem 1, exactly

`StationaryGaussianField` builds random fields on which the assumptions hold **by construction**:
activations with any spatial covariance (SH on a torus), derivatives that are white across
locations (SUD), drawn independently (IAD). `exact_gradient_second_moment` computes
$\\mathbb E[\\mathrm{vec}(\\mathcal D\\bar W)\\mathrm{vec}(\\mathcal D\\bar W)^\\top]$ *without sampling*
(the gradient is bilinear in Gaussian inputs), and `theorem1_prediction` builds
$\\Omega\\otimes\\Gamma(\\cdot,\\cdot,0)$ from the fields' exact statistics via Eqs. 18-19 and 47.
'''),
    code('''
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
      np.linalg.norm(exact2 - pred2) / np.linalg.norm(exact2))'''),
    md('''
## Theorem 2: estimate $\\Omega$ and $\\Gamma$ from mini-batches (Eq. 23)

Plugging an *estimated* autocovariance into Eq. 19 can give an indefinite $\\Omega$ (Section 3.1).
Theorem 2 says that under SH, $\\Omega = \\mathbb E[[\\![A]\\!]_H^\\top[\\![A]\\!]_H]$ and
$\\Gamma = \\frac1{|\\mathcal T|}\\mathbb E[\\mathcal DS^\\top\\mathcal DS]$: Gram matrices, PSD by
construction (`kfc_ref.curvature.factors`).
'''),
    code('''
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
      "| Gram Omega:", np.linalg.eigvalsh(omega_from_patches(im2col(x_bad, geom))).min())'''),
    md('''
## How far is a real layer from KFC? The approximation ladder

On a real network none of the assumptions holds exactly. `approximation_ladder` applies them one
at a time to the exact block of one conv layer (design notes, section 6):
exact -> IAD -> IAD+SUD -> KFC (+SH), plus KFC-SUA (Appendix C) and the diagonal, reporting the
relative error and the angle between the damped solves $F^{-1}g$ and $F_k^{-1}g$.
'''),
    code('''
from kfc_ref.experiments import studies as ex
from kfc_ref.data import load_dataset, preprocess
from kfc_ref.theory.ladder import format_ladder

data = preprocess(load_dataset("digits"))                   # 8x8 digits: the fastest built-in data
budget = ex.QUICK if QUICK else ex.TOUR
problem = ex.tiny_problem(data, budget)                    # tiny tanh net, a few SGD steps, float64
ladder = ex.exact_vs_kfc(problem, budget.ladder_examples)
print(format_ladder(ladder))'''),
    md('''
The same comparison on MNIST, drawn by `python -m kfc_ref figures`:

![ladder](../figures/ladder.png)

## Exercises

1. In the Theorem 1 cell, break IAD instead of SUD: use the same noise for activations and
   derivatives (hint: `exact_gradient_second_moment` assumes independence -- build a case where
   the prediction fails by sampling both from one field and estimating with `im2col`).
2. Change `geom` to stride 2 or padding 0: Theorem 1 still holds with the general $\\beta$
   (appendices section 10 item 5). Check it.
3. Which rung of the ladder loses the most? Try `problem.layer_index = problem.net.param_layers[0]`.
'''),
]

# --------------------------------------------------------------------------- 04 SUD
NOTEBOOKS["04_sud_measured"] = [
    md('''
# 4. The SUD assumption, measured (Appendix D.1, Figures 3 and 4)

SUD says the pre-activation derivatives at different locations are uncorrelated:
$\\Gamma(i,i',\\delta) = 0$ for $\\delta\\ne0$. Appendix D.1 checks it on trained nets, with targets
sampled from the model: the spatial autocorrelation of the derivatives of a few maps (Figure 3a),
the cross-map correlation at one location (3b), the same with average instead of max pooling
(3c-d), and the activations (Figure 4), which are strongly correlated.
'''),
    code(SETUP),
    code(SHOW),
    md('''
## The estimators, on fields with a known answer

`spatial_autocorrelation` returns $\\mathbb E[f_{c,t}f_{c,t+\\delta}] / \\mathbb E[f_{c,t}^2]$ per
map and offset. White noise has zero off-centre correlation; a 2-tap moving average along the
rows, $f_t = z_t + z_{t+1}$, has correlation exactly $1/2$ at row offset 1 and 0 beyond.
'''),
    code('''
from kfc_ref.theory.correlation import spatial_autocorrelation, cross_map_correlation, mean_offcentre_correlation

rng = np.random.default_rng(0)
n = 200 if QUICK else 1000
white = rng.normal(size=(n, 2, 12, 12))
z = rng.normal(size=(n, 2, 13, 12))
smooth = z[:, :, 1:] + z[:, :, :-1]                        # correlated along the rows only
R = 2
for name, field in (("white", white), ("moving average", smooth)):
    ac = spatial_autocorrelation(field, R)
    print(f"{name:15s} offset (1,0): {ac[0, R + 1, R]:+.3f}  (0,1): {ac[0, R, R + 1]:+.3f}  "
          f"(2,0): {ac[0, R + 2, R]:+.3f}  | mean off-centre |corr| {float(mean_offcentre_correlation(ac)):.3f}")
print("noise level ~ 1/sqrt(n |T|) =", 1 / np.sqrt(n * 144))'''),
    md('''
## A briefly trained net: max pooling vs average pooling

Train the same small net twice with SGD (`kfc_ref.experiments.train`), once with max pooling and once with
average pooling, then run `sud_analysis` on held-out images.
'''),
    code('''
import tempfile
from kfc_ref.experiments.train import TrainConfig, train
from kfc_ref.theory.sud import sud_analysis
from kfc_ref.experiments import plotting

DATA = "digits" if QUICK else "mnist5k"
iters = 10 if QUICK else 40
out = tempfile.mkdtemp()
runs = {}
for arch in ("small", "small-avg"):
    runs[arch] = train(TrainConfig(optimizer="sgd", data=DATA, arch=arch, iters=iters,
                                   eval_every=iters, batch_size=64, out=os.path.join(out, arch),
                                   quiet=True))
    print(arch, runs[arch].metrics[-1])
x_eval = runs["small"].dataset.x_test[:100 if QUICK else 300]
sud = {arch: sud_analysis(r.net, r.params, x_eval, np.random.default_rng(1))
       for arch, r in runs.items()}
for arch, layers in sud.items():
    print(arch, "derivatives:", [round(l.derivative_summary, 3) for l in layers],
          "activations:", [round(l.activation_summary, 3) for l in layers])'''),
    code('''
rows = [(f"{'max' if arch == 'small' else 'avg'} conv{k + 1}", l.derivative_autocorr, l.derivative_cross)
        for arch in ("small", "small-avg") for k, l in enumerate(sud[arch])]
png = plotting.plot_correlation_panels(rows, "derivatives: max pool (top) vs avg pool (bottom)",
                                       out, "derivatives")[0]
show(png)
rows = [(f"conv{k + 1}", l.activation_autocorr, l.activation_cross) for k, l in enumerate(sud["small"])]
show(plotting.plot_correlation_panels(rows, "activations (uncentred, Figure 4)", out, "activations")[0])'''),
    md('''
With max pooling only the unit that wins its pool receives a derivative, which sparsifies the
derivatives and decorrelates neighbours (the paper's explanation); average pooling spreads the
same derivative over the whole window. The committed figure from `python -m kfc_ref figures`
(MNIST, 500 test images):

![SUD summary](../figures/sud_summary.png)

## Tracking the summary over training

The scalar summary (mean |correlation| at non-zero offsets) can be followed along a run. Here with
the optimizer interface directly (`opt.step`), measuring every few steps:
'''),
    code('''
from kfc_ref.optim import SGD
from kfc_ref.data import MinibatchStream
from kfc_ref.theory.sud import sud_summary
from kfc_ref.nn.models import build_model

data = runs["small"].dataset
net = build_model("small", data.image_shape, data.num_classes)
params = net.init(0)
opt = SGD(lr=0.03, averaging_tau=0)
state = opt.init_state(net, params)
stream = MinibatchStream(data.x_train, data.y_train, 64, seed=0)
step_rng = np.random.default_rng(0)
history = []
steps, every = (12, 4) if QUICK else (40, 10)
for k in range(steps + 1):
    if k % every == 0:
        s = sud_summary(net, params, x_eval, np.random.default_rng(1))
        history.append((k, [d for d, _ in s.values()]))
    params, state, _ = opt.step(state, net, params, next(stream), step_rng)
ks = [h[0] for h in history]
for layer in range(len(history[0][1])):
    plt.plot(ks, [h[1][layer] for h in history], "o-", label=f"conv{layer + 1}")
plt.xlabel("SGD iteration"); plt.ylabel("mean |corr.| of derivatives, offset != 0"); plt.legend()
plt.show()'''),
    md('''
## Exercises

1. Increase the number of evaluation images: the off-centre values of the max-pool net fall
   towards the noise level $1/\\sqrt{N|\\mathcal T|}$; those of the average-pool net do not.
2. Compute the derivative summary with `centered=True` in `spatial_autocorrelation`: does it
   change? (Under model-sampled targets $\\mathbb E[\\mathcal Ds] = 0$.)
3. Replace the sampled targets by the true labels (build records with `net.records` after a
   backward pass on `y`): the *empirical* derivatives. Are they as uncorrelated?
'''),
]

# --------------------------------------------------------------------------- 05 invariance
NOTEBOOKS["05_invariance"] = [
    md('''
# 5. Invariance (Theorem 3)

Replace every elementwise nonlinearity by (Eq. 24)
$A^\\dagger = \\phi(S^\\dagger U + \\mathbf 1 c^\\top) V + \\mathbf 1 d^\\top$ -- invertible maps
$U$, $V$ and shifts $c$, $d$ acting *pointwise across feature maps*. Lemma 2 (Eq. 84) gives
parameters $\\bar W^\\dagger = U^{-\\top}(\\bar W - c e^\\top)[\\![V]\\!]_H^{-\\top}$ with which the new
network $\\mathcal N^\\dagger$ computes the same function. **Theorem 3**: an (undamped) KFC step
on $\\mathcal N^\\dagger$, mapped back, is the KFC step on $\\mathcal N$. This includes centring and
whitening the activations (Section 4.1). SGD has no such property.
'''),
    code(SETUP),
    code(SHOW),
    code('''
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.theory.invariance import (random_reparameterization, dagger_network, dagger_params,
                                original_params, function_discrepancy, invariance_error)

rng = np.random.default_rng(0)
net = Sequential([Conv2d(2, 3, 3), Tanh(), Conv2d(3, 2, 2), Tanh(), Flatten(), Dense(8, 3)], (2, 5, 5))
params = net.init(0, "float64")
x, y = rng.normal(size=(20, 2, 5, 5)), rng.integers(0, 3, 20)
reparam = random_reparameterization(net, rng, params[0])    # random U, c, V, d everywhere
net_d = dagger_network(net, reparam)
params_d = dagger_params(net, params, reparam)              # Lemma 2, Eq. 84
print(net_d)
print("same function (max |log p - log p_dagger|):", function_discrepancy(net, params, net_d, params_d, x))
print("round trip of the parameters:", max(np.abs(a - b).max() for a, b in
      zip(original_params(net, params_d, reparam), params) if a is not None))'''),
    md('''
## One step, four update rules

`invariance_error` takes one step on both networks (same batch, same sampled targets), maps the
second back and reports the largest gap in log-probabilities. Undamped KFC is invariant; SGD, a
diagonal Fisher and damped KFC (with non-orthogonal $U$, $V$) are not -- they are the negative
controls of `python -m kfc_ref check`.
'''),
    code('''
for method, damping in (("kfc", None), ("sgd", None), ("diagonal-fisher", 1e-4), ("kfc-damped", 1e-2)):
    err = invariance_error(net, params, reparam, x, y, x, seed=3, lr=0.5, method=method, damping=damping)
    print(f"{method:16s} gap after one step: {err:.2e}")'''),
    md('''
## A whole trajectory: centring and whitening

`experiments.invariance_trajectories` whitens the input and every tanh output of a tiny net
(on the data, at initialisation) and runs full-batch steps of undamped KFC and of SGD on both
networks.
'''),
    code('''
from kfc_ref.experiments import studies as ex
from kfc_ref.experiments import plotting
from kfc_ref.data import load_dataset, preprocess
import tempfile

data = preprocess(load_dataset("digits"))
n, iters = (64, 5) if QUICK else (256, 40)
xs, ys = data.x_train[:n].astype(np.float64), data.y_train[:n]
run = ex.invariance_trajectories(xs, ys, 10, iters)
for name, losses in run.losses.items():
    print(f"{name:28s} loss {losses[0]:.4f} -> {losses[-1]:.4f}")
show(plotting.plot_invariance(run.losses, run.gaps, "Theorem 3 (digits)", tempfile.mkdtemp(), "inv")[0])'''),
    md('''
## Exercises

1. Use `random_reparameterization(..., orthogonal=True, shifts=False)`: now damped KFC is
   invariant too (why? $\\pi$ and $\\gamma I$ commute with orthogonal maps).
2. Put a zero-padded conv in front of a shift $d \\ne 0$ (`Conv2d(..., padding=1)`): `dagger_params`
   refuses, because the padded zeros of $[\\![A]\\!]$ would not be shifted (appendices E.2).
3. In the trajectory, raise the KFC learning rate in `ex.INVARIANCE_LR`: the two KFC curves stay
   together even when they diverge -- invariance is not stability.
'''),
]

# --------------------------------------------------------------------------- 06 damping
NOTEBOOKS["06_damping"] = [
    md('''
# 6. Damping: factored (Eqs. 7-8, 20-21) vs exact (App. B.2)

We want $[\\hat F_\\ell + (\\lambda+\\gamma)I]^{-1}\\nabla h$, but adding a multiple of the identity
breaks the Kronecker structure. Two answers:

* **factored** (Eq. 7 / 21): $(\\Omega + \\pi\\sqrt{\\lambda+\\gamma}I)\\otimes(\\Gamma + \\tfrac1\\pi
  \\sqrt{\\lambda+\\gamma}I)$, with $\\pi$ from Eq. 8 (trace norm) minimising a bound on the residual;
  its inverse is cheap (Eq. 22). KFC-pre uses it.
* **exact** (Eqs. 33-38): eigendecompose both factors; then
  $(\\hat F + \\gamma I)^{-1}\\mathrm{vec}(G) = \\mathrm{vec}(Q_\\Gamma[(Q_\\Gamma^\\top G Q_\\Omega)\\oslash
  (d_\\Gamma d_\\Omega^\\top + \\gamma)]Q_\\Omega^\\top)$. K-FAC (App. B.2) uses it.
'''),
    code(SETUP),
    code(SHOW),
    code('''
from kfc_ref.curvature.damping import pi_trace, factored_inverse, eigen_factors

rng = np.random.default_rng(0)
def gram(d, scale):
    B = rng.normal(size=(d, d)) * scale
    return B @ B.T
Omega, Gamma = gram(7, 3.0), gram(3, 0.1)                  # very different scales, as in real layers
G = rng.normal(size=(3, 7))
gamma = 1e-2
pi = pi_trace(Omega, Gamma)
# the residual of Eq. 7 is pi r (I kron Gamma) + (r/pi) (Omega kron I); its trace-norm bound is
# minimised at Eq. 8's pi:
r = gamma ** 0.5
bound = lambda p: p * r * np.trace(np.kron(np.eye(7), Gamma)) + r / p * np.trace(np.kron(Omega, np.eye(3)))
grid = pi * np.exp(np.linspace(-3, 3, 601))
print(f"pi (Eq. 8) = {pi:.4f}; grid minimiser = {grid[np.argmin([bound(p) for p in grid])]:.4f}")

dense = np.kron(Omega, Gamma) + gamma * np.eye(21)
exact = eigen_factors(Omega, Gamma).apply(G, gamma)        # Eqs. 36-38
fact = factored_inverse(Omega, Gamma, gamma).apply(G)      # Eqs. 21-22
ref = np.linalg.solve(dense, G.ravel(order="F"))
print("exact eigen solve == dense solve:", np.allclose(exact.ravel(order="F"), ref))
print("factored vs exact: relative difference",
      np.linalg.norm(fact - exact) / np.linalg.norm(exact))'''),
    md('''
## On a real layer, against the exact Fisher block

`experiments.damping_sweep` compares, over a range of $\\gamma$, the factored solve with the exact
damped KFC solve, and both with the damped solve of the *exact* Fisher block
$(F+\\gamma I)^{-1}g$ of the same layer.
'''),
    code('''
from kfc_ref.experiments import studies as ex
from kfc_ref.experiments import plotting
from kfc_ref.data import load_dataset, preprocess
from kfc_ref.experiments.figures import figure_damping, Results
import tempfile

data = preprocess(load_dataset("digits"))
budget = ex.QUICK if QUICK else ex.TOUR
problem = ex.tiny_problem(data, budget)
ladder = ex.exact_vs_kfc(problem, budget.ladder_examples)
sweep = ex.damping_sweep(problem, ladder, budget.ladder_examples, budget.dampings)
for g, e, a, af, ae in zip(sweep.dampings, sweep.factored_vs_exact_error, sweep.factored_vs_exact_angle,
                           sweep.factored_vs_fisher_angle, sweep.exact_vs_fisher_angle):
    print(f"gamma {g:8.1e}: factored vs exact {e:6.3f} ({a:5.2f} deg) | angle to (F+gamma I)^-1 g: "
          f"factored {af:5.2f}, exact {ae:5.2f} deg")
res = Results("digits", budget, damping=sweep)
show(figure_damping(res, tempfile.mkdtemp())[0])'''),
    md('''
The factored and exact damped solves can differ a lot as vectors while being about equally far
from the exact Fisher's solve: the KFC approximation itself, not the damping, dominates the
error at small $\\gamma$; at large $\\gamma$ everything tends to a scaled gradient.

## Exercises

1. Set `use_pi=False` in `factored_inverse`: how much worse is the factored solve?
2. With weight decay $\\lambda$ the strength is $\\sqrt{\\lambda+\\gamma}$: pass `weight_decay=1e-3`.
3. When is the factored damping *exactly* right? (Hint: $\\Omega\\propto I$ or $\\Gamma\\propto I$.)
'''),
]

# --------------------------------------------------------------------------- 07 training
NOTEBOOKS["07_training"] = [
    md('''
# 7. Training with KFC-pre vs SGD (Section 5.2, Algorithm 1)

KFC-pre (App. B.1) is SGD with momentum whose gradient is replaced by the approximate natural
gradient of Eq. 22, plus: factors estimated with Eq. 23 as moving averages (refreshed every
$T_s$ iterations, inverses every $T_f$), update clipping with $\\nu = v^\\top Fv + \\lambda v^\\top v
\\le C = 0.3$ (exact Fisher-vector products through forward-mode passes), and parameter averaging.
The paper's headline (Figures 1-2): KFC-pre reaches a given training error several times faster
than tuned SGD in wall-clock, and in far fewer iterations with large mini-batches.

`kfc_ref.experiments.train.train` runs either optimizer and logs `metrics.csv`; this notebook runs a short
comparison (the committed figure at the end comes from `python -m kfc_ref tour`).
'''),
    code(SETUP),
    code(SHOW),
    code('''
import tempfile
from kfc_ref.experiments.train import TrainConfig, TrainingStopped, train, read_metrics
from kfc_ref.experiments import plotting

DATA = "digits" if QUICK else "mnist5k"
iters = 8 if QUICK else 40
out = tempfile.mkdtemp()
runs = {}
for optimizer in ("sgd", "kfc-pre"):
    cfg = TrainConfig(optimizer=optimizer, data=DATA, batch_size=64 if QUICK else 128, iters=iters,
                      eval_every=max(1, iters // 8), out=os.path.join(out, optimizer), quiet=True,
                      max_train=512 if QUICK else None)
    try:
        train(cfg)
    except TrainingStopped as exc:         # an exploding loss: metrics.csv keeps the good part
        print(f"{optimizer} stopped: {exc}")
    runs[optimizer] = read_metrics(cfg.out)
    last = runs[optimizer][-1]
    print(f"{optimizer:8s} {int(last['iteration'])} iterations, {last['wall_seconds']:.1f} s: "
          f"train error {last['train_error']:.3f}, test error {last['test_error']:.3f}")'''),
    code('''
show(plotting.plot_training_curves(runs, f"KFC-pre vs SGD on {DATA}", out, "curves")[0])'''),
    md('''
## KFC-pre's diagnostics

Each row of `metrics.csv` also has $\\nu$ of the last step, whether clipping fired, and $\\pi$ per
layer (Eq. 8). The paper notes clipping fires mostly early in training.
'''),
    code('''
for row in runs["kfc-pre"]:
    print(f"iteration {int(row['iteration']):4d}: nu = {row['nu']:.3g}, clipped = {bool(row['clipped'])}, "
          f"pi = {[round(p, 2) for p in row['pi']]}")'''),
    md('''
The tour's comparison on MNIST (45 s of training each, batch 128 for both):

![training curves](../figures/training.png)

## Exercises

1. Use the paper's mini-batch for KFC-pre (`batch_size=512`): fewer, better steps. Compare
   against iterations and against seconds.
2. Sweep the learning rate over the paper's grid: `python -m kfc_ref sweep --help`.
3. Switch clipping off: `TrainConfig(..., optimizer_options={"clip": None})`. What happens early?
4. Try full K-FAC with KFC blocks: `optimizer="kfac"` (no learning rate: it picks its own step).
'''),
]


def build(out_dir: str = HERE) -> list[str]:
    """Write every notebook (no outputs) and return the paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        for k, cell in enumerate(cells):
            cell.id = f"cell-{k:02d}"          # stable ids: regenerating leaves git clean
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        path = os.path.join(out_dir, f"{name}.ipynb")
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p)
