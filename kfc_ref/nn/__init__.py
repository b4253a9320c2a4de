"""The network: the expansion operator, layers, losses, :class:`Sequential` and the models.

Everything here has a hand-written forward, backward and (where KFC-pre's clipping needs it)
forward-mode pass, written next to the paper equation it implements:

* :mod:`~kfc_ref.nn.expand`: [[A]] and [[A]]_H (im2col, Eqs. 25 and 29, App. A) and col2im;
* :mod:`~kfc_ref.nn.conv_products`: a conv's products with [[A]]^T (Eqs. 26-28, Omega's sums)
  without building it on NumPy;
* :mod:`~kfc_ref.nn.layers`: Conv2d and Dense with W_bar = (b | W) (App. A), activations, dropout;
* :mod:`~kfc_ref.nn.pooling`: max and average pooling;
* :mod:`~kfc_ref.nn.response_norm`: cuda-convnet's response normalisation;
* :mod:`~kfc_ref.nn.map_blocks`: passes over blocks of maps shared by those window layers;
* :mod:`~kfc_ref.nn.losses`: softmax cross-entropy and targets sampled from the model (Sec. 3.1);
* :mod:`~kfc_ref.nn.network`: :class:`Sequential`, its records of [[A]]_H and DS, the flat vector;
* :mod:`~kfc_ref.nn.models`: tiny nets for exact work, the paper's CIFAR-10 net (Section 5);
* :mod:`~kfc_ref.nn.loops`: slow, obviously-correct loop twins of the fast kernels (for tests).
"""
from __future__ import annotations

from kfc_ref.nn.expand import col2im, expand_homogeneous, im2col, output_size
from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, Identity, Layer, ReLU, Tanh
from kfc_ref.nn.losses import classification_error, sample_targets, softmax_cross_entropy
from kfc_ref.nn import models
from kfc_ref.nn.models import ARCHITECTURES, build_model, cifar10_convnet, tiny_convnet
from kfc_ref.nn.network import LayerRecord, Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm

__all__ = ["ARCHITECTURES", "AvgPool2d", "Conv2d", "Dense", "Dropout", "Flatten", "Identity",
           "Layer", "LayerRecord", "MaxPool2d", "ReLU", "ResponseNorm", "Sequential", "Tanh",
           "build_model", "cifar10_convnet", "classification_error", "col2im", "models",
           "expand_homogeneous", "im2col", "output_size", "sample_targets",
           "softmax_cross_entropy", "tiny_convnet"]
