"""Array-module backend: the only module in kfc_ref that imports CuPy.

Every core function takes its array namespace (``xp``) from its inputs with :func:`get_xp`,
so the same code runs on NumPy (CPU) and CuPy (GPU).  New arrays are made with that namespace
and inherit the dtype of the inputs.  Host-side code (data loading, plotting, saving) converts
with :func:`to_numpy`; the user moves arrays to a device with :func:`to_device`.

Gather/scatter primitives (:func:`strided_gather`, :func:`scatter_add`) are the only
namespace-specific kernels of the network: im2col, col2im and the pools are written with them.
:func:`few_launches` says which of two equivalent formulations a kernel should take: on NumPy
(the CPU) a loop of strided slice updates is fastest (``numpy.add.at`` is ~8x slower than 25
slice-adds for col2im), on a GPU every slice update is a kernel launch, so there one gather or
one scatter-add replaces the loop.

Namespaces are discovered through the array API protocol ``__array_namespace__`` (NumPy >= 2
arrays and the guarded test namespace implement it); CuPy arrays are recognised explicitly.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as _np

DEVICES = ("cpu", "gpu")

_cupy_cache: dict[str, object] = {}


def _import_cupy():
    """Return the cupy module or None (import attempted once)."""
    if "mod" not in _cupy_cache:
        try:
            _cupy_cache["mod"] = importlib.import_module("cupy")
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_cache["mod"] = None
            _cupy_cache["error"] = f"{type(exc).__name__}: {exc}"
    return _cupy_cache["mod"]


def gpu_unavailable_reason() -> str | None:
    """None when a GPU can be used, else a sentence naming what is missing."""
    cp = _import_cupy()
    if cp is None:
        return ("CuPy is not installed (or failed to import: "
                f"{_cupy_cache.get('error', '?')}); install it with "
                "`pip install -r requirements-gpu.txt`")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy is installed but no CUDA device is visible ({type(exc).__name__}: {exc})"
    if count < 1:
        return "CuPy is installed but no CUDA device is visible (device count 0)"
    return None


def check_device(device: str) -> str:
    """Validate a ``device`` argument ('cpu' or 'gpu'); raise a clear error otherwise."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use one of {DEVICES}")
    if device == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"device='gpu' was requested but {reason}")
    return device


def namespace_for(device: str) -> types.ModuleType:
    """The array module for a device name: numpy for 'cpu', cupy for 'gpu'."""
    check_device(device)
    return _np if device == "cpu" else _import_cupy()


def _is_cupy_array(a) -> bool:
    cp = _cupy_cache.get("mod")
    if cp is None and "cupy" in type(a).__module__:
        cp = _import_cupy()
    return cp is not None and isinstance(a, cp.ndarray)


def get_xp(*arrays):
    """The array namespace shared by ``arrays`` (scalars and None are ignored).

    Raises TypeError when arrays from different namespaces are mixed, which is exactly the
    mistake (a NumPy array next to a CuPy array) that would fail late on a GPU.
    """
    found = None
    for a in arrays:
        if a is None or isinstance(a, (int, float, complex, bool)):
            continue
        if _is_cupy_array(a):
            ns = _import_cupy()
        elif hasattr(a, "__array_namespace__"):
            ns = a.__array_namespace__()
        elif isinstance(a, _np.generic):
            ns = _np
        else:
            raise TypeError(f"expected an array, got {type(a).__name__}")
        if found is None:
            found = ns
        elif ns is not found:
            raise TypeError(
                f"arrays from different array modules were mixed: {found.__name__} and "
                f"{ns.__name__}; move them to one device first (kfc_ref.backend.to_device)")
    return _np if found is None else found


def device_of(a) -> str:
    """'gpu' for a CuPy array, else 'cpu'."""
    return "gpu" if _is_cupy_array(a) else "cpu"


def to_numpy(a):
    """A NumPy copy/view of any supported array (for plotting and saving); passes numpy through."""
    if _is_cupy_array(a):
        return a.get()
    if hasattr(a, "__kfc_host__"):  # guarded test arrays
        return a.__kfc_host__()
    return _np.asarray(a)


def to_device(a, device: str):
    """Move a host or device array to ``device`` ('cpu' or 'gpu')."""
    xp = namespace_for(device)
    if device == "cpu":
        return to_numpy(a)
    return xp.asarray(a)


def asarray_like(values, like):
    """``values`` (host data) as an array in the namespace, and with the dtype, of ``like``."""
    xp = get_xp(like)
    return xp.asarray(values, dtype=like.dtype)


def few_launches(xp) -> bool:
    """True when kernels should minimise launches (every namespace but NumPy: CuPy and the
    test namespaces that stand in for it); False on NumPy, where slice loops are fastest."""
    return xp is not _np


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: environment variable that turns :func:`retain_freed_memory` off at import ("0")
RETAIN_MEMORY_ENV = "KFC_REF_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it on free, so
    each large temporary of a step (activations and their gradients, 16-64 MB per layer of the
    CIFAR-10 net at batch 128-512) is page-faulted in anew, one page at a time: ~70 us per MB
    here.  With mmap off (``M_MMAP_MAX`` 0) and a 2 GB trim threshold the heap keeps the pages
    and the next step reuses them (measured: 40 KFC-pre iterations on CIFAR-10 at batch 512,
    38.0 -> 35.1 s; peak resident size 3.2 -> 3.5 GB, which then stays).  Called by
    ``import kfc_ref`` unless the environment sets ``KFC_REF_RETAIN_FREED_MEMORY=0``; a no-op
    off glibc.  Returns whether the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


_INDEX_CACHE: dict = {}
_INDEX_CACHE_SIZE = 64


def cached_index(xp, key: tuple, build):
    """The integer array ``build()`` (a host NumPy array) on the device of namespace ``xp``,
    built and uploaded once per (namespace, key): index tables of the gathers and scatters."""
    full_key = (id(xp),) + tuple(key)
    index = _INDEX_CACHE.get(full_key)
    if index is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        index = _INDEX_CACHE[full_key] = xp.asarray(_np.ascontiguousarray(build()))
    return index


def flat_index(xp, shape: tuple, strides: tuple, offset: int = 0, dtype: str = "int64"):
    """Integer array of ``shape`` whose entry at i is ``offset + sum_k i_k * strides[k]``: the
    flat (element) positions a strided window view reads (cached, see :func:`cached_index`).
    ``dtype="int32"`` halves the memory traffic where every position fits."""
    def build():
        host = _np.full((1,) * len(shape), offset, dtype=dtype)
        for axis, (n, s) in enumerate(zip(shape, strides)):
            step = _np.arange(n, dtype=dtype) * s
            host = host + step.reshape((1,) * axis + (n,) + (1,) * (len(shape) - axis - 1))
        return host
    return cached_index(xp, ("strided", tuple(shape), tuple(strides), int(offset), dtype),
                        build)


def _is_c_contiguous(a) -> bool:
    flags = getattr(a, "flags", None)
    return bool(flags is not None and flags.c_contiguous)


#: below this many entries work runs on the calling thread: a pool hand-off costs ~0.1 ms on
#: a 2-core VM, the time of one elementwise pass over ~250k float32 entries, so the threads pay
#: off from here for the layers' multi-pass blocks (pools, rnorm) and the conv blocks
PARALLEL_MIN_SIZE = 1 << 18
_POOL: dict = {}
_POOL_LOCK = threading.Lock()


def host_threads() -> int:
    """Threads for NumPy's memory-bound copies: the CPUs this process may use, at most 4
    (the copies saturate memory bandwidth beyond that)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _copy_pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOL.get(threads)
        if pool is None:
            pool = _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="kfc-copy")
        return pool


class _BlasThreads:
    """One BLAS thread per caller while :func:`parallel_rows` blocks run GEMMs side by side.

    A skinny GEMM (I = 32 output maps against N|T| = 32,768 columns) runs ~1.3x faster as two
    single-threaded halves on two cores than as one two-threaded call (OpenBLAS splits such a
    product poorly), so the blocks of a conv run one BLAS thread each.  OpenBLAS takes a new
    thread count only from the main thread (calls from other threads are ignored), so the
    limit is applied only there; it is counted, so nested regions restore the user's setting
    once, when the outermost one ends.  Regions entered from other threads (ranks run as
    threads) and BLAS libraries threadpoolctl does not know run unchanged: same results,
    multi-threaded GEMMs."""

    def __init__(self):
        self._depth = 0
        self._saved = None
        self._libs = None

    def _controllers(self):
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController
                self._libs = [lib for lib in ThreadpoolController().lib_controllers
                              if lib.user_api == "blas"]
            except Exception:  # pragma: no cover - threadpoolctl missing or broken
                self._libs = []
        return self._libs

    @contextlib.contextmanager
    def one_thread(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if self._depth == 0:
            libs = self._controllers()
            self._saved = [lib.get_num_threads() for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._controllers(), self._saved):
                    lib.set_num_threads(n)


_ONE_BLAS_THREAD = _BlasThreads()


def parallel_rows(fn, rows: int, size: int, threads: int | None = None,
                  gemm: bool = False) -> None:
    """Call ``fn(r0, r1)`` on disjoint ranges covering ``range(rows)``: on :func:`host_threads`
    threads (or ``threads``) when the work touches ``size`` >= PARALLEL_MIN_SIZE entries,
    else once on the calling thread.  For NumPy passes that write disjoint row blocks
    (NumPy releases the GIL in copies, ufuncs and GEMMs); exceptions propagate.  ``gemm=True``:
    the blocks run matrix products, each on one BLAS thread (:class:`_BlasThreads`)."""
    threads = host_threads() if threads is None else threads
    parts = min(threads, rows)
    if parts < 2 or size < PARALLEL_MIN_SIZE:
        fn(0, rows)
        return
    bounds = [(rows * i // parts, rows * (i + 1) // parts) for i in range(parts)]
    with _ONE_BLAS_THREAD.one_thread() if gemm else contextlib.nullcontext():
        futures = [_copy_pool(parts).submit(fn, a, b) for a, b in bounds[1:]]
        try:
            fn(*bounds[0])
        finally:
            for f in futures:
                f.result()


def parallel_copy(out, src, threads: int | None = None) -> None:
    """``out[...] = src`` for NumPy arrays of one shape, split along axis 0 over threads
    (:func:`parallel_rows`): a strided gather such as im2col is bound by one core's memory
    traffic, not by the machine's (about 1.8x faster on 2 cores for the CIFAR-10 net's
    second conv)."""
    if out.ndim == 0:
        _np.copyto(out, src)
        return
    parallel_rows(lambda a, b: _np.copyto(out[a:b], src[a:b]), out.shape[0], out.size,
                  threads)


def strided_gather(x, shape: tuple, strides: tuple, offset: int = 0):
    """A C-contiguous copy of the strided window view of a C-contiguous ``x``: entry i is
    ``x.flat[offset + sum_k i_k * strides[k]]`` (strides in elements).  One copy kernel: NumPy
    and CuPy copy an ``as_strided`` view (NumPy on :func:`host_threads` threads), other
    namespaces ``take`` a cached flat index."""
    xp = get_xp(x)
    if not _is_c_contiguous(x):
        raise ValueError("strided_gather needs a C-contiguous array")
    if xp is _np or _is_cupy_array(x):
        view = strided_view(x, shape, strides, offset)
        if xp is not _np:
            return xp.ascontiguousarray(view)
        out = _np.empty(view.shape, dtype=x.dtype)
        parallel_copy(out, view)
        return out
    return xp.take(x.reshape(-1), flat_index(xp, shape, strides, offset))


def strided_view(x, shape: tuple, strides: tuple, offset: int = 0):
    """The window view of a C-contiguous NumPy or CuPy ``x`` read by :func:`strided_gather`
    (``as_strided``; no copy).  Callers that fill their own buffers in blocks copy from it."""
    if not _is_c_contiguous(x):
        raise ValueError("strided_view needs a C-contiguous array")
    lib = _np.lib.stride_tricks if get_xp(x) is _np else _import_cupy().lib.stride_tricks
    return lib.as_strided(x.reshape(-1)[offset:], shape=tuple(shape),
                          strides=tuple(s * x.itemsize for s in strides))


def scatter_add(out, index, values) -> None:
    """``out.flat[index] += values`` with repeated indices accumulated (in place, ``out``
    C-contiguous): ``numpy.add.at`` on NumPy, ``cupyx.scatter_add`` on CuPy, a weighted
    ``bincount`` on any other namespace."""
    xp = get_xp(out, values)
    flat = out.reshape(-1)
    if xp is _np:
        _np.add.at(flat, index.reshape(-1), values.reshape(-1))
    elif _is_cupy_array(out):
        importlib.import_module("cupyx").scatter_add(flat, index.reshape(-1), values.reshape(-1))
    else:
        summed = xp.bincount(index.reshape(-1), weights=values.reshape(-1), minlength=flat.size)
        flat += summed.astype(out.dtype)


def spd_inverse(a):
    """The inverse of a symmetric positive definite matrix: the damped factors of Eq. 21.

    NumPy: Cholesky factorisation and inversion through SciPy's LAPACK (``potrf``, ``potri``;
    the result is exactly symmetric), ~2.3x faster than ``numpy.linalg.inv`` on the CIFAR-10
    net's 801 x 801 and 1025 x 1025 damped Omegas (float32, 2 cores).  Where the
    factorisation fails (not positive definite in floating point, e.g. at a vanishing
    damping), and on every other namespace, ``linalg.inv``."""
    xp = get_xp(a)
    if xp is _np and a.dtype in (_np.float32, _np.float64):
        from scipy.linalg import lapack
        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
        factor, info = potrf(a, lower=True, clean=False)
        if info == 0:
            inverse, info = potri(factor, lower=True)
            if info == 0:
                lower = _np.tril(inverse)
                return lower + _np.tril(lower, -1).T
    return xp.linalg.inv(a)


def synchronize(a=None) -> None:
    """Block until queued GPU work is done (no-op on CPU); use around timings."""
    cp = _cupy_cache.get("mod")
    if cp is not None and (a is None or _is_cupy_array(a)):
        try:
            cp.cuda.Stream.null.synchronize()
        except Exception:
            pass


# --------------------------------------------------------------------------- multi-GPU
def use_gpu_of_rank(local_rank: int) -> int:
    """Make GPU ``local_rank % device count`` current for this process (data-parallel ranks on
    one node share its GPUs round-robin); returns its index."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(gpu_unavailable_reason())
    index = local_rank % max(1, cp.cuda.runtime.getDeviceCount())
    cp.cuda.Device(index).use()
    return index


class NcclComm:
    """Sum-all-reduce and broadcast of CuPy arrays through NCCL (``cupy.cuda.nccl``), on the
    current stream, in place.  Built collectively by all ranks of an MPI communicator, which
    carries NCCL's unique id from rank 0."""

    _TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}

    def __init__(self, mpi_comm):
        from cupy.cuda import nccl         # CuPy's NCCL binding
        self._nccl = nccl
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        self._comm = nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())

    def _type(self, a):
        name = self._TYPES.get(str(a.dtype))
        if name is None:
            raise TypeError(f"NCCL reduction of {a.dtype} arrays is not supported here")
        return getattr(self._nccl, name)

    def allreduce_sum(self, buf) -> None:
        stream = _import_cupy().cuda.get_current_stream().ptr
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf),
                             self._nccl.NCCL_SUM, stream)

    def broadcast(self, buf, root: int) -> None:
        stream = _import_cupy().cuda.get_current_stream().ptr
        self._comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, stream)


def nccl_comm(mpi_comm):
    """A :class:`NcclComm` over ``mpi_comm``'s ranks, or None when CuPy has no NCCL."""
    cp = _import_cupy()
    if cp is None:
        return None
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    if not getattr(nccl, "available", True):
        return None
    return NcclComm(mpi_comm)
