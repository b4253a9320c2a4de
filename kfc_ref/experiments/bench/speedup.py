"""The paper's speed-up claims on our code (Section 5, Figures 1-2), measured side by side.

* :func:`iterations_to_target`: with one large mini-batch size for both methods, each at its
  best learning rate from a short sweep, the number of updates SGD and KFC-pre need to reach a
  training error (default 10%), or, if one never does, the lowest error both reach.  The paper
  measured 300 (KFC-pre) vs 6,000 (SGD) updates at batch 4,096 on CIFAR-10.
* :func:`wallclock_curves`: training error against seconds for SGD at batch 128 and KFC-pre at
  batch 512 (the paper's sizes), each for the same time budget on the same machine.

Both write their runs under ``--out`` and a ``summary.json``; the figures command can draw the
curves from the runs' ``metrics.csv``.  Run ``python -m kfc_ref bench speedup --help``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from kfc_ref.experiments.checkpoint import atomic_write_text
from kfc_ref.experiments.sweep import PAPER_RATES, lr_sweep
from kfc_ref.experiments.train import TrainConfig, train


def first_iteration_below(rows, target: float):
    """The first evaluated iteration whose training error is <= target (None if never)."""
    for r in rows:
        if r["train_error"] <= target:
            return int(r["iteration"])
    return None


def sweep_rate(base: TrainConfig, method: str, batch_size: int, rates, sweep_iters: int):
    """(best rate, sweep rows) of ``method`` at ``batch_size``: ``sweep_iters`` updates per rate
    on the paper's criterion, final training error (Section 5), in ``OUT/sweep_<method>``.

    The sweep runs judge the parameters themselves, without parameter averaging: averaged over
    one epoch (the runs' default), theta_bar after a few hundred updates is still mostly the
    initial parameters (measured: after 50 updates at batch 128 on CIFAR-10 every rate's
    averaged training error was 83-89%), which would make the choice noise."""
    options = {**base.optimizer_options, "averaging_tau": 0}
    cfg = dataclasses.replace(base, optimizer=method, batch_size=batch_size, iters=sweep_iters,
                              epochs=None, time_limit=None, eval_every=sweep_iters,
                              optimizer_options=options,
                              out=os.path.join(base.out, f"sweep_{method}"))
    return lr_sweep(cfg, rates)


def iterations_to_target(base: TrainConfig, rates=(0.3, 0.1, 0.03, 0.01),
                         sweep_iters: int = 50, max_iters: int = 1000,
                         target: float = 0.10, lrs: dict | None = None) -> dict:
    """Sweep each method's rate on ``sweep_iters`` updates (unless ``lrs`` gives it), then
    train ``max_iters`` updates at that rate and count updates to ``target`` training error
    (averaged parameters)."""
    out = {"target": target, "batch_size": base.batch_size, "methods": {}}
    runs = {}
    for method in ("sgd", "kfc-pre"):
        best_lr, rows = (lrs or {}).get(method), []
        if best_lr is None:
            best_lr, rows = sweep_rate(base, method, base.batch_size, rates, sweep_iters)
        cfg = dataclasses.replace(base, optimizer=method, lr=best_lr, iters=max_iters,
                                  epochs=None, out=os.path.join(base.out, method))
        result = train(cfg)
        runs[method] = result.metrics
        out["methods"][method] = {
            "best_lr": best_lr,
            "sweep": [dataclasses.asdict(r) for r in rows],
            "updates_to_target": first_iteration_below(result.metrics, target),
            "lowest_train_error": min(r["train_error"] for r in result.metrics),
            "seconds": result.metrics[-1]["wall_seconds"],
            "iterations_run": result.metrics[-1]["iteration"],
        }
    common = max(m["lowest_train_error"] for m in out["methods"].values())
    out["lowest_error_both_reach"] = common
    for method, rows in runs.items():
        out["methods"][method]["updates_to_common_error"] = first_iteration_below(rows, common)
    sgd, kfc = (out["methods"][m]["updates_to_target"] for m in ("sgd", "kfc-pre"))
    if sgd and kfc:
        out["ratio_at_target"] = sgd / kfc
    sgd_c, kfc_c = (out["methods"][m]["updates_to_common_error"] for m in ("sgd", "kfc-pre"))
    out["ratio_at_common_error"] = sgd_c / kfc_c if sgd_c and kfc_c else None
    return out


def wallclock_curves(base: TrainConfig, lr_sgd: float | None, lr_kfc: float | None,
                     seconds: float, eval_examples: int = 5120, rates=PAPER_RATES,
                     sweep_iters: int = 100) -> dict:
    """SGD (batch 128) and KFC-pre (batch 512) for the same wall-clock budget, evaluated every
    ``eval_examples`` training examples (evaluation time is not counted).  A rate given as
    None is chosen by :func:`sweep_rate` over ``rates`` at that method's batch size."""
    out = {"seconds": seconds, "methods": {}}
    for method, batch, lr in (("sgd", 128, lr_sgd), ("kfc-pre", 512, lr_kfc)):
        if lr is None:
            lr, rows = sweep_rate(base, method, batch, rates, sweep_iters)
            out.setdefault("sweeps", {})[method] = [dataclasses.asdict(r) for r in rows]
        cfg = dataclasses.replace(base, optimizer=method, batch_size=batch, lr=lr,
                                  iters=10**9, epochs=None, time_limit=seconds,
                                  eval_every=max(1, round(eval_examples / batch)),
                                  out=os.path.join(base.out, f"wallclock_{method}"))
        result = train(cfg)
        out["methods"][method] = {
            "batch_size": batch, "lr": lr,
            "curve": [(r["wall_seconds"], r["train_error"]) for r in result.metrics],
            "final_train_error": result.metrics[-1]["train_error"],
            "iterations": result.metrics[-1]["iteration"],
        }
    return out


def sud_training_runs(base: TrainConfig, archs=("cifar10", "cifar10-avg"), epochs: float = 50,
                      lr: float | None = None, rates=PAPER_RATES, sweep_iters: int = 200,
                      examples: int = 500) -> dict:
    """App. D.1's SUD setting: SGD (batch 128, the paper's momentum and averaging) for
    ``epochs`` on each architecture (max-pooled vs average-pooled), each at ``lr`` or at the
    best rate of a ``sweep_iters``-update sweep over ``rates``; then the SUD report
    (:func:`kfc_ref.experiments.sud_report.sud_report`) of each run on ``examples`` test
    images.  Runs in ``OUT/<arch>/train``, reports in ``OUT/<arch>/sud``."""
    from kfc_ref.experiments.sud_report import sud_report
    out = {"epochs": epochs, "runs": {}}
    for arch in archs:
        folder = os.path.join(base.out, arch)
        b = dataclasses.replace(base, arch=arch, optimizer="sgd", batch_size=128, out=folder)
        rows, rate = [], lr
        if rate is None:
            rate, rows = sweep_rate(b, "sgd", 128, rates, sweep_iters)
        cfg = dataclasses.replace(b, lr=rate, epochs=epochs, iters=None, time_limit=None,
                                  out=os.path.join(folder, "train"))
        result = train(cfg)
        summary = sud_report(cfg.out, os.path.join(folder, "sud"), examples=examples,
                             device=base.device)
        out["runs"][arch] = {"lr": rate, "sweep": [dataclasses.asdict(r) for r in rows],
                             "status": result.status, "last": result.metrics[-1],
                             "sud_layers": summary["layers"]}
    return out


#: The run folders each measurement leaves under OUT, with their labels in the figure.
RUN_FOLDERS = {"wallclock": (("wallclock_sgd", "sgd, batch 128"),
                             ("wallclock_kfc-pre", "kfc-pre, batch 512")),
               "iterations": (("sgd", "sgd"), ("kfc-pre", "kfc-pre"))}


def draw_curves(out: str, what: str) -> list[str]:
    """Figure 1 (wallclock) or 2 (iterations) from the runs' metrics.csv under ``out``:
    loss and error against seconds and iterations (``OUT/<what>.png`` and ``.pdf``)."""
    from kfc_ref.experiments.metrics import read_metrics
    from kfc_ref.experiments.plotting import plot_training_curves
    runs = {label: read_metrics(os.path.join(out, folder))
            for folder, label in RUN_FOLDERS[what]
            if os.path.exists(os.path.join(out, folder, "metrics.csv"))}
    if not runs:
        raise FileNotFoundError(f"no runs of {what!r} under {out!r}")
    title = {"wallclock": "KFC-pre vs SGD against wall-clock (Figure 1 setting)",
             "iterations": "KFC-pre vs SGD per update (Figure 2 setting)"}[what]
    return plot_training_curves(runs, title, out, what)


# --------------------------------------------------------------------------- presets
#: Single-thread process CPU seconds per step, measured on this project's 2-core CPU machine
#: (NumPy/OpenBLAS, float32, one BLAS thread, random data; KFC-pre amortised over 10 steps with
#: its default refresh periods).  Batch 4096 is scaled linearly from the measured sizes.
CPU_STEP_SECONDS = {("sgd", 128): 0.45, ("kfc-pre", 512): 3.0}
CPU_EVAL_SECONDS_PER_1000 = 3.5
#: GPU seconds per step: an *estimate* (no GPU was available when this was written): kernel
#: launches (~730 per SGD step, ~1,300 per KFC-pre step, counted by
#: benchmarks/count_launches_syncs.py) at ~15 us each, plus 74 MFLOP per example for forward
#: and backward at ~20 TFLOP/s effective float32, plus KFC-pre's amortised factor Grams and
#: inverses.  Measure with ``python -m kfc_ref bench optim --device gpu`` before relying on it.
GPU_STEP_SECONDS = {("sgd", 128): 0.012, ("kfc-pre", 512): 0.025, ("sgd", 4096): 0.026,
                    ("kfc-pre", 4096): 0.040}
GPU_EVAL_SECONDS_PER_1000 = 0.004
CIFAR_TRAIN, CIFAR_TEST, EVAL_TRAIN = 50_000, 10_000, 5_000


def step_seconds(device: str, method: str, batch: int) -> float:
    table = CPU_STEP_SECONDS if device == "cpu" else GPU_STEP_SECONDS
    if (method, batch) in table:
        return table[(method, batch)]
    base_batch = 128 if method == "sgd" else 512
    return table[(method, base_batch)] * batch / base_batch


def _eval_seconds(device: str) -> float:
    per = CPU_EVAL_SECONDS_PER_1000 if device == "cpu" else GPU_EVAL_SECONDS_PER_1000
    return per * (EVAL_TRAIN + CIFAR_TEST) / 1000


@dataclasses.dataclass(frozen=True)
class Preset:
    """A paper-setting run as one command: ``what`` (wallclock, iterations or sud) and the
    option values it sets (the user's explicit options still override them)."""

    what: str
    description: str
    options: dict

    def expected_seconds(self, device: str) -> float:
        o = self.options
        sweep = lambda method, batch: (len(PAPER_RATES) * o["sweep_iters"]    # noqa: E731
                                       * step_seconds(device, method, batch))
        if self.what == "wallclock":
            evals = sum(o["seconds"] / (step_seconds(device, m, b) * 5120 / b)
                        for m, b in (("sgd", 128), ("kfc-pre", 512)))
            return (sweep("sgd", 128) + sweep("kfc-pre", 512) + 2 * o["seconds"]
                    + evals * _eval_seconds(device))
        if self.what == "iterations":
            b = o["batch_size"]
            per = sum(step_seconds(device, m, b) for m in ("sgd", "kfc-pre"))
            evals = 2 * o["max_iters"] / o["eval_every"]
            return (sweep("sgd", b) + sweep("kfc-pre", b) + o["max_iters"] * per
                    + evals * _eval_seconds(device))
        steps = o["epochs"] * CIFAR_TRAIN / 128
        return 2 * (sweep("sgd", 128) + steps * step_seconds(device, "sgd", 128)
                    + 20 * _eval_seconds(device))


PRESETS = {
    "fig1-wallclock": Preset(
        "wallclock", "Figure 1 (CIFAR-10): training/test error against wall-clock, SGD at "
        "batch 128 vs KFC-pre at batch 512, each rate chosen on the paper's grid by a "
        "100-update sweep, one hour each, full training set, the paper's net",
        {"data": "cifar10", "arch": "cifar10", "max_train": None, "max_test": None,
         "seconds": 3600.0, "sweep_iters": 100, "lr_sgd": None, "lr_kfc": None}),
    "fig2-updates": Preset(
        "iterations", "Figure 2 (CIFAR-10): updates to 10% training error at batch 4,096 for "
        "both methods, rates from a 50-update sweep on the paper's grid, 8,000 updates each "
        "(the paper: 300 for KFC-pre vs 6,000 for SGD), full training set, the paper's net",
        {"data": "cifar10", "arch": "cifar10", "max_train": None, "max_test": None,
         "batch_size": 4096, "sweep_iters": 50, "max_iters": 8000, "eval_every": 50,
         "target": 0.10}),
    "sud-cifar10": Preset(
        "sud", "App. D.1 / Figures 3-4 (CIFAR-10): 50 epochs of SGD (batch 128, rate from a "
        "200-update sweep on the paper's grid) on the paper's net with a max-pooled first "
        "layer and on its average-pooled twin (cifar10-avg), then `sud` on 500 test images",
        {"data": "cifar10", "max_train": None, "max_test": None, "epochs": 50.0,
         "sweep_iters": 200, "examples": 500, "archs": ("cifar10", "cifar10-avg")}),
}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def presets_help() -> str:
    lines = ["presets (one command each; explicit options override the preset's values):"]
    for name, p in PRESETS.items():
        lines.append(f"  {name}: {p.description}.")
        lines.append(f"      expected time: CPU ~{_hours(p.expected_seconds('cpu'))} (from "
                     "single-thread per-step and evaluation times measured on a 2-core CPU), "
                     f"GPU ~{_hours(p.expected_seconds('gpu'))} (estimated, not measured)")
    lines.append("  e.g. python -m kfc_ref bench speedup --preset fig1-wallclock --data-dir DIR "
                 "--device gpu --out runs/fig1")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kfc_ref bench speedup",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=presets_help())
    p.add_argument("what", nargs="?", choices=("iterations", "wallclock", "sud"), default=None,
                   help="the measurement (implied by --preset)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None)
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096, help="iterations: both methods")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in PAPER_RATES))
    p.add_argument("--sweep-iters", type=int, default=50)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.10)
    p.add_argument("--lr-sgd", type=float, default=None,
                   help="iterations, wallclock: SGD rate (default: swept on --rates)")
    p.add_argument("--lr-kfc", type=float, default=None,
                   help="iterations, wallclock: KFC-pre rate (default: swept on --rates)")
    p.add_argument("--seconds", type=float, default=600.0, help="wallclock: budget per method")
    p.add_argument("--epochs", type=float, default=50.0, help="sud: SGD epochs per net")
    p.add_argument("--lr", type=float, default=None, help="sud: SGD rate (default: sweep)")
    p.add_argument("--examples", type=int, default=500, help="sud: test images analysed")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", action="store_true",
                   help="only draw OUT/<what>.png from the runs already in OUT (iterations, "
                        "wallclock)")
    p.add_argument("--out", required=True)
    return p


def parse_args(argv):
    """Parse ``argv``; a ``--preset`` sets its values as defaults (explicit options win)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.preset:
        preset = PRESETS[first.preset]
        parser.set_defaults(**{k: v for k, v in preset.options.items() if k != "archs"})
        args = parser.parse_args(argv)
        if args.what not in (None, preset.what):
            parser.error(f"--preset {first.preset} runs {preset.what!r}, not {args.what!r}")
        args.what, args.archs = preset.what, preset.options.get("archs")
        return args
    args = parser.parse_args(argv)
    if args.what is None:
        parser.error("give the measurement (iterations, wallclock or sud) or a --preset")
    args.archs = None
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    base = TrainConfig(data=args.data, data_dir=args.data_dir, arch=args.arch,
                       max_train=args.max_train, max_test=args.max_test,
                       batch_size=args.batch_size, eval_every=args.eval_every,
                       weight_decay=args.weight_decay, device=args.device, seed=args.seed,
                       out=args.out, quiet=True)
    rates = [float(r) for r in args.rates.split(",")]
    if args.plot_only:
        if args.what == "sud":
            print("error: --plot-only draws iterations or wallclock curves; sud runs have "
                  "their figures from the sud command", file=sys.stderr)
            return 2
        try:
            print("\n".join(draw_curves(args.out, args.what)))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.what == "iterations":
            result = iterations_to_target(base, rates, args.sweep_iters, args.max_iters,
                                          args.target, {"sgd": args.lr_sgd,
                                                        "kfc-pre": args.lr_kfc})
        elif args.what == "wallclock":
            result = wallclock_curves(base, args.lr_sgd, args.lr_kfc, args.seconds,
                                      rates=rates, sweep_iters=args.sweep_iters)
        else:
            result = sud_training_runs(dataclasses.replace(base, eval_every=None),
                                       args.archs or (args.arch or "cifar10",
                                                      f"{args.arch or 'cifar10'}-avg"),
                                       args.epochs, args.lr, rates, args.sweep_iters,
                                       args.examples)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["command"] = "python -m kfc_ref bench speedup " + " ".join(argv)
    if args.preset:
        result["preset"] = args.preset
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, f"summary_{args.what}.json"),
                      json.dumps(result, indent=2))
    if args.what in RUN_FOLDERS:
        draw_curves(args.out, args.what)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
