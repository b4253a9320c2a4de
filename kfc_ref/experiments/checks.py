"""``python -m kfc_ref check``: the paper's equalities, checked on fresh random cases.

A registry of check functions ``check_xxx(rng, dtype, xp) -> CheckResult``: each draws a small
random case from ``rng`` (a NumPy Generator), builds it in ``dtype`` on the array module ``xp``
(NumPy or CuPy), measures one error and compares it with a tolerance named for that dtype.
Two kinds of result:

* ``expect="below"``: an equality the paper proves; passes when error <= tolerance;
* ``expect="above"``: a negative control (an assumption is broken on purpose); its "error" is
  the discrepancy it causes, and it passes when that reaches the tolerance, i.e. the check would
  detect the broken assumption.

Add a check with ``@register("group.name", "one line")`` in a module listed in CHECK_MODULES
(the checks themselves live in :mod:`kfc_ref.experiments.paper_checks` and
:mod:`kfc_ref.experiments.estimator_checks`).  Each check gets its own Generator
seeded from (seed, name), so adding a check never changes the cases of the others.

Exit status of the command: 0 when every check passes, 1 when one fails (or raises), 2 for bad
arguments or an unavailable device.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import textwrap
import zlib
from dataclasses import asdict, dataclass
from collections.abc import Callable

import numpy as _host_np  # host-side Generators only

from kfc_ref.validate import check_choice, check_int
from kfc_ref.backend import DEVICES, check_device, namespace_for
from kfc_ref.nn.network import DTYPES

#: Modules whose import registers checks (kept separate so this module stays the command).
CHECK_MODULES = ("kfc_ref.experiments.paper_checks", "kfc_ref.experiments.estimator_checks")


@dataclass
class CheckResult:
    """One measured check: passed is error <= tolerance (expect='below') or >= (='above')."""

    name: str
    error: float
    tolerance: float
    passed: bool
    detail: str = ""
    expect: str = "below"


@dataclass(frozen=True)
class Check:
    name: str
    func: Callable
    description: str


REGISTRY: dict[str, Check] = {}


def register(name: str, description: str):
    """Decorator adding ``func(rng, dtype, xp) -> CheckResult`` to the registry under ``name``."""
    def add(func):
        if name in REGISTRY:
            raise ValueError(f"a check named {name!r} is already registered")
        REGISTRY[name] = Check(name, func, description)
        return func
    return add


def measured(name, error, tolerances: dict, dtype: str, detail="", expect="below") -> CheckResult:
    """A CheckResult from a measured error and a {dtype: tolerance} table."""
    tol = tolerances[dtype]
    error = float(error)
    ok = (error <= tol) if expect == "below" else (error >= tol)
    return CheckResult(name, error, tol, bool(ok and math.isfinite(error)), detail, expect)


def load_checks() -> dict:
    """Import the CHECK_MODULES (registering their checks) and return the registry."""
    for module in CHECK_MODULES:
        importlib.import_module(module)
    return REGISTRY


# --------------------------------------------------------------------------- running
def check_rng(seed: int, name: str) -> _host_np.random.Generator:
    """The Generator of one check: seeded from (seed, crc32(name))."""
    return _host_np.random.default_rng([seed, zlib.crc32(name.encode())])


def run_checks(seed: int = 0, dtype: str = "float64", device: str = "cpu",
               names=None) -> list[CheckResult]:
    """Run the registered checks (all, or ``names``) and return their results; a check that
    raises is reported as failed with the exception in ``detail``."""
    check_int("seed", seed, minimum=0)
    check_choice("dtype", dtype, DTYPES)
    xp = namespace_for(device)
    load_checks()
    results = []
    for name in (REGISTRY if names is None else names):
        check = REGISTRY[name]
        try:
            res = check.func(check_rng(seed, name), dtype, xp)
        except Exception as exc:  # report, do not abort the other checks
            res = CheckResult(name, float("nan"), float("nan"), False,
                              f"raised {type(exc).__name__}: {exc}")
        results.append(res)
    return results


def format_table(results: list[CheckResult]) -> str:
    width = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':<{width}}  {'error':>10}  {'tolerance':>12}  result",
             "-" * (width + 36)]
    for r in results:
        rule = "<=" if r.expect == "below" else ">="
        lines.append(f"{r.name:<{width}}  {r.error:>10.3g}  {rule} {r.tolerance:<9.3g}  "
                     f"{'pass' if r.passed else 'FAIL'}")
        if not r.passed and r.detail:
            lines.append(f"{'':<{width}}  ({r.detail})")
    return "\n".join(lines)


def _json_ready(r: CheckResult) -> dict:
    d = asdict(r)
    for key in ("error", "tolerance"):        # JSON has no NaN/inf
        if not math.isfinite(d[key]):
            d[key] = None
    return d


def build_parser() -> argparse.ArgumentParser:
    load_checks()
    listing = "\n".join(f"  {c.name}\n" + textwrap.fill(c.description, 88, initial_indent=" " * 6,
                                                         subsequent_indent=" " * 6)
                        for c in REGISTRY.values())
    parser = argparse.ArgumentParser(
        prog="python -m kfc_ref check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Check the paper's equalities (Theorem 3 invariance, damping, conventions, ...) on "
            "fresh random cases drawn from --seed, and run negative controls that must fail.  "
            "Prints a table: check, measured error, tolerance (<= for an equality, >= for a "
            "negative control), pass/FAIL.", 88),
        epilog=f"checks:\n{listing}\n\nexit status: 0 all passed, 1 a check failed, "
               "2 bad arguments or device unavailable.")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the random cases (default 0)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="array module: cpu = NumPy, gpu = CuPy (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float64",
                        help="floating-point type; tolerances are set per dtype (default float64)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {name, error, tolerance, passed, expect, "
                             "detail} instead of the table")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(REGISTRY),
                        help="run only these checks (names as listed below)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                 # --help (0) or a bad argument (2)
        return int(exc.code or 0)
    try:
        check_device(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seed < 0:
        parser.error(f"--seed must be an integer >= 0, got {args.seed}")
    results = run_checks(args.seed, args.dtype, args.device, args.only)
    if args.json:
        print(json.dumps([_json_ready(r) for r in results], indent=2))
    else:
        print(format_table(results))
        failed = sum(not r.passed for r in results)
        print(f"\n{len(results) - failed}/{len(results)} checks passed "
              f"(seed {args.seed}, {args.dtype}, {args.device})")
    return 0 if all(r.passed for r in results) else 1
