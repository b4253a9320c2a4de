"""``python -m kfc_ref check``: the paper's equalities, checked on fresh random cases.

A registry of check functions ``check_xxx(rng, dtype, xp) -> CheckResult``: each draws a small
random case from ``rng`` (a NumPy Generator), builds it in ``dtype`` on the array module ``xp``
(NumPy or CuPy), measures one error and compares it with a tolerance named for that dtype.
Two kinds of result:

* ``expect="below"``: an equality the paper proves; passes when error <= tolerance;
* ``expect="above"``: a negative control (an assumption is broken on purpose); its "error" is
  the discrepancy it causes, and it passes when that reaches the tolerance, i.e. the check would
  detect the broken assumption.

Add a check with ``@register("group.name", "one line")``.  Each check gets its own Generator
seeded from (seed, name), so adding a check never changes the cases of the others.

Exit status of the command: 0 when every check passes, 1 when one fails (or raises), 2 for bad
arguments or an unavailable device.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as _host_np  # host-side random cases (seeded Generators) and dense references

from kfc_ref.backend import DEVICES, check_device, namespace_for, to_numpy
from kfc_ref.damping import eigen_factors, factored_inverse, pi_trace
from kfc_ref.invariance import function_discrepancy, invariance_error, random_reparameterization
from kfc_ref.invariance import dagger_network, dagger_params
from kfc_ref.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.losses import softmax_cross_entropy
from kfc_ref.network import DTYPES, Sequential


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


def _on(xp, a, dtype):
    return xp.asarray(_host_np.asarray(a, dtype=dtype))


def _rel_err(a, ref) -> float:
    a = to_numpy(a).astype(_host_np.float64)
    return float(_host_np.abs(a - ref).max() / max(_host_np.abs(ref).max(), 1e-300))


def _random_factors(rng):
    """PSD (Omega, Gamma) with sizes 2-6 / 2-4 and a gradient G (host float64)."""
    def gram(d):
        B = rng.normal(size=(d, d))
        return B @ B.T + 0.1 * _host_np.eye(d)
    om, ga = gram(int(rng.integers(2, 7))), gram(int(rng.integers(2, 5)))
    return om, ga, rng.normal(size=(ga.shape[0], om.shape[0]))


# --------------------------------------------------------------------------- damping
#: Dense vs Kronecker damped solves; condition numbers here are <= ~1e4 (see tests/test_damping).
SOLVE_TOL = {"float64": 1e-9, "float32": 5e-3}


@register("damping.pi_argmin", "Eq. 8 (trace norm) minimises the trace-norm bound on Eq. 7's "
          "residual: relative slope of the bound at pi, and excess over a 4001-point pi grid")
def check_pi_argmin(rng, dtype, xp):
    om, ga, _ = _random_factors(rng)
    pi = pi_trace(_on(xp, om, dtype), _on(xp, ga, dtype))
    nuc = lambda M: _host_np.linalg.norm(M, "nuc")
    left = nuc(_host_np.kron(_host_np.eye(om.shape[0]), ga))     # ||I kron Gamma||_tr
    right = nuc(_host_np.kron(om, _host_np.eye(ga.shape[0])))    # ||Omega kron I||_tr
    bound = lambda p: p * left + right / p                       # / sqrt(lambda + gamma)
    grid = bound(pi * _host_np.exp(_host_np.linspace(-4, 4, 4001)))
    slope = abs(1.0 - right / (pi * pi * left))                  # d bound / d pi at pi, / left
    excess = max(0.0, (bound(pi) - grid.min()) / bound(pi))
    return measured("damping.pi_argmin", max(slope, excess), {"float64": 1e-12, "float32": 1e-5},
                    dtype, f"pi={pi:.4g}, dim Omega={om.shape[0]}, dim Gamma={ga.shape[0]}")


@register("damping.factored_solve", "(Gamma_d^-1 G Omega_d^-1) equals the dense solve with "
          "(Omega+pi r I) kron (Gamma+r/pi I), both vec orders (Eqs. 20-22)")
def check_factored_solve(rng, dtype, xp):
    om, ga, G = _random_factors(rng)
    damping = float(rng.uniform(1e-2, 1.0))
    out = to_numpy(factored_inverse(_on(xp, om, dtype), _on(xp, ga, dtype), damping)
                   .apply(_on(xp, G, dtype)))
    r, pi = damping ** 0.5, pi_trace(om, ga)
    om_d, ga_d = om + pi * r * _host_np.eye(om.shape[0]), ga + r / pi * _host_np.eye(ga.shape[0])
    err = max(_rel_err(out.ravel(order="F"),
                       _host_np.linalg.solve(_host_np.kron(om_d, ga_d), G.ravel(order="F"))),
              _rel_err(out.ravel(), _host_np.linalg.solve(_host_np.kron(ga_d, om_d), G.ravel())))
    return measured("damping.factored_solve", err, SOLVE_TOL, dtype, f"damping={damping:.3g}")


@register("damping.exact_solve", "eigen solve (App. B.2, Eqs. 33-38) equals the dense solve "
          "with Omega kron Gamma + gamma I, both vec orders")
def check_exact_solve(rng, dtype, xp):
    om, ga, G = _random_factors(rng)
    damping = float(rng.uniform(1e-2, 1.0))
    out = to_numpy(eigen_factors(_on(xp, om, dtype), _on(xp, ga, dtype))
                   .apply(_on(xp, G, dtype), damping))
    eye = _host_np.eye(om.shape[0] * ga.shape[0])
    err = max(_rel_err(out.ravel(order="F"), _host_np.linalg.solve(
                  _host_np.kron(om, ga) + damping * eye, G.ravel(order="F"))),
              _rel_err(out.ravel(), _host_np.linalg.solve(
                  _host_np.kron(ga, om) + damping * eye, G.ravel())))
    return measured("damping.exact_solve", err, SOLVE_TOL, dtype, f"damping={damping:.3g}")


# --------------------------------------------------------------------------- conventions
@register("conventions.flat_gradient", "per-example vec(DW_bar) = sum_t a_t kron d_t is the "
          "flat gradient of that example's loss (column-stacking order)")
def check_flat_gradient(rng, dtype, xp):
    net = Sequential([Conv2d(2, 3, 3, stride=2, padding=1), Tanh(), Flatten(), Dense(27, 3)],
                     (2, 5, 5))
    params = [None if p is None else xp.asarray(p) for p in net.init(rng, dtype=dtype)]
    x = _on(xp, rng.normal(size=(3, 2, 5, 5)), dtype)
    y = xp.asarray(rng.integers(0, 3, 3))
    tape = net.forward(params, x)
    _, douts = net.backward(params, tape, softmax_cross_entropy(tape.output, y)[1])
    records, err = net.records(tape, douts), 0.0
    for n in range(3):
        flat = to_numpy(net.flatten(net.loss_and_grads(params, x[n:n + 1], y[n:n + 1])[1]))
        for rec, block in zip(records, net.param_slices()):
            a, d = to_numpy(rec.A_H[n]), to_numpy(rec.DS[n])
            ref = sum(_host_np.kron(a[t], d[t]) for t in range(a.shape[0]))
            err = max(err, _rel_err(flat[block], ref))
    return measured("conventions.flat_gradient", err, {"float64": 1e-10, "float32": 1e-4}, dtype)


# --------------------------------------------------------------------------- Theorem 3
#: Same function (Lemma 2): a few matmuls/solves with condition numbers <= 16.
SAME_FUNCTION_TOL = {"float64": 1e-12, "float32": 1e-5}
#: Undamped KFC on N vs N-dagger: round-off times the factors' condition numbers; measured
#: <= 2e-12 (float64) and <= 2e-4 (float32) over 30 seeds.
INVARIANCE_TOL = {"float64": 1e-8, "float32": 1e-3}
#: A non-invariant update must move the networks apart by at least this (measured >= 0.13).
CONTROL_MIN = {"float64": 1e-2, "float32": 1e-2}
THEOREM3_LR = 0.5


def _theorem3_case(rng, dtype, xp, *, padded, orthogonal=False, shifts=True):
    """Two tanh convs, Flatten, softmax Dense; N so that every Omega is full rank."""
    if padded:   # zero padding: shifts d are drawn as 0 in front of the convs (Eq. 79 caveat)
        layers, shape, n = [Conv2d(2, 3, 3, padding=1), Tanh(),
                            Conv2d(3, 2, 3, stride=2, padding=1)], (2, 4, 4), 24
    else:
        layers, shape, n = [Conv2d(2, 3, 3), Tanh(), Conv2d(3, 2, 2)], (2, 5, 5), 20
    net = Sequential(layers + [Tanh(), Flatten(), Dense(8, 3)], shape)
    params = net.init(rng, dtype=dtype)
    for p in params:
        if p is not None:
            p[:, 0] = rng.normal(0.0, 0.3, p.shape[0])
    params = [None if p is None else xp.asarray(p) for p in params]
    x, x_test = (_on(xp, rng.normal(size=(m,) + shape), dtype) for m in (n, 16))
    y = xp.asarray(rng.integers(0, 3, n))
    reparam = random_reparameterization(net, rng, params[0], orthogonal=orthogonal,
                                        shifts=shifts)
    return net, params, x, y, x_test, reparam


@register("theorem3.same_function", "Lemma 2: N-dagger (Eq. 24) with W_bar-dagger of Eq. 84 "
          "computes the same logits as N (valid convs, shifts c and d)")
def check_same_function(rng, dtype, xp):
    net, params, _, _, x_test, reparam = _theorem3_case(rng, dtype, xp, padded=False)
    err = function_discrepancy(net, params, dagger_network(net, reparam),
                               dagger_params(net, params, reparam), x_test)
    return measured("theorem3.same_function", err, SAME_FUNCTION_TOL, dtype)


def _invariance(name, rng, dtype, xp, *, padded, method="kfc", damping=None, orthogonal=False,
                shifts=True, tol=INVARIANCE_TOL, expect="below"):
    net, params, x, y, x_test, reparam = _theorem3_case(rng, dtype, xp, padded=padded,
                                                        orthogonal=orthogonal, shifts=shifts)
    err = invariance_error(net, params, reparam, x, y, x_test, seed=int(rng.integers(2**31)),
                           lr=THEOREM3_LR, method=method, damping=damping)
    detail = (f"max |log p| gap after one step, method={method}"
              f"{'' if damping is None else f', damping={damping}'}, "
              f"{'padded' if padded else 'valid'} convs, "
              f"{'orthogonal' if orthogonal else 'general'} U,V, shifts={'yes' if shifts else 'no'}")
    return measured(name, err, tol, dtype, detail, expect)


@register("theorem3.kfc_invariant", "Theorem 3: one undamped KFC step on N-dagger, mapped "
          "back, equals the step on N (valid convs, shifts c and d)")
def check_kfc_invariant(rng, dtype, xp):
    return _invariance("theorem3.kfc_invariant", rng, dtype, xp, padded=False)


@register("theorem3.kfc_invariant_padded", "Theorem 3 with zero-padded strided convs (d = 0 "
          "in front of them, shifts c kept)")
def check_kfc_invariant_padded(rng, dtype, xp):
    return _invariance("theorem3.kfc_invariant_padded", rng, dtype, xp, padded=True)


@register("theorem3.damped_orthogonal", "damped KFC (factored, pi) stays invariant for "
          "orthogonal U, V without shifts")
def check_damped_orthogonal(rng, dtype, xp):
    return _invariance("theorem3.damped_orthogonal", rng, dtype, xp, padded=False,
                       method="kfc-damped", damping=1e-2, orthogonal=True, shifts=False)


@register("control.sgd_not_invariant", "negative control: plain SGD is not invariant "
          "(discrepancy must reach the tolerance)")
def check_control_sgd(rng, dtype, xp):
    return _invariance("control.sgd_not_invariant", rng, dtype, xp, padded=False,
                       method="sgd", tol=CONTROL_MIN, expect="above")


@register("control.diagonal_fisher_not_invariant", "negative control: a diagonal-Fisher "
          "preconditioner is not invariant")
def check_control_diagonal(rng, dtype, xp):
    return _invariance("control.diagonal_fisher_not_invariant", rng, dtype, xp, padded=False,
                       method="diagonal-fisher", damping=1e-4, tol=CONTROL_MIN, expect="above")


@register("control.damped_kfc_not_invariant", "negative control: damped KFC with "
          "non-orthogonal U, V is not invariant")
def check_control_damped(rng, dtype, xp):
    return _invariance("control.damped_kfc_not_invariant", rng, dtype, xp, padded=False,
                       method="kfc-damped", damping=1e-2, tol=CONTROL_MIN, expect="above")


# --------------------------------------------------------------------------- running
def check_rng(seed: int, name: str) -> _host_np.random.Generator:
    """The Generator of one check: seeded from (seed, crc32(name))."""
    return _host_np.random.default_rng([seed, zlib.crc32(name.encode())])


def run_checks(seed: int = 0, dtype: str = "float64", device: str = "cpu",
               names=None) -> list[CheckResult]:
    """Run the registered checks (all, or ``names``) and return their results; a check that
    raises is reported as failed with the exception in ``detail``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    xp = namespace_for(device)
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
    results = run_checks(args.seed, args.dtype, args.device, args.only)
    if args.json:
        print(json.dumps([_json_ready(r) for r in results], indent=2))
    else:
        print(format_table(results))
        failed = sum(not r.passed for r in results)
        print(f"\n{len(results) - failed}/{len(results)} checks passed "
              f"(seed {args.seed}, {args.dtype}, {args.device})")
    return 0 if all(r.passed for r in results) else 1
