"""Argument validators: the one place where a bad value at an API boundary becomes an error.

Every validator takes the argument's *name* first and its value second, returns the value in a
canonical Python type (``float``, ``int``, ``bool``), and raises :class:`ArgumentError` with a
message that names the argument, repeats the value and says what is allowed::

    lr = check_positive("lr", lr)                 # -> float, e.g. from np.float32(0.01)
    T_s = check_int("stats_period", T_s, minimum=1)

One exception type for every kind of mistake (wrong type *and* wrong value) so callers and
tests need not guess: :class:`ArgumentError` subclasses ``ValueError``.  NumPy scalar types
(``np.float32``, ``np.int64``, 0-d host arrays) are accepted wherever Python numbers are;
``bool`` is never taken for a number.  Labels, batches and arrays have their own checks next
to the code that needs their shapes (``nn.losses.check_labels``).
"""
from __future__ import annotations

import math
import numbers
import operator

__all__ = ["ArgumentError", "check_bool", "check_choice", "check_fraction", "check_generator",
           "check_int", "check_number", "check_positive"]


class ArgumentError(ValueError):
    """A function or command was given an argument it cannot accept (type or value)."""


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_real(name: str, value, expected: str) -> float:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ArgumentError(f"{name}={_describe(value)} is not allowed; expected {expected}")
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()          # 0-d host array or NumPy scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name}={_describe(value)} (type {type(value).__name__}) is not "
                            f"allowed; expected {expected}")
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentError(f"{name}={value!r} is not allowed; expected {expected}")
    return value


def check_number(name: str, value, *, minimum: float | None = None,
                 maximum: float | None = None, exclusive_minimum: bool = False,
                 exclusive_maximum: bool = False) -> float:
    """A finite real number within the given bounds, as a ``float``."""
    lo = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum:g}"
    hi = "" if maximum is None else f"{'<' if exclusive_maximum else '<='} {maximum:g}"
    expected = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") \
        + (f" {hi}" if hi else "")
    x = _as_real(name, value, expected)
    too_low = minimum is not None and (x <= minimum if exclusive_minimum else x < minimum)
    too_high = maximum is not None and (x >= maximum if exclusive_maximum else x > maximum)
    if too_low or too_high:
        raise ArgumentError(f"{name}={_describe(value)} is not allowed; expected {expected}")
    return x


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``), as a ``float``."""
    return check_number(name, value, minimum=0.0, exclusive_minimum=not allow_zero)


def check_fraction(name: str, value) -> float:
    """A fraction in (0, 1], as a ``float``."""
    return check_number(name, value, minimum=0.0, maximum=1.0, exclusive_minimum=True)


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An integer (Python or NumPy; not bool, not a float) within the bounds, as an ``int``."""
    bounds = " ".join(filter(None, [f">= {minimum}" if minimum is not None else "",
                                    "and" if minimum is not None and maximum is not None else "",
                                    f"<= {maximum}" if maximum is not None else ""]))
    expected = "an integer" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ArgumentError(f"{name}={_describe(value)} is not allowed; expected {expected}")
    try:
        x = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name}={_describe(value)} (type {type(value).__name__}) is not "
                            f"allowed; expected {expected}") from None
    if (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        raise ArgumentError(f"{name}={x!r} is not allowed; expected {expected}")
    return int(x)


def check_bool(name: str, value) -> bool:
    """``True`` or ``False`` (Python or NumPy bool), as a ``bool``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ArgumentError(f"{name}={_describe(value)} is not allowed; expected True or False")


def check_choice(name: str, value, choices) -> object:
    """One of ``choices`` (compared with ==); returns the value."""
    choices = tuple(choices)
    if isinstance(value, str) or not hasattr(value, "__len__"):
        try:
            if value in choices:
                return value
        except TypeError:
            pass
    allowed = ", ".join(repr(c) for c in choices)
    raise ArgumentError(f"{name}={_describe(value)} is not allowed; expected one of {allowed}")


def check_generator(name: str, value):
    """A host ``numpy.random.Generator`` (the one source of randomness); returns it."""
    import numpy as _np   # host-side type check only
    if isinstance(value, _np.random.Generator):
        return value
    raise ArgumentError(f"{name}={_describe(value)} (type {type(value).__name__}) is not "
                        "allowed; expected a numpy.random.Generator (np.random.default_rng)")
