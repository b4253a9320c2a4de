"""kfc_ref: a reference implementation of Kronecker Factors for Convolution (KFC).

Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
ICML 2016.  Plain NumPy/CuPy, hand-written forward, backward and forward-mode passes.

The subpackages follow the data flow, and imports run one way only
(nn -> curvature -> {theory, optim} -> experiments; data and backend are used by all):

* :mod:`kfc_ref.backend`      the only module that touches CuPy (namespaces, devices);
* :mod:`kfc_ref.nn`           [[A]] (im2col), layers, losses, Sequential, models;
* :mod:`kfc_ref.curvature`    exact Fisher, Fisher quadratic forms, Omega and Gamma, damping;
* :mod:`kfc_ref.theory`       Theorem 1, the approximation ladder, Theorem 3, SUD analysis;
* :mod:`kfc_ref.optim`        SGD, KFC-pre (App. B.1), K-FAC with KFC blocks (App. B.2);
* :mod:`kfc_ref.data`         readers, preprocessing, seeded mini-batches;
* :mod:`kfc_ref.experiments`  train, sweep, check, figures, tour and bench commands.

Quick start::

    import numpy as np, kfc_ref
    net = kfc_ref.models.tiny_convnet()
    params = net.init(0, dtype="float64")
    x = np.random.default_rng(0).standard_normal((32, *net.input_shape))
    F = kfc_ref.fisher_blocks(kfc_ref.true_fisher(net, params, x), net)  # exact, per layer
    kfc = kfc_ref.network_factors(net.sampled_records(params, x, np.random.default_rng(1)))

Glossary (paper symbol -> code name)
------------------------------------
N (mini-batch, the paper's M)       ``N`` / ``x.shape[0]``
J, I                                input / output feature maps (``in_channels``, ``out_channels``)
|T|, |Delta|                        output locations ``T``, kernel offsets ``kh*kw``
[[A]]_H (Eq. 25, 29)                ``nn.expand.expand_homogeneous`` (patches with a ones column 0)
W_bar = (b | W) (App. A)            the parameter matrix of Conv2d / Dense, I x (1 + J|Delta|)
DS                                  ``LayerRecord.DS`` (per-example pre-activation derivatives)
Omega, Gamma (Thm 2, Eq. 23)        ``curvature.factors.KroneckerFactors.Omega`` / ``.Gamma``
gamma (damping), lambda (w. decay)  ``damping``, ``weight_decay``
pi (Eq. 8)                          ``curvature.damping.pi_trace``

Conventions (stated once; tested in tests/test_conventions.py)
--------------------------------------------------------------
* Images NCHW; conv weights (I, J, kh, kw) flattened as W.reshape(I, J*kh*kw), offset fastest;
  the bias is column 0 of W_bar.
* Flat parameter vector: the paper's column-stacking vec, layer after layer:
  theta = concat_l vec(W_bar_l) with vec(X) = X.ravel(order="F").  In this order the KFC block
  is Omega kron Gamma, and (Omega kron Gamma) vec(X) = vec(Gamma X Omega).
* Omega has no 1/|T| (its (0,0) entry is |T|); Gamma has 1/|T|.
"""
__version__ = "0.1.0"

import os as _os  # noqa: E402

# OpenBLAS's idle worker threads spin for ~2^28 cycles after each GEMM, taking a core from
# NumPy's memory-bound passes between the GEMMs; a short spin makes a CIFAR-10 step on 2
# cores ~10% faster.  Read once when NumPy loads BLAS, so it only acts if kfc_ref is imported
# first (as by `python -m kfc_ref`); a value set by the user wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")

from kfc_ref import backend as _backend  # noqa: E402

# Large temporaries reuse freed heap pages instead of being page-faulted in anew every step
# (see backend.retain_freed_memory; KFC_REF_RETAIN_FREED_MEMORY=0 keeps glibc's default).
if _os.environ.get(_backend.RETAIN_MEMORY_ENV, "1") != "0":
    _backend.retain_freed_memory()

from kfc_ref import curvature, data, nn, optim, theory  # noqa: E402  (after __version__)
from kfc_ref.curvature import (  # noqa: E402
    KroneckerFactors, empirical_fisher, factored_inverse, fisher_blocks, kron_block,
    monte_carlo_fisher, network_factors, true_fisher,
)
from kfc_ref.nn import Sequential, models  # noqa: E402
from kfc_ref.optim import KFAC, SGD, KFCPre, make_optimizer  # noqa: E402

__all__ = ["KFAC", "KFCPre", "KroneckerFactors", "SGD", "Sequential", "__version__", "curvature",
           "data", "empirical_fisher", "factored_inverse", "fisher_blocks", "kron_block",
           "make_optimizer", "models", "monte_carlo_fisher", "network_factors", "nn", "optim",
           "theory", "true_fisher"]
