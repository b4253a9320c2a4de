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
from kfc_ref.experiments.sweep import lr_sweep
from kfc_ref.experiments.train import TrainConfig, train


def first_iteration_below(rows, target: float):
    """The first evaluated iteration whose training error is <= target (None if never)."""
    for r in rows:
        if r["train_error"] <= target:
            return int(r["iteration"])
    return None


def iterations_to_target(base: TrainConfig, rates=(0.3, 0.1, 0.03, 0.01),
                         sweep_iters: int = 50, max_iters: int = 1000,
                         target: float = 0.10) -> dict:
    """Sweep each method's rate on ``sweep_iters`` updates, then train ``max_iters`` updates
    at the best rate and count updates to ``target`` training error (averaged parameters)."""
    out = {"target": target, "batch_size": base.batch_size, "methods": {}}
    runs = {}
    for method in ("sgd", "kfc-pre"):
        sweep_cfg = dataclasses.replace(base, optimizer=method, iters=sweep_iters,
                                        epochs=None, eval_every=sweep_iters,
                                        out=os.path.join(base.out, f"sweep_{method}"))
        best_lr, rows = lr_sweep(sweep_cfg, rates)
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


def wallclock_curves(base: TrainConfig, lr_sgd: float, lr_kfc: float, seconds: float,
                     eval_examples: int = 5120) -> dict:
    """SGD (batch 128) and KFC-pre (batch 512) for the same wall-clock budget, evaluated every
    ``eval_examples`` training examples (evaluation time is not counted)."""
    out = {"seconds": seconds, "methods": {}}
    for method, batch, lr in (("sgd", 128, lr_sgd), ("kfc-pre", 512, lr_kfc)):
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kfc_ref bench speedup",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("iterations", "wallclock"))
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096, help="iterations: both methods")
    p.add_argument("--rates", default="0.3,0.1,0.03,0.01")
    p.add_argument("--sweep-iters", type=int, default=50)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.10)
    p.add_argument("--lr-sgd", type=float, default=0.03, help="wallclock: SGD rate")
    p.add_argument("--lr-kfc", type=float, default=0.03, help="wallclock: KFC-pre rate")
    p.add_argument("--seconds", type=float, default=600.0, help="wallclock: budget per method")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    base = TrainConfig(data=args.data, data_dir=args.data_dir, arch=args.arch,
                       max_train=args.max_train, max_test=args.max_test,
                       batch_size=args.batch_size, eval_every=args.eval_every,
                       device=args.device, seed=args.seed, out=args.out, quiet=True)
    try:
        if args.what == "iterations":
            rates = [float(r) for r in args.rates.split(",")]
            result = iterations_to_target(base, rates, args.sweep_iters, args.max_iters,
                                          args.target)
        else:
            result = wallclock_curves(base, args.lr_sgd, args.lr_kfc, args.seconds)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["command"] = "python -m kfc_ref bench speedup " + " ".join(argv or sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, f"summary_{args.what}.json"),
                      json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
