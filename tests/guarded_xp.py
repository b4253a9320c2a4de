"""A second array namespace for CPU tests: NumPy behind a guard that refuses being bypassed.

CI has no GPU, so this is how we prove the core path would not reach for NumPy behind CuPy's
back.  ``GuardedArray`` is an ndarray subclass whose namespace (``__array_namespace__``) is
``guarded``, a wrapper of NumPy.  It refuses what would break on CuPy:

* calling a ``numpy.*`` function on a guarded array directly (not through the namespace that
  ``get_xp`` returned) -> TypeError, via ``__array_function__``;
* mixing a guarded array with a plain ``numpy.ndarray`` of any rank, 0-d included, in
  arithmetic or assignment (a host array created with ``np.*`` inside core code) -> TypeError,
  via ``__array_ufunc__``/``__setitem__``, as CuPy 14 does;
* implicit conversion through ``np.asarray``/``np.array`` -> TypeError (``__array__``), like
  CuPy's refusal of implicit device-to-host transfers.

Functions reached through ``guarded.<name>`` run NumPy with the guard lifted and wrap results.

It also *counts*, as a CPU stand-in for what a GPU run would cost (:func:`counting`):

* ``launches``: every namespace call, ufunc (arithmetic, reductions, ``@``) and element
  assignment on guarded arrays -- each would be at least one kernel launch on CuPy (views made
  by basic slicing are free and not counted);
* ``syncs``: every device-to-host read -- ``float()``, ``int()``, ``bool()`` (an ``if`` on an
  array), ``.item()``, ``.tolist()`` and ``kfc_ref.backend.to_numpy``.
"""
from __future__ import annotations

import contextlib
import threading
import types

import numpy as np

_state = threading.local()


class Counts:
    """Launch and sync counters, reset by :func:`counting`."""

    def __init__(self):
        self.launches = 0
        self.syncs = 0

    def __repr__(self):
        return f"Counts(launches={self.launches}, syncs={self.syncs})"


COUNTS = Counts()


@contextlib.contextmanager
def counting():
    """``with counting() as c: ...`` -> c.launches, c.syncs for the code inside."""
    global COUNTS
    outer, COUNTS = COUNTS, Counts()
    try:
        yield COUNTS
    finally:
        COUNTS = outer


def _launch():
    if not _allowed():
        COUNTS.launches += 1


def _sync():
    if not _allowed():
        COUNTS.syncs += 1


def _allowed() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _lifted():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _unwrap(obj):
    if isinstance(obj, GuardedArray):
        return obj.view(np.ndarray)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, np.ndarray) and not isinstance(obj, GuardedArray):
        return obj.view(GuardedArray)
    if isinstance(obj, np.generic):          # CuPy reductions give 0-d device arrays
        return np.asarray(obj).view(GuardedArray)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


def _is_host_array(a) -> bool:
    """A plain ``numpy.ndarray`` of any rank, 0-d included: CuPy 14 rejects every one of them
    as an operand of its ufuncs (NumPy *scalars*, ``np.generic``, are accepted, as here)."""
    return isinstance(a, np.ndarray) and not isinstance(a, GuardedArray)


class GuardedArray(np.ndarray):
    """An ndarray whose array module is :data:`guarded`."""

    def __array_namespace__(self, api_version=None):
        return guarded

    def __kfc_host__(self):
        _sync()
        return np.array(self.view(np.ndarray))

    # device -> host reads: each one a synchronisation on a GPU
    def __float__(self):
        _sync()
        return float(self.view(np.ndarray))

    def __int__(self):
        _sync()
        return int(self.view(np.ndarray))

    def __index__(self):
        _sync()
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        _sync()
        return bool(self.view(np.ndarray))

    def item(self, *args):
        _sync()
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _sync()
        return self.view(np.ndarray).tolist()

    def __setitem__(self, key, value):
        _launch()
        if _is_host_array(value):
            raise TypeError(f"assigned a plain numpy array of shape {value.shape} into a "
                            "guarded array (created outside the namespace)")
        with _lifted():
            self.view(np.ndarray)[_unwrap(key)] = _unwrap(value)

    def __getitem__(self, key):
        fancy = any(isinstance(k, (np.ndarray, list)) for k in
                    (key if isinstance(key, tuple) else (key,)))
        if fancy:
            _launch()
        with _lifted():
            return _wrap(self.view(np.ndarray)[_unwrap(key)])

    def __array__(self, dtype=None, copy=None):
        if _allowed():
            base = self.view(np.ndarray)
            return base if dtype is None else base.astype(dtype)
        raise TypeError("implicit conversion of a guarded (device) array to a NumPy array; "
                        "use kfc_ref.backend.to_numpy")

    def __array_function__(self, func, types_, args, kwargs):
        if not _allowed():
            raise TypeError(f"numpy.{func.__name__} was called directly on a guarded array; "
                            "core code must use the namespace from get_xp")
        with _lifted():
            return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for a in inputs + tuple(kwargs.get("out", ())):
            if _is_host_array(a):
                raise TypeError(f"ufunc {ufunc.__name__} mixed a guarded array with a plain "
                                f"numpy array of shape {a.shape} (created outside the namespace)")
        _launch()
        with _lifted():
            if "out" in kwargs:
                kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
            result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return _wrap(result)


class _GuardedLinalg(types.SimpleNamespace):
    def __getattr__(self, name):
        return _guarded_function(getattr(np.linalg, name))


def _guarded_function(fn):
    def call(*args, **kwargs):
        _launch()
        with _lifted():
            return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = getattr(fn, "__name__", "guarded")
    return call


class _GuardedNamespace(types.ModuleType):
    """Module-like wrapper of NumPy: attributes are NumPy's, callables return GuardedArrays."""

    linalg = _GuardedLinalg()

    def __getattr__(self, name):
        obj = getattr(np, name)
        if isinstance(obj, type) or not callable(obj):
            return obj                       # dtypes, constants (np.float32, np.inf, ...)
        return _guarded_function(obj)


guarded = _GuardedNamespace("guarded")


def asguarded(a):
    """Host array -> guarded array (what moving data to the 'device' means here)."""
    return np.array(a).view(GuardedArray)
