"""``python -m kfc_ref tour``: the whole paper in one command, on the built-in MNIST subset.

1. the theorem checks (``kfc_ref.experiments.checks``: damping, conventions, Theorems 1-3,
   controls);
2. a short SGD run (max pooling) followed by the SUD analysis of App. D.1, and the same net
   with average pooling for the same number of iterations (Figure 3 c-d);
3. a short KFC-pre run (Algorithm 1) against that SGD run, same time budget (Figures 1-2);
4. the exact Fisher block of a tiny conv layer vs KFC, the approximation ladder, factored vs
   exact damping;
5. Theorem 3 over a trajectory: undamped KFC vs SGD on a network and its whitened twin.

Writes the figures of :mod:`kfc_ref.experiments.figures` (PNG + PDF), ``summary.md`` with the
measured numbers, and the training runs (``runs/``, each with ``metrics.csv``) into ``--out``.
Full mode is sized to finish in under 5 minutes on 2 CPU cores; ``--quick`` in well under a
minute (CI).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from kfc_ref.experiments import studies as ex
from kfc_ref.experiments.checks import run_checks
from kfc_ref.experiments.cli import CommandParser, add_output_arguments, fail
from kfc_ref.experiments.figures import add_run_arguments, compute_all, draw_all, output_error
from kfc_ref.experiments.rundir import clear_runs, make_output

DATA = "mnist5k"


def _fmt(value, spec=".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _length(budget) -> str:
    if budget.train_seconds:
        return (f"time budget ({budget.train_seconds:g} s of training each, at most "
                f"{budget.train_iters} iterations)")
    return f"length ({budget.train_iters} iterations each)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _training_section(res) -> list[str]:
    runs = {"SGD": res.runs["sgd"], "KFC-pre": res.runs["kfc-pre"]}
    rows = []
    for name, run in runs.items():
        last = run.metrics[-1] if run.metrics else {}
        rows.append([name, _fmt(last.get("iteration"), ".0f"),
                     _fmt(last.get("wall_seconds"), ".1f")]
                    + [_fmt(last.get(k)) for k in ("train_loss", "train_error", "test_loss",
                                                   "test_error")])
    lines = ["## KFC-pre vs SGD (Section 5.2, Figures 1-2 in miniature)", "",
             f"Same data, architecture `{res.archs[0]}`, mini-batch {res.budget.batch_size} and "
             f"{_length(res.budget)} (evaluations excluded from the seconds); losses and "
             "errors of the averaged parameters (App. B.1). Wall-clock seconds depend on what "
             "else runs on the machine.", ""]
    lines += _table(["method", "iterations", "seconds", "train loss", "train error",
                     "test loss", "test error"], rows)
    for name, run in runs.items():
        if run.status.startswith("diverged"):
            lines += ["", f"**{name} diverged** (the table shows its last evaluation before "
                          f"that): {run.status[len('diverged: '):]}"]
    if all(run.metrics for run in runs.values()):
        target = max(min(r["train_error"] for r in run.metrics) for run in runs.values())
        reach = {name: ex.first_reaching(run.metrics, "train_error", target)
                 for name, run in runs.items()}
        lines += ["", f"Lowest training error both reach: {target:.4f}; first reached by "
                  + "; ".join(f"{name} at iteration {r[0]} ({r[1]:.1f} s)"
                              for name, r in reach.items() if r is not None) + "."]
    return lines + [""]


def _sud_section(res) -> list[str]:
    rows = [[f"conv{k + 1}", _fmt(m.derivative_summary, ".3f"), _fmt(a.derivative_summary, ".3f"),
             _fmt(m.activation_summary, ".3f"), _fmt(a.activation_summary, ".3f")]
            for k, (m, a) in enumerate(zip(res.sud["max"], res.sud["avg"]))]
    iters = int(res.runs["sgd-avgpool"].metrics[-1]["iteration"])
    return (["## The SUD assumption measured (App. D.1, Figures 3-4)", "",
             f"Mean |correlation| at non-zero spatial offsets (|offset| <= 6), over all maps, on "
             f"{res.budget.sud_examples} test images with targets sampled from the model, after "
             f"{iters} SGD iterations. 0 = spatially uncorrelated (SUD holds).", ""]
            + _table(["layer", "derivatives, max pool", "derivatives, avg pool",
                      "activations, max pool", "activations, avg pool"], rows) + [""])


def _curvature_section(res) -> list[str]:
    lad, d = res.ladder, res.damping
    rows = [[r.name, _fmt(r.rel_error, ".4f"), _fmt(r.angle_deg, ".2f")] for r in lad.rows]
    k = int(np.argmin(np.abs(np.log(d.dampings / 1e-3))))
    lines = ["## Exact Fisher block vs KFC (Section 3's assumptions one at a time)", "",
             f"Second conv layer of a tiny tanh net trained {res.budget.tiny_iters} SGD steps on "
             f"MNIST shrunk to {res.tiny_side}x{res.tiny_side}; expectations over "
             f"{res.budget.ladder_examples} images and exactly over the model's labels; angles "
             f"with damping {lad.damping:g}.", ""]
    lines += _table(["rung", "||F_k - F|| / ||F||", "angle to F^-1 g (deg)"], rows)
    lines += ["", "## Factored vs exact damping (Eqs. 7-8, 20-22; App. B.2)", "",
              f"At gamma = {d.dampings[k]:.3g} (pi = {d.pi:.3g}): factored vs exact damped KFC "
              f"solve differ by {d.factored_vs_exact_error[k]:.3f} (relative) / "
              f"{d.factored_vs_exact_angle[k]:.2f} deg; angle to the exact block's "
              f"(F + gamma I)^-1 g: factored {d.factored_vs_fisher_angle[k]:.2f} deg, exact "
              f"damped KFC {d.exact_vs_fisher_angle[k]:.2f} deg. Largest relative difference "
              f"over gamma in [{d.dampings[0]:.0e}, {d.dampings[-1]:.0e}]: "
              f"{d.factored_vs_exact_error.max():.3f}.", ""]
    return lines


def _invariance_section(res) -> list[str]:
    inv = res.invariance
    rows = [[name, _fmt(v[0]), _fmt(v[-1])] for name, v in inv.losses.items()]
    lines = ["## Theorem 3: invariance to a centred/whitened reparameterisation (Eq. 24)", "",
             f"{len(next(iter(inv.losses.values()))) - 1} full-batch steps on "
             f"{res.budget.invariance_examples} images ({res.tiny_side}x{res.tiny_side}), tiny "
             "valid-conv tanh net; the reparameterised net whitens the input and every tanh "
             "output.", ""]
    lines += _table(["run", "loss at start", "loss at end"], rows)
    lines += [""] + [f"- largest gap max |log p - log p_dagger| along the trajectory, {name}: "
                     f"{max(g):.3g}" for name, g in inv.gaps.items()] + [""]
    return lines


def write_summary(path: str, res, checks, total_seconds: float, quick: bool) -> None:
    passed = sum(c.passed for c in checks)
    lines = [f"# kfc_ref tour ({'quick' if quick else 'full'} mode, data: {res.data})", "",
             f"Total time {total_seconds:.0f} s. Figures (PNG and PDF) are next to this file.", "",
             f"## Theorem checks: {passed}/{len(checks)} passed", ""]
    lines += _table(["check", "error", "tolerance", "result"],
                    [[c.name, f"{c.error:.3g}", ("<= " if c.expect == "below" else ">= ")
                      + f"{c.tolerance:.3g}", "pass" if c.passed else "FAIL"] for c in checks])
    lines += [""] + _sud_section(res) + _training_section(res) + _curvature_section(res)
    lines += _invariance_section(res)
    lines += ["## Time per step (seconds)", ""]
    lines += _table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in res.timings.items()])
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m kfc_ref tour",
                      description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI, well under a minute)")
    add_output_arguments(p, "tour folder")
    add_run_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (code := output_error(args, "tour folder")) is not None:
        return code
    t0 = time.perf_counter()
    try:
        make_output(args.out, overwrite=args.overwrite, what="tour folder")
        clear_runs(os.path.join(args.out, "runs"), overwrite=args.overwrite)
        print("[0/5] theorem checks", flush=True)
        checks = run_checks(args.seed)
        t_checks = time.perf_counter() - t0
        res = compute_all(DATA, seed=args.seed, device=args.device,
                          runs_dir=os.path.join(args.out, "runs"),
                          budget=ex.QUICK if args.quick else ex.TOUR)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        return fail(exc)
    res.timings = {"theorem checks": t_checks, **res.timings}
    t_draw = time.perf_counter()
    paths = draw_all(res, args.out)
    res.timings["figures"] = time.perf_counter() - t_draw
    total = time.perf_counter() - t0
    summary = os.path.join(args.out, "summary.md")
    write_summary(summary, res, checks, total, args.quick)
    print(f"\ntour done in {total:.0f} s: {sum(c.passed for c in checks)}/{len(checks)} checks "
          f"passed\n  summary: {summary}\n  figures: {len(paths) // 2} PNG + PDF in {args.out}\n"
          f"  runs:    {os.path.join(args.out, 'runs')} (metrics.csv per run)")
    return 0 if all(c.passed for c in checks) else 1
