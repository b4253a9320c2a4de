"""Preprocessing fitted on the training images: per-channel standardisation and ZCA whitening
(the paper whitens CIFAR-10 and SVHN, Section 5).  Host side: NumPy arrays only."""
from __future__ import annotations

import dataclasses

import numpy as np

from kfc_ref.data.datasets import Dataset

ZCA_DEFAULT_EPSILON = 1e-2  # added to covariance eigenvalues (data standardized first)


class Standardizer:
    """Per-channel standardization fitted on the training images.

    ``fit(x)`` with x (N, C, H, W) stores ``mean_`` and ``std_`` (C,) float64 over (N, H, W);
    ``transform(x)`` returns float32 ``(x - mean_[c]) / std_[c]``.  A channel whose std is
    below ``eps`` is only centered.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.mean_ = self.std_ = None

    def fit(self, x: np.ndarray) -> Standardizer:
        if x.ndim != 4:
            raise ValueError(f"Standardizer.fit: x must be (N, C, H, W), got shape {x.shape}")
        self.mean_ = x.mean(axis=(0, 2, 3), dtype=np.float64)
        std = x.std(axis=(0, 2, 3), dtype=np.float64)
        self.std_ = np.where(std < self.eps, 1.0, std)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.mean_ is None:
            raise ValueError("Standardizer.transform called before fit")
        if x.ndim != 4 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"Standardizer.transform: x must be (N, {self.mean_.shape[0]}, H, W), "
                             f"got shape {x.shape}")
        out = (x - self.mean_[:, None, None]) / self.std_[:, None, None]
        return out.astype(np.float32)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)


class ZCAWhitener:
    """ZCA whitening fitted on the training images, flattened to D = C*H*W features.

    With mean mu and covariance Sigma = (1/N) sum_n (x_n - mu)(x_n - mu)^T = U diag(lam) U^T
    (``numpy.linalg.eigh``), the whitening matrix is the symmetric

        W = U diag((lam + epsilon)^(-1/2)) U^T,   z = W (x - mu),

    so the whitened training covariance is U diag(lam / (lam + epsilon)) U^T (= I where
    lam >> epsilon).  ``transform`` keeps the input's shape and returns float32.  Memory:
    W is D x D float64 (75 MiB for CIFAR-10).
    """

    def __init__(self, epsilon: float = ZCA_DEFAULT_EPSILON, chunk: int = 4096):
        if not epsilon >= 0:
            raise ValueError(f"ZCAWhitener: epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = epsilon
        self.chunk = chunk
        self.mean_ = self.W_ = None

    def fit(self, x: np.ndarray) -> ZCAWhitener:
        flat = x.reshape(len(x), -1)
        self.mean_ = flat.mean(axis=0, dtype=np.float64)
        cov = np.zeros((flat.shape[1],) * 2)
        for i in range(0, len(flat), self.chunk):  # bounded float64 temporaries
            c = flat[i:i + self.chunk] - self.mean_
            cov += c.T @ c
        lam, U = np.linalg.eigh(cov / len(flat))
        lam = np.clip(lam, 0.0, None)  # round-off can make tiny eigenvalues negative
        self.W_ = (U / np.sqrt(lam + self.epsilon)) @ U.T
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.W_ is None:
            raise ValueError("ZCAWhitener.transform called before fit")
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"ZCAWhitener.transform: x has {flat.shape[1]} features per example, "
                             f"fitted on {self.mean_.shape[0]}")
        out = np.empty(flat.shape, dtype=np.float32)
        for i in range(0, len(flat), self.chunk):
            out[i:i + self.chunk] = (flat[i:i + self.chunk] - self.mean_) @ self.W_
        return out.reshape(x.shape)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)


def preprocess(dataset: Dataset, zca: bool = False, *,
               zca_epsilon: float = ZCA_DEFAULT_EPSILON) -> Dataset:
    """Return a new Dataset: per-channel standardized, then ZCA-whitened if ``zca``.

    Both transforms are fitted on the training split only and applied to both splits.
    """
    std = Standardizer().fit(dataset.x_train)
    x_train, x_test = std.transform(dataset.x_train), std.transform(dataset.x_test)
    if zca:
        zw = ZCAWhitener(zca_epsilon).fit(x_train)
        x_train, x_test = zw.transform(x_train), zw.transform(x_test)
    return dataclasses.replace(dataset, x_train=x_train, x_test=x_test)


