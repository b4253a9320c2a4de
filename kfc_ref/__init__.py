"""kfc_ref: a reference implementation of Kronecker Factors for Convolution (KFC).

Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
ICML 2016.  Plain NumPy/CuPy, hand-written forward, backward and forward-mode passes.

Glossary (paper symbol -> code name)
------------------------------------
N (mini-batch, the paper's M)       ``N`` / ``x.shape[0]``
J, I                                input / output feature maps (``in_channels``, ``out_channels``)
|T|, |Delta|                        output locations ``T``, kernel offsets ``kh*kw``
[[A]]_H (Eq. 25, 29)                ``expand.expand_homogeneous`` (patches with a ones column 0)
W_bar = (b | W) (App. A)            the single parameter matrix of Conv2d / Dense, I x (1 + J|Delta|)
DS                                  ``LayerRecord.DS`` (per-example pre-activation derivatives)
Omega, Gamma (Thm 2, Eq. 23)        ``kfc.Omega`` / ``kfc.Gamma`` factors
gamma (damping), lambda (w. decay)  ``damping``, ``weight_decay``
pi (Eq. 8)                          ``damping.pi_trace``

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
