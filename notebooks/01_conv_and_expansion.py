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
# # 1. Convolution layers and the expansion operator [[A]]
#
# A conv layer computes (Eq. 10)
# $s_{i,t} = \sum_{\delta\in\Delta} w_{i,j,\delta}\,a_{j,t+\delta} + b_i$
# and its weight derivatives are sums over locations (Eq. 11):
# $\mathcal Dw_{i,j,\delta} = \sum_{t\in\mathcal T} a_{j,t+\delta}\,\mathcal Ds_{i,t}$.
#
# Appendix A writes both as matrix products with the **expansion operator** $[\![A]\!]$ (im2col,
# Eq. 25): row $t$ holds the patch around location $t$, column $j|\Delta| + \delta$ the input map
# $j$ at offset $\delta$. With the homogeneous column of ones in front (Eq. 29),
# $S = [\![A]\!]_H \bar W^\top$ (Eqs. 26, 29) and $\mathcal D\bar W = \mathcal DS^\top [\![A]\!]_H$
# (Eq. 28). `kfc_ref` stores $\bar W = (b \mid W)$ with the bias in **column 0**.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds.
import numpy as np
from nbsetup import QUICK

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %%
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
print(A_H[0, 0])

# %% [markdown]
# ## The forward pass is one matrix product (Eqs. 26, 29)
#
# `Conv2d.forward` computes exactly $[\![A]\!]_H\bar W^\top$, reshaped to NCHW. Compare with
# the definition (Eq. 10) written as loops (`kfc_ref.nn.loops.conv2d_loops`).

# %%
from kfc_ref.nn.layers import Conv2d
from kfc_ref.nn.loops import conv2d_loops

I = 3
conv = Conv2d(J, I, 3, padding=1)
W_bar = conv.init_param((J, H, W), rng, "float64")
W_bar[:, 0] = rng.normal(size=I)                           # a non-zero bias, column 0
S, cache = conv.forward(x, W_bar)
S_matrix = A_H @ W_bar.T                                    # (N, |T|, I)
print("forward == [[A]]_H W_bar^T:",
      np.allclose(S, S_matrix.transpose(0, 2, 1).reshape(N, I, H, W)))
S_loops = conv2d_loops(x, W_bar[:, 1:].reshape(I, J, 3, 3), W_bar[:, 0], 1, 1)
print("forward == Eq. 10 loops:  ", np.allclose(S, S_loops))

# %% [markdown]
# ## The weight gradient is $\mathcal DS^\top[\![A]\!]_H$ (Eq. 28), i.e. Eq. 11
#
# Take a loss $L = \sum_{n,i,t} c_{n,i,t}\,s_{n,i,t}$ so that $\mathcal DS = c$, backpropagate, and
# compare with Eq. 11 for one weight and with a centred finite difference.

# %%
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
print(f"Eq. 11: {eq11:.8f}   backward: {dW_bar[i, col]:.8f}   finite difference: {fd:.8f}")

# %% [markdown]
# ## The input gradient uses the adjoint col2im (Eq. 27)
#
# Eq. 27 is schematic (it needs flipped offsets): the exact backward pass
# to the input scatters $\mathcal DS\,W$ back onto the input grid. `col2im` is the exact adjoint of
# `im2col`: $\langle \mathrm{im2col}(x), Y\rangle = \langle x, \mathrm{col2im}(Y)\rangle$.

# %%
Y = rng.normal(size=P.shape)
lhs, rhs = np.sum(im2col(x, geom) * Y), np.sum(x * col2im(Y, x.shape, geom))
print("<im2col(x), Y> =", lhs, " <x, col2im(Y)> =", rhs)
print("dx == col2im(DS W):", np.allclose(dx, col2im(DS @ W_bar[:, 1:], x.shape, geom)))

# %% [markdown]
# ## Exercises
#
# 1. Use `ConvGeometry(3, 3, stride=2, padding=0)` or `dilation=2`: how do $|\mathcal T|$ and the
#    patch rows change? Do the checks above still pass?
# 2. Count the zeros coming from the padding in `A_H`; which rows have none? (These are the
#    locations where $\beta(\delta,\delta')$ of Eq. 17 counts every offset.)
# 3. Write the backward pass for the bias alone from Eq. 28: why is it
#    $\sum_{n,t}\mathcal Ds_{i,t}$?
