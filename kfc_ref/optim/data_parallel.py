"""Data parallelism inside the optimizers: one mini-batch split over P ranks (Section 5.3).

Every rank holds a replica of the parameters and the optimizer state and receives the same
global mini-batch of N examples (the data stream is replicated); rank r works on rows
[lo_r, hi_r) of it (:func:`shard_bounds`, sizes differing by at most one).  Everything the
optimizers estimate from a mini-batch is an average over examples, so each rank computes its
part as (its mean) x (its share of the examples) and the ranks sum the parts:

* the gradient and the loss, every step (tag "gradients", one message);
* Omega and Gamma (Theorem 2, Eq. 23) on statistics steps (tag "factors"): sums over examples,
  so the split is exact;
* nu = v^T F v on the random quarter of the mini-batch (tag "nu"), each rank on its part of
  the quarter;
* the damped inverses of Eq. 21 on inversion steps: layer l is inverted by rank l mod P and
  broadcast from there (tag "inverses"; the block-diagonal approximation makes layers
  independent).

Randomness that belongs to an example (dropout masks, targets sampled from the model) is keyed
by the example's row in the global mini-batch (:class:`~kfc_ref.nn.keyed_random.ExampleRandom`
with a key drawn once per step from the run's generator); random subsets of the mini-batch are
drawn over all N rows from that generator, which every rank advances identically.  So P ranks
compute what one process computes, up to the order of floating-point sums: the single-process
optimizers run this same code with P = 1 (:class:`~kfc_ref.comm.LocalComm`, whose shares are
exactly 1).
"""
from __future__ import annotations

import dataclasses

import numpy as _host_np   # host row indices only

from kfc_ref.comm import LocalComm
from kfc_ref.nn.keyed_random import ExampleRandom

#: Stream numbers of :class:`ExampleRandom` per pass of a step (distinct keys per pass).
GRADIENT_STREAM, STATISTICS_STREAM, TARGETS_STREAM = 0, 1, 2
#: The key of a step is an integer below this, drawn from the run's generator.
KEY_BOUND = 2 ** 63


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of a mini-batch of ``n`` examples that rank ``rank`` of ``size`` takes."""
    return rank * n // size, (rank + 1) * n // size


@dataclasses.dataclass(frozen=True)
class BatchShard:
    """This rank's part of one global mini-batch of ``n`` examples, and the step's key."""

    comm: object
    n: int
    lo: int
    hi: int
    key: int

    @classmethod
    def of(cls, comm, n: int, rng) -> BatchShard:
        """The shard of this rank; draws the step's key from ``rng`` (the same on all ranks)."""
        comm = LocalComm() if comm is None else comm
        if n < comm.size:
            raise ValueError(f"a mini-batch of {n} examples cannot be split over {comm.size} "
                             "ranks; use a batch size of at least the number of ranks")
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        return cls(comm, n, lo, hi, int(rng.integers(KEY_BOUND)))

    @property
    def rows(self):
        """Host indices of this rank's rows in the global mini-batch."""
        return _host_np.arange(self.lo, self.hi)

    def local(self, x):
        """This rank's rows of a global-batch array."""
        return x if (self.lo, self.hi) == (0, self.n) else x[self.lo:self.hi]

    def random(self, stream: int, rows=None) -> ExampleRandom:
        """Example-keyed uniforms for the pass ``stream`` over ``rows`` (default: my rows)."""
        return ExampleRandom(self.key, stream, self.rows if rows is None else rows)

    def part_of(self, indices):
        """(my positions in the local rows, the global rows) of sorted global ``indices``
        (None = all rows): the part of a random subset of the mini-batch that I hold."""
        rows = self.rows if indices is None else _host_np.asarray(indices)
        mine = rows[(rows >= self.lo) & (rows < self.hi)]
        return mine - self.lo, mine

    def sum_of_means(self, arrays, count: int, total: int, tag: str) -> list:
        """sum over ranks of (mean over my ``count`` examples) x count / total, i.e. the mean
        over all ``total`` examples (arrays of zeros stand for ``count`` = 0)."""
        share = count / total
        scaled = list(arrays) if share == 1.0 else [a * share for a in arrays]
        return self.comm.allreduce_sum(scaled, tag=tag)


def round_robin(count: int, comm, compute, templates, tag: str) -> list:
    """[compute(0), ..., compute(count - 1)] on every rank, item l computed on rank l mod P
    only and broadcast from there (one message per owning rank).

    ``compute(l)`` returns a list of arrays; ``templates(l)`` returns arrays of the same shapes
    and dtypes (what the other ranks receive into)."""
    results: list = [None] * count
    for owner in range(min(comm.size, count)):
        items = list(range(owner, count, comm.size))
        parts = [compute(i) if owner == comm.rank else templates(i) for i in items]
        flat = comm.broadcast([a for part in parts for a in part], root=owner, tag=tag)
        start = 0
        for i, part in zip(items, parts):
            results[i] = flat[start:start + len(part)]
            start += len(part)
    return results

