"""Learning-rate sweep (``python -m kfc_ref sweep``): the paper tuned every method over
{0.3, 0.1, 0.03, ..., 0.0003} on *training* error (Section 5), so comparisons are between tuned
methods.  Each rate is one run of :func:`kfc_ref.experiments.train.train` in ``OUT/lr_<rate>``;
a run that diverges scores +inf.  ``OUT/sweep.csv`` lists every rate; the best is printed.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os

from kfc_ref.data import DATASET_NAMES
from kfc_ref.experiments.checkpoint import FileWriteError, atomic_write_text
from kfc_ref.experiments.cli import CommandParser, add_output_arguments, fail
from kfc_ref.experiments.rundir import check_new_output
from kfc_ref.experiments.train import TrainConfig, TrainingStopped, train
from kfc_ref.nn.models import ARCHITECTURES

PAPER_RATES = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)


@dataclasses.dataclass
class SweepRow:
    lr: float
    train_error: float
    train_loss: float
    status: str


def lr_sweep(base: TrainConfig, rates=PAPER_RATES, *,
             overwrite: bool = False) -> tuple[float, list[SweepRow]]:
    """Run ``base`` once per rate; return (best rate, rows).  Best = lowest final training
    error of the averaged parameters, ties broken by training loss.  ``base.out`` must be new
    or empty (``overwrite`` reuses it, replacing each rate's run)."""
    if base.optimizer == "kfac":
        raise ValueError("optimizer='kfac' has no learning rate to sweep (App. B.2 chooses it)")
    if not rates:
        raise ValueError("rates must list at least one learning rate")
    check_new_output(base.out, overwrite=overwrite, what="sweep directory", resume_hint=False)
    rows = []
    for lr in rates:
        # Only the final evaluation is scored, so evaluate once at the end unless told otherwise.
        cfg = dataclasses.replace(base, lr=float(lr), out=os.path.join(base.out, f"lr_{lr:g}"),
                                  eval_every=base.eval_every or base.iters or 10**9)
        try:
            result = train(cfg, overwrite=overwrite)
            last = result.metrics[-1]
            rows.append(SweepRow(lr, last["train_error"], last["train_loss"], result.status))
        except TrainingStopped:
            rows.append(SweepRow(lr, math.inf, math.inf, "diverged"))
    best = min(rows, key=lambda r: (r.train_error, r.train_loss))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["lr", "train_error", "train_loss", "status", "best"])
    for r in rows:
        writer.writerow([f"{r.lr:g}", r.train_error, r.train_loss, r.status, int(r is best)])
    atomic_write_text(os.path.join(base.out, "sweep.csv"), buf.getvalue())
    return best.lr, rows


def main(argv=None) -> int:
    p = CommandParser(prog="python -m kfc_ref sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=("sgd", "kfc-pre"), default="sgd")
    p.add_argument("--data", choices=DATASET_NAMES, default="mnist5k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", choices=ARCHITECTURES, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--iters", type=int, default=None)
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in PAPER_RATES),
                   help="comma-separated learning rates (default: the paper's grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    add_output_arguments(p, "sweep directory (one run per rate and sweep.csv)")
    args = p.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
    base = TrainConfig(optimizer=args.optimizer, data=args.data, data_dir=args.data_dir,
                       arch=args.arch, batch_size=args.batch_size, epochs=args.epochs,
                       iters=args.iters, seed=args.seed, device=args.device,
                       max_train=args.max_train, max_test=args.max_test, out=args.out,
                       quiet=True)
    try:
        best, rows = lr_sweep(base, rates, overwrite=args.overwrite)
    except FileWriteError as exc:
        return fail(exc, 1)
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        return fail(exc)
    for r in rows:
        mark = "  <- best" if r.lr == best else ""
        print(f"lr {r.lr:<8g} train error {r.train_error:.4f}  loss {r.train_loss:.4f}  "
              f"{r.status}{mark}")
    print(f"best learning rate: {best:g} (table in {os.path.join(args.out, 'sweep.csv')})")
    return 0
