"""Communicators for data-parallel training: one process, or P ranks over MPI.

The optimizers talk to the other ranks through three collective calls, each on a list of
arrays packed into one contiguous buffer (one message per call):

* ``allreduce_sum(arrays, tag)``: element-wise sums over the ranks (every rank gets them);
* ``broadcast(arrays, root, tag)``: rank ``root``'s arrays to every rank (the others pass
  arrays of the right shapes and dtype as templates);
* ``agree(value)``: rank 0's Python value on every rank (stop decisions).

:class:`LocalComm` is the single process (the calls return their input).  :class:`MPIComm`
runs on ``mpi4py`` (an existing MPI library, not a home-made one): NumPy buffers go to MPI
directly; CuPy buffers go through NCCL (``cupy.cuda.nccl``) when CuPy has it, otherwise they are
staged through host memory (one device-to-host and one host-to-device copy per call).  The
mode is in :attr:`MPIComm.device_path`.

Both count, per tag ("gradients", "factors", "inverses", "nu", ...), the calls, the bytes of
the packed buffer each rank contributes (the *payload*; a ring all-reduce moves 2 (P-1)/P of
it in and out of each rank) and the seconds spent in the call, waiting included
(:attr:`stats`).  Install the MPI pieces with ``pip install -r requirements-mpi.txt``.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as _np   # host staging buffers for MPI

from kfc_ref.backend import get_xp, nccl_comm, to_numpy

MPI_INSTALL_HINT = ("data-parallel training needs mpi4py and an MPI library: "
                    "pip install -r requirements-mpi.txt (mpi4py and the mpich wheel), then "
                    "run with mpiexec -n P python -m kfc_ref train --distributed ...")


@dataclasses.dataclass
class TagStats:
    calls: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0


class _Counting:
    """Per-tag call, byte and time counters shared by the communicators."""

    def __init__(self):
        self.stats: dict[str, TagStats] = {}

    def _count(self, tag: str, nbytes: int, seconds: float) -> None:
        s = self.stats.setdefault(tag, TagStats())
        s.calls += 1
        s.payload_bytes += int(nbytes)
        s.seconds += seconds

    def reset_stats(self) -> None:
        self.stats = {}


def pack(arrays):
    """One flat buffer holding ``arrays`` (in their namespace, in their promoted dtype: no
    array loses precision; callers keep the dtypes equal on all ranks)."""
    xp = get_xp(*arrays)
    dtype = xp.result_type(*[a.dtype for a in arrays])
    return xp.concatenate([xp.reshape(xp.asarray(a, dtype=dtype), (-1,)) for a in arrays])


def unpack(flat, templates) -> list:
    """Arrays shaped and typed like ``templates`` from consecutive pieces of ``flat``."""
    out, start = [], 0
    for t in templates:
        size = math.prod(t.shape)
        out.append(flat[start:start + size].reshape(t.shape).astype(t.dtype, copy=False))
        start += size
    return out


class LocalComm(_Counting):
    """One process: rank 0 of 1; the collectives return their input (and count payloads)."""

    rank, size, device_path = 0, 1, "none (one process)"

    def allreduce_sum(self, arrays, tag: str = "other") -> list:
        self._count(tag, sum(a.nbytes for a in arrays), 0.0)
        return list(arrays)

    def broadcast(self, arrays, root: int = 0, tag: str = "other") -> list:
        self._count(tag, sum(a.nbytes for a in arrays), 0.0)
        return list(arrays)

    def agree(self, value):
        return value


def import_mpi():
    """mpi4py's MPI module, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{MPI_INSTALL_HINT} ({exc})") from None
    return MPI


class MPIComm(_Counting):
    """The ranks of an MPI communicator (default ``MPI.COMM_WORLD``); see the module doc.

    ``device``: "cpu" (NumPy buffers to MPI) or "gpu" (NCCL when available, else host
    staging; each rank uses GPU local-rank mod the node's GPU count)."""

    def __init__(self, mpi_comm=None, device: str = "cpu"):
        super().__init__()
        self._mpi = import_mpi()
        self._comm = self._mpi.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        self._nccl = None
        self.device_path = "MPI on host buffers"
        if device == "gpu":
            from kfc_ref.backend import use_gpu_of_rank
            local = self._comm.Split_type(self._mpi.COMM_TYPE_SHARED).Get_rank()
            use_gpu_of_rank(local)
            self._nccl = nccl_comm(self._comm)
            self.device_path = ("NCCL (cupy.cuda.nccl) on device buffers" if self._nccl
                                else "MPI on host buffers staged from the device")

    def _collective(self, arrays, tag, run_host, run_nccl):
        t0 = time.perf_counter()
        flat = pack(arrays)
        xp = get_xp(flat)
        if xp is _np:
            run_host(flat)
        elif self._nccl is not None:
            run_nccl(flat)
        else:
            host = _np.ascontiguousarray(to_numpy(flat))
            run_host(host)
            flat = xp.asarray(host)
        out = unpack(flat, arrays)
        self._count(tag, flat.nbytes, time.perf_counter() - t0)
        return out

    def allreduce_sum(self, arrays, tag: str = "other") -> list:
        return self._collective(
            arrays, tag, lambda buf: self._comm.Allreduce(self._mpi.IN_PLACE, buf,
                                                          op=self._mpi.SUM),
            lambda buf: self._nccl.allreduce_sum(buf))

    def broadcast(self, arrays, root: int = 0, tag: str = "other") -> list:
        return self._collective(arrays, tag, lambda buf: self._comm.Bcast(buf, root=root),
                                lambda buf: self._nccl.broadcast(buf, root))

    def agree(self, value):
        return self._comm.bcast(value, root=0)
