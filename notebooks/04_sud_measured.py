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
# # 4. The SUD assumption, measured (Appendix D.1, Figures 3 and 4)
#
# SUD says the pre-activation derivatives at different locations are uncorrelated:
# $\Gamma(i,i',\delta) = 0$ for $\delta\ne0$. Appendix D.1 checks it on trained nets, with targets
# sampled from the model: the spatial autocorrelation of the derivatives of a few maps (Figure 3a),
# the cross-map correlation at one location (3b), the same with average instead of max pooling
# (3c-d), and the activations (Figure 4), which are strongly correlated.

# %%
# Setup (notebooks/nbsetup.py): use this checkout's kfc_ref; QUICK (KFC_REF_QUICK=1, what CI
# sets) shrinks every experiment so the notebook runs in seconds; show(png) displays a figure.
import os

import numpy as np
from nbsetup import QUICK, show

import kfc_ref

print("quick mode" if QUICK else "full mode", "| kfc_ref", kfc_ref.__version__)

# %% [markdown]
# ## The estimators, on fields with a known answer
#
# `spatial_autocorrelation` returns $\mathbb E[f_{c,t}f_{c,t+\delta}] / \mathbb E[f_{c,t}^2]$ per
# map and offset. White noise has zero off-centre correlation; a 2-tap moving average along the
# rows, $f_t = z_t + z_{t+1}$, has correlation exactly $1/2$ at row offset 1 and 0 beyond.

# %%
from kfc_ref.theory.correlation import mean_offcentre_correlation, spatial_autocorrelation

rng = np.random.default_rng(0)
n = 200 if QUICK else 1000
white = rng.normal(size=(n, 2, 12, 12))
z = rng.normal(size=(n, 2, 13, 12))
smooth = z[:, :, 1:] + z[:, :, :-1]                        # correlated along the rows only
R = 2
for name, field in (("white", white), ("moving average", smooth)):
    ac = spatial_autocorrelation(field, R)
    print(f"{name:15s} offset (1,0): {ac[0, R + 1, R]:+.3f}  (0,1): {ac[0, R, R + 1]:+.3f}  "
          f"(2,0): {ac[0, R + 2, R]:+.3f}  | mean off-centre |corr| "
          f"{float(mean_offcentre_correlation(ac)):.3f}")
print("noise level ~ 1/sqrt(n |T|) =", 1 / np.sqrt(n * 144))

# %% [markdown]
# ## A briefly trained net: max pooling vs average pooling
#
# Train the same small net twice with SGD (`kfc_ref.experiments.train`), once with max pooling
# and once with average pooling, then run `sud_analysis` on held-out images.

# %%
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
          "activations:", [round(l.activation_summary, 3) for l in layers])

# %%
rows = [(f"{'max' if arch == 'small' else 'avg'} conv{k + 1}", l.derivative_autocorr,
         l.derivative_cross) for arch in ("small", "small-avg") for k, l in enumerate(sud[arch])]
png = plotting.plot_correlation_panels(rows, "derivatives: max pool (top) vs avg pool (bottom)",
                                       out, "derivatives")[0]
show(png)
rows = [(f"conv{k + 1}", l.activation_autocorr, l.activation_cross)
        for k, l in enumerate(sud["small"])]
show(plotting.plot_correlation_panels(rows, "activations (uncentred, Figure 4)", out,
                                      "activations")[0])

# %% [markdown]
# **Why the cross-map panels are mostly white.** A correlation needs a non-zero variance: a map
# whose derivative is zero on every evaluation image has none, and its row and column of the
# cross-map matrix (and its spatial panel) are left blank. After so little training many maps of
# the second conv layer are *dead*: their ReLU is off at every location of every image, so they
# receive no derivative at all. The cross-map matrix is taken at one location, where a live map
# of the max-pool net can also be zero everywhere because it never wins its pool there. The
# averages printed above skip such maps. Count them:

# %%
for arch, layers in sud.items():
    for k, l in enumerate(layers):
        dead = np.isnan(l.derivative_autocorr).all(axis=(1, 2))      # zero everywhere
        blank = np.isnan(np.diag(l.derivative_cross))                # zero at the panel's location
        print(f"{arch:9s} conv{k + 1}: {len(dead)} maps, {dead.sum()} dead, "
              f"{blank.sum()} blank in the cross-map panel")

# %% [markdown]
# With max pooling only the unit that wins its pool receives a derivative, which sparsifies the
# derivatives and decorrelates neighbours (the paper's explanation); average pooling spreads the
# same derivative over the whole window. The committed figure from `python -m kfc_ref figures`
# (MNIST, 500 test images):
#
# ![SUD summary](../figures/sud_summary.png)
#
# ## Tracking the summary over training
#
# The scalar summary (mean |correlation| at non-zero offsets) can be followed along a run. Here with
# the optimizer interface directly (`opt.step`), measuring every few steps:

# %%
import matplotlib.pyplot as plt

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
plt.xlabel("SGD iteration")
plt.ylabel("mean |corr.| of derivatives, offset != 0")
plt.legend()
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Increase the number of evaluation images: the off-centre values of the max-pool net fall
#    towards the noise level $1/\sqrt{N|\mathcal T|}$; those of the average-pool net do not.
# 2. Compute the derivative summary with `centered=True` in `spatial_autocorrelation`: does it
#    change? (Under model-sampled targets $\mathbb E[\mathcal Ds] = 0$.)
# 3. Replace the sampled targets by the true labels (build records with `net.records` after a
#    backward pass on `y`): the *empirical* derivatives. Are they as uncorrelated?
