"""Seeded mini-batches: one shuffled epoch (:func:`iterate_minibatches`) and an endless stream
whose state can be saved and restored so that a resumed run sees exactly the same batches
(:class:`MinibatchStream`).  Host side: NumPy arrays only."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np


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

    def __iter__(self) -> MinibatchStream:
        return self

    def next_indices(self) -> np.ndarray:
        """Advance the stream by one batch and return its host indices into x / y (what
        ``next(stream)`` gathers; :class:`DeviceBatches` gathers them on a device)."""
        n, b = self.num_examples, self.batch_size
        if self.position >= n or (self.drop_last and self.position + b > n):
            self.epoch += 1
            self.position = 0
            self.permutation = self._epoch_permutation(self.epoch)
        idx = self.permutation[self.position:self.position + b]
        self.position += len(idx)
        return idx

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.next_indices()
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


class DeviceBatches:
    """A training set uploaded once to the array namespace ``xp`` (CuPy on a GPU; NumPy keeps
    the host arrays without a copy); :meth:`gather` takes host indices (from
    :meth:`MinibatchStream.next_indices`) and gathers the mini-batch on the device, so each
    step uploads only the B indices instead of B images.  x (N, ...), y (N,)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, xp):
        _check_xy_batch(x, y, 1)
        self.xp = xp
        self.x, self.y = xp.asarray(x), xp.asarray(y)

    def gather(self, indices: np.ndarray):
        """(x[indices], y[indices]) as device arrays."""
        idx = self.xp.asarray(np.asarray(indices, dtype=np.int64))
        return self.x[idx], self.y[idx]
