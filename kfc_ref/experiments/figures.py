"""``python -m kfc_ref figures``: the paper's pictures, recomputed on our code.

Figures written (PNG and PDF, names without extension):

* ``sud_derivatives``  Figure 3 layout: |spatial autocorrelation| of the pre-activation
  derivatives of three maps per conv layer and the cross-map matrix at the centre, for a net
  trained briefly with SGD with max pooling and the same net with average pooling (3 a-d);
* ``sud_activations``  Figure 4 layout: the same for the (uncentred) input activations;
* ``sud_summary``      mean |correlation| at non-zero offsets per layer: derivatives with max
  vs average pooling, activations (App. D.1);
* ``exact_vs_kfc``     the exact Fisher block of a tiny conv layer, Omega kron Gamma (Eq. 18),
  and their difference;
* ``ladder``           the approximation ladder exact -> IAD -> IAD+SUD -> KFC (docs/ladder.md);
* ``training``         KFC-pre vs SGD against seconds and iterations (Figures 1-2 in miniature);
* ``damping``          factored (Eq. 21) vs exact (App. B.2) damping against gamma;
* ``invariance``       Theorem 3 over a trajectory: centred/whitened reparameterisation.

Computation lives in :mod:`kfc_ref.experiments.studies`, :mod:`kfc_ref.theory.sud`,
:mod:`kfc_ref.theory.ladder`; drawing in :mod:`kfc_ref.experiments.plotting`.  ``--quick`` shrinks
every experiment (seconds, for CI).

``--out`` is required and must be a new or empty folder, so the committed ``figures/`` is never
replaced by accident; regenerating them is the explicit
``python -m kfc_ref figures --out figures --overwrite``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from kfc_ref.experiments import plotting
from kfc_ref.experiments import studies as ex
from kfc_ref.experiments.cli import CommandParser, add_output_arguments, fail
from kfc_ref.experiments.rundir import check_new_output, clear_runs, make_output
from kfc_ref.backend import DEVICES, check_device, namespace_for
from kfc_ref.data import DATASET_NAMES
from kfc_ref.theory.sud import sud_analysis

#: Architectures per dataset for the SUD comparison: (max-pool, average-pool) twins.
SUD_ARCHS = {"mnist5k": ("small", "small-avg"), "digits": ("small", "small-avg"),
             "svhn": ("small", "small-avg"), "cifar10": ("cifar10", "cifar10-avg")}
#: Spatial offsets shown in the correlation panels (the paper's are about +-6, App. D.1).
MAX_OFFSET = 6
NAN_NOTE = ("White rows/columns: maps that are exactly 0 at the centre location in every "
            "example of the sample (correlation undefined).")


@dataclass
class Results:
    """Everything the figures and the tour summary are drawn from."""

    data: str
    budget: ex.Budget
    runs: dict = field(default_factory=dict)        # name -> TrainResult
    sud: dict = field(default_factory=dict)         # 'max' / 'avg' -> list[LayerSUD]
    ladder: object = None
    damping: object = None
    invariance: object = None
    tiny_side: int = 0                               # side of the shrunk images
    archs: tuple = ()                                # (max-pool, avg-pool) architecture names
    timings: dict = field(default_factory=dict)     # step -> seconds


def _timed(results: Results, name: str, func, *args, **kwargs):
    t0 = time.perf_counter()
    out = func(*args, **kwargs)
    results.timings[name] = time.perf_counter() - t0
    return out


def _log(quiet: bool, message: str):
    if not quiet:
        print(message, flush=True)


def compute_all(data: str = "mnist5k", data_dir=None, *, quick: bool = False, seed: int = 0,
                device: str = "cpu", runs_dir: str, quiet: bool = False,
                budget: ex.Budget | None = None) -> Results:
    """Run every experiment behind the figures (see the module doc) and return the results.

    ``budget``: how long each experiment runs (default ``experiments.QUICK`` with ``quick``,
    else ``experiments.FIGURES``: fixed-length training runs).

    Training runs (``kfc_ref.experiments.train``) write their folders under ``runs_dir``:
    ``sgd`` (max pooling, the SUD net), ``sgd-avgpool`` (same number of iterations) and ``kfc-pre``.
    """
    budget = budget or (ex.QUICK if quick else ex.FIGURES)
    length = (f"<= {budget.train_seconds:g} s" if budget.train_seconds
              else f"{budget.train_iters} iterations")
    res = Results(data, budget)
    arch_max, arch_avg = res.archs = SUD_ARCHS[data]
    common = dict(data=data, data_dir=data_dir, seed=seed, device=device)

    _log(quiet, f"[1/5] SGD on {data} ({arch_max}, max pooling, {length})")
    sgd = _timed(res, "sgd run", ex.training_run, "sgd", arch_max, budget,
                 os.path.join(runs_dir, "sgd"), **common)
    res.runs["sgd"] = sgd
    if sgd.net is None:
        raise RuntimeError(f"the SGD run behind the SUD analysis stopped: {sgd.status}")
    dataset = sgd.dataset
    xp = namespace_for(device)
    x_sud = xp.asarray(dataset.x_test[:budget.sud_examples])
    res.sud["max"] = _timed(res, "sud max", sud_analysis, sgd.net, sgd.params, x_sud,
                            np.random.default_rng([seed, 2]), MAX_OFFSET)
    iters = int(sgd.metrics[-1]["iteration"]) if sgd.metrics else budget.train_iters
    _log(quiet, f"[2/5] SGD with average pooling ({arch_avg}), {iters} iterations, SUD analysis")
    avg = _timed(res, "sgd avg-pool run", ex.training_run, "sgd", arch_avg, budget,
                 os.path.join(runs_dir, "sgd-avgpool"), iters=iters, eval_every=iters, **common)
    res.runs["sgd-avgpool"] = avg
    if avg.net is None:
        raise RuntimeError(f"the average-pooling SGD run stopped: {avg.status}")
    res.sud["avg"] = _timed(res, "sud avg", sud_analysis, avg.net, avg.params, x_sud,
                            np.random.default_rng([seed, 2]), MAX_OFFSET)

    _log(quiet, f"[3/5] KFC-pre on {data} ({arch_max}, {length})")
    res.runs["kfc-pre"] = _timed(res, "kfc-pre run", ex.training_run, "kfc-pre", arch_max,
                                 budget, os.path.join(runs_dir, "kfc-pre"), **common)
    if res.runs["kfc-pre"].status.startswith("diverged"):
        _log(quiet, f"      KFC-pre {res.runs['kfc-pre'].status}")

    _log(quiet, "[4/5] exact Fisher block vs KFC, approximation ladder, damping sweep")
    problem = _timed(res, "tiny problem", ex.tiny_problem, dataset, budget, seed)
    res.tiny_side = int(problem.x.shape[-1])
    res.ladder = _timed(res, "ladder", ex.exact_vs_kfc, problem, budget.ladder_examples)
    res.damping = _timed(res, "damping sweep", ex.damping_sweep, problem, res.ladder,
                         budget.ladder_examples, budget.dampings)

    _log(quiet, "[5/5] Theorem 3: KFC and SGD on a network and its whitened twin")
    n = budget.invariance_examples
    x_inv = ex.shrink_images(dataset.x_train[:n].astype(np.float64))
    res.invariance = _timed(res, "invariance", ex.invariance_trajectories, x_inv,
                            dataset.y_train[:n], dataset.num_classes, budget.invariance_iters,
                            seed)
    return res


# --------------------------------------------------------------------------- drawing
def _layer_labels(sud_results) -> list[str]:
    """conv1, conv2, ... in the order of the conv layers."""
    return [f"conv{k + 1}" for k in range(len(sud_results))]


def figure_sud(res: Results, out_dir: str) -> list[str]:
    """sud_derivatives (Fig. 3 a-d), sud_activations (Fig. 4), sud_summary (bars)."""
    mx, av = res.sud["max"], res.sud["avg"]
    labels = _layer_labels(mx)
    rows = [(f"max {lab}", r.derivative_autocorr, r.derivative_cross) for lab, r in zip(labels, mx)]
    rows += [(f"avg {lab}", r.derivative_autocorr, r.derivative_cross)
             for lab, r in zip(labels, av)]
    paths = plotting.plot_correlation_panels(
        rows, "Pre-activation derivatives (App. D.1, Fig. 3): max pooling (top), average "
              "pooling (bottom)", out_dir, "sud_derivatives", note=NAN_NOTE)
    rows = [(lab, r.activation_autocorr, r.activation_cross) for lab, r in zip(labels, mx)]
    paths += plotting.plot_correlation_panels(
        rows, "Input activations, uncentred (Fig. 4), max-pool net", out_dir, "sud_activations",
        note=NAN_NOTE)
    paths += plotting.plot_sud_bars(
        labels, {"derivatives, max pool": [r.derivative_summary for r in mx],
                 "derivatives, avg pool": [r.derivative_summary for r in av],
                 "activations, max pool": [r.activation_summary for r in mx]},
        out_dir, "sud_summary")
    return paths


def figure_exact_vs_kfc(res: Results, out_dir: str) -> list[str]:
    """exact_vs_kfc (heatmaps) and ladder (bars)."""
    F, K = res.ladder.matrices["exact"], res.ladder.matrices["KFC"]
    size = F.shape[0]
    paths = plotting.plot_fisher_vs_kfc(
        [("exact Fisher block F\n(Eqs. 3, 12)", F), ("KFC: Omega kron Gamma\n(Eq. 18)", K),
         ("difference\nF - Omega kron Gamma", F - K)],
        f"Second conv layer of a tiny net ({size} x {size} block, {res.data} shrunk to "
        f"{res.tiny_side}x{res.tiny_side})",
        out_dir, "exact_vs_kfc")
    paths += plotting.plot_ladder(
        [tuple(r) for r in res.ladder.rows],
        f"Approximation ladder (gamma = {res.ladder.damping:g} for the angles)", out_dir,
        "ladder")
    return paths


def figure_training(res: Results, out_dir: str) -> list[str]:
    runs = {name: res.runs[name].metrics for name in ("sgd", "kfc-pre") if name in res.runs}
    return plotting.plot_training_curves(
        runs, f"KFC-pre vs SGD on {res.data} (averaged parameters; batch {res.budget.batch_size} "
              "both)", out_dir, "training")


def figure_damping(res: Results, out_dir: str) -> list[str]:
    d = res.damping
    return plotting.plot_damping_sweep(
        d.dampings,
        [("||u_factored - u_exact|| / ||u_exact||",
          {"factored (Eq. 21) vs exact damped KFC": d.factored_vs_exact_error}),
         ("angle(u_factored, u_exact) (deg)",
          {"factored (Eq. 21) vs exact damped KFC": d.factored_vs_exact_angle}),
         ("angle to (F + gamma I)^-1 g (deg)", {"factored (Eq. 21)": d.factored_vs_fisher_angle,
                                               "exact damped KFC (App. B.2)":
                                                   d.exact_vs_fisher_angle})],
        "Damping the KFC block: factored vs exact", out_dir, "damping")


def figure_invariance(res: Results, out_dir: str) -> list[str]:
    inv = res.invariance
    return plotting.plot_invariance(
        inv.losses, inv.gaps, "Theorem 3: a centred/whitened reparameterisation (Eq. 24)",
        out_dir, "invariance")


FIGURES = (figure_sud, figure_exact_vs_kfc, figure_training, figure_damping, figure_invariance)


def draw_all(res: Results, out_dir: str) -> list[str]:
    """Every figure of the module doc; returns the written paths."""
    return [p for fig in FIGURES for p in fig(res, out_dir)]


# --------------------------------------------------------------------------- CLI
def build_parser(prog: str = "python -m kfc_ref figures") -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="writes PNG + PDF of: sud_derivatives, sud_activations, "
                             "sud_summary, exact_vs_kfc, ladder, training, damping, invariance. "
                             "Regenerate the committed figures with: python -m kfc_ref figures "
                             "--out figures --overwrite")
    p.add_argument("--quick", action="store_true", help="tiny budgets (seconds), for CI")
    p.add_argument("--data", choices=DATASET_NAMES, default="mnist5k")
    p.add_argument("--data-dir", default=None, help="folder of the cifar10/svhn files")
    add_output_arguments(p, "figure folder")
    p.add_argument("--runs-dir", default=None,
                   help="keep the training runs here (default: a temporary folder)")
    add_run_arguments(p)
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--seed and --device, shared by the figures and tour commands."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the training runs and the SUD analysis run (the tiny exact-"
                        "Fisher and Theorem 3 experiments always use NumPy float64)")


def output_error(args, what: str) -> int | None:
    """Exit code 2 with a one-line message when ``args.device`` cannot be used or ``args.out``
    is an existing non-empty folder without ``--overwrite``; else None."""
    try:
        check_device(args.device)
        check_new_output(args.out, overwrite=args.overwrite, what=what, resume_hint=False)
    except (RuntimeError, ValueError) as exc:
        return fail(exc)
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (code := output_error(args, "figure folder")) is not None:
        return code
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.runs_dir:
                clear_runs(args.runs_dir, overwrite=args.overwrite)
            res = compute_all(args.data, args.data_dir, quick=args.quick, seed=args.seed,
                              device=args.device, runs_dir=args.runs_dir or tmp)
            make_output(args.out, overwrite=args.overwrite, what="figure folder")
        except (ValueError, OSError, RuntimeError, ImportError) as exc:
            return fail(exc)
        paths = draw_all(res, args.out)
    print(f"wrote {len(paths)} files to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0
