"""In-process data-parallel ranks for tests: P threads and a communicator over them.

``run_ranks(P, fn)`` calls ``fn(comm)`` on P threads, each with a :class:`ThreadComm` of rank
r, and returns the P results.  The collectives meet at a barrier and sum the ranks' host copies
in rank order (so every rank gets the same bits, as MPI's do); results come back in the
namespace of the inputs.  ``reduce=False`` makes ``allreduce_sum`` return each rank's own part:
the negative control of a forgotten reduction.
"""
from __future__ import annotations

import threading

import numpy as np

from kfc_ref.backend import get_xp, to_numpy


class _Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size


class ThreadComm:
    device_path = "threads (tests)"

    def __init__(self, group: _Group, rank: int, reduce: bool = True):
        self._group, self.rank, self.size, self._reduce = group, rank, group.size, reduce

    def _exchange(self, value):
        g = self._group
        g.slots[self.rank] = value
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()
        return values

    def allreduce_sum(self, arrays, tag: str = "other") -> list:
        parts = self._exchange([to_numpy(a) for a in arrays])
        if not self._reduce:
            return list(arrays)
        out = []
        for i, a in enumerate(arrays):
            total = parts[0][i].copy()
            for part in parts[1:]:
                total = total + part[i]
            out.append(get_xp(a).asarray(total))
        return out

    def broadcast(self, arrays, root: int = 0, tag: str = "other") -> list:
        parts = self._exchange([to_numpy(a) for a in arrays])
        return [get_xp(a).asarray(np.asarray(p, dtype=to_numpy(a).dtype))
                for a, p in zip(arrays, parts[root])]

    def agree(self, value):
        return self._exchange(value)[0]


def run_ranks(size: int, fn, reduce: bool = True) -> list:
    """[fn(comm_0), ..., fn(comm_{P-1})] computed on P threads (errors re-raised)."""
    group = _Group(size)
    results: list = [None] * size
    errors: list = []

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(group, rank, reduce))
        except BaseException as exc:       # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            group.barrier.abort()
    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
