"""Optimizer state as dataclasses whose fields *are* the checkpoint schema.

Each optimizer keeps its state in one dataclass (:class:`SGDState`, :class:`KFCPreState`,
:class:`KFACState`).  Factors are :class:`kfc_ref.curvature.factors.KroneckerFactors`, inverses
are the damping module's own records (:class:`~kfc_ref.curvature.damping.FactoredInverse` for
KFC-pre, :class:`~kfc_ref.curvature.damping.EigenFactors` for K-FAC): the objects the
optimizer computes with are the objects that are saved, so there is one schema per thing.

:meth:`OptimizerState.to_arrays` turns a state into flat ``{name: numpy array}`` entries that
``np.savez`` stores and ``np.load(..., allow_pickle=False)`` reads back (no pickled objects, no
JSON).  The field annotations decide the encoding:

* ``int``/``float``/``bool`` fields (optionally ``| None``) are host scalars, saved as 0-d
  int64/float64/bool arrays and restored as exactly the same Python number;
* ``list`` fields are per-layer lists of device arrays: ``"theta_bar/0"``, ``"theta_bar/1"``...;
* ``list[Record]`` fields are per-layer lists of dataclass records, one entry per record field:
  ``"factors/0/Omega"``, ``"factors/0/num_locations"``, ``"inverses/2/pi"``...;
* a field that is None is simply absent; ``"__state__"`` holds the class name.

Per-layer lists are *compact*: one entry per parametric layer, in flat-vector order.  A state
restored with :meth:`OptimizerState.from_arrays` gives the identical next step.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import numpy as _host_np  # host-side checkpoint conversion only

from kfc_ref.backend import to_device, to_numpy
from kfc_ref.curvature.damping import EigenFactors, FactoredInverse
from kfc_ref.curvature.factors import KroneckerFactors

#: Name of the entry holding the state's class name.
STATE_KEY = "__state__"
_HOST_SCALARS = (int, float, bool)
_HOST_DTYPES = {int: _host_np.int64, float: _host_np.float64, bool: _host_np.bool_}
_UnionType = type(int | None)


def _field_kind(annotation):
    """('scalar', type) | ('arrays', None) | ('records', record class) | ('array', None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, _UnionType) else annotation
    if base in _HOST_SCALARS:
        return "scalar", base
    if base is list:
        return "arrays", None
    if typing.get_origin(base) is list:
        return "records", typing.get_args(base)[0]
    return "array", None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _encode_value(kind, typ, value, key, out):
    if kind == "scalar":
        out[key] = _host_np.asarray(value, dtype=_HOST_DTYPES[typ])
    elif kind == "arrays":
        for i, a in enumerate(value):
            out[f"{key}/{i}"] = to_numpy(a)
    elif kind == "records":
        hints = _hints(typ)
        for i, record in enumerate(value):
            for f in dataclasses.fields(record):
                sub_kind, sub_typ = _field_kind(hints[f.name])
                _encode_value(sub_kind, sub_typ, getattr(record, f.name), f"{key}/{i}/{f.name}",
                              out)
    else:
        out[key] = to_numpy(value)


def _indices(arrays, key) -> list[int]:
    found = sorted({int(k[len(key) + 1:].split("/")[0]) for k in arrays
                    if k.startswith(key + "/")})
    if found != list(range(len(found))):
        raise ValueError(f"state entries {key}/i are not numbered 0..n-1: {found}")
    return found


def _decode_value(kind, typ, arrays, key, device):
    if kind == "scalar":
        return typ(arrays[key][()].item())
    if kind == "arrays":
        return [to_device(_host_np.array(arrays[f"{key}/{i}"]), device)
                for i in _indices(arrays, key)]
    if kind == "records":
        hints, records = _hints(typ), []
        for i in _indices(arrays, key):
            kwargs = {}
            for f in dataclasses.fields(typ):
                sub_kind, sub_typ = _field_kind(hints[f.name])
                kwargs[f.name] = _decode_value(sub_kind, sub_typ, arrays,
                                               f"{key}/{i}/{f.name}", device)
            records.append(typ(**kwargs))
        return records
    return to_device(_host_np.array(arrays[key]), device)


def _present(arrays, kind, key) -> bool:
    if kind in ("arrays", "records"):
        return any(k.startswith(key + "/") for k in arrays)
    return key in arrays


@dataclass
class OptimizerState:
    """What every optimizer keeps: the iteration counter k (steps taken) and theta_bar, the
    parameter average of App. B.1 (compact list of W_bar matrices)."""

    k: int = 0
    theta_bar: list = field(default_factory=list)

    def to_arrays(self) -> dict:
        """Flat ``{name: numpy array}`` entries holding this state exactly (``np.savez``-able,
        loadable with ``allow_pickle=False``)."""
        out = {STATE_KEY: _host_np.array(type(self).__name__)}
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                kind, typ = _field_kind(hints[f.name])
                _encode_value(kind, typ, value, f.name, out)
        return out

    @classmethod
    def from_arrays(cls, arrays, device: str = "cpu") -> OptimizerState:
        """Inverse of :meth:`to_arrays`; arrays go to ``device`` ('cpu' or 'gpu')."""
        saved = str(arrays[STATE_KEY][()]) if STATE_KEY in arrays else None
        if saved != cls.__name__:
            raise ValueError(f"the saved optimizer state is a {saved or 'unknown kind'}, not a "
                             f"{cls.__name__} (checkpoint of another optimizer, or of an "
                             "older kfc_ref)")
        hints, kwargs = _hints(cls), {}
        for f in dataclasses.fields(cls):
            kind, typ = _field_kind(hints[f.name])
            if _present(arrays, kind, f.name):
                kwargs[f.name] = _decode_value(kind, typ, arrays, f.name, device)
            elif f.default is not None:        # only fields that may be None may be absent
                raise ValueError(f"the saved {cls.__name__} has no entry {f.name!r}")
        return cls(**kwargs)


@dataclass
class SGDState(OptimizerState):
    """SGD with momentum: + the velocity p (compact list)."""

    velocity: list = field(default_factory=list)


@dataclass
class KroneckerState(OptimizerState):
    """Fields shared by KFC-pre and K-FAC: the moving-average factors (None before the first
    estimate) and stats_count, the number of mini-batch estimates averaged in so far."""

    factors: list[KroneckerFactors] | None = None
    stats_count: int = 0


@dataclass
class KFCPreState(KroneckerState):
    """KFC-pre (Algorithm 1): + velocity p and the damped inverses of Eq. 21 with their pi."""

    velocity: list = field(default_factory=list)
    inverses: list[FactoredInverse] | None = None


@dataclass
class KFACState(KroneckerState):
    """K-FAC (App. B.2): + eigendecompositions of the factors, the Levenberg-Marquardt damping
    ``lam`` (lambda), the damping gamma of F_hat, the previous update delta_0 (compact list)
    and the last reduction ratio rho (None until computed)."""

    inverses: list[EigenFactors] | None = None
    lam: float = 0.0
    gamma: float = 0.0
    delta: list = field(default_factory=list)
    rho: float | None = None


#: class name -> class, for :func:`state_from_numpy`.
STATE_TYPES = {cls.__name__: cls for cls in (SGDState, KFCPreState, KFACState)}


def state_to_numpy(state: OptimizerState) -> dict:
    """``state.to_arrays()``: flat host arrays for a checkpoint."""
    if not isinstance(state, OptimizerState):
        raise TypeError(f"state must be an OptimizerState, got {type(state).__name__}")
    return state.to_arrays()


def state_from_numpy(arrays, device: str = "cpu") -> OptimizerState:
    """The state saved by :func:`state_to_numpy` (its class is read from ``__state__``)."""
    name = str(arrays[STATE_KEY][()]) if STATE_KEY in arrays else None
    if name not in STATE_TYPES:
        raise ValueError(f"arrays hold no known optimizer state ({STATE_KEY!r} = {name!r}); "
                         f"expected one of {tuple(STATE_TYPES)}")
    return STATE_TYPES[name].from_arrays(arrays, device)
