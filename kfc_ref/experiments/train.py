"""The training loop and the ``python -m kfc_ref train`` command.

One run = a dataset, an architecture, an optimizer (SGD, KFC-pre of App. B.1, K-FAC of
App. B.2) and a seed, in its own run directory ``--out DIR`` (created fresh; an existing
non-empty one is refused unless ``--overwrite``).  The directory holds, addressed relative to
itself so that it can be copied or moved and resumed where it is:

* ``config.json``: every resolved setting, versions and resumes (:mod:`.config`);
* ``metrics.csv``: one row per evaluation: iteration, examples seen, training seconds
  (evaluation excluded), train and test loss and error *of the averaged parameters* (App. B.1)
  on the evaluation subsets, then every entry of the optimizer's ``info`` of the last step
  (``batch_loss``; KFC-pre's nu, clipped, pi; K-FAC's lambda, gamma, rho, ...);
* ``checkpoint.npz``: parameters, optimizer state, stream position, random generator state and
  the metrics so far, replaced atomically after every evaluation.

Evaluation is cheap by default: the first :data:`~.config.EVAL_EXAMPLES` examples of each split,
every :func:`~.config.default_eval_every` iterations (under 15% of a run's time);
``--eval-examples 0`` evaluates the full sets, ``--eval-every`` sets the cadence.

``--resume DIR`` continues the run in DIR with its recorded settings; on CPU it reproduces the
uninterrupted run exactly (same batches, same sampled targets, same updates, each evaluation
logged once).  A NaN or exploding loss stops the run and keeps the last good checkpoint.
Ctrl-C or SIGTERM stops after the current iteration with log and checkpoint consistent (a
second one stops at once; the last checkpoint is intact).  With ``--device gpu`` the training
set is uploaded once and mini-batches are gathered on the device.

``--distributed`` (under ``mpiexec -n P``) trains data-parallel (Section 5.3;
:mod:`kfc_ref.optim.data_parallel`): every rank builds the same data stream and replica, works
on its 1/P of each mini-batch and sums gradients and statistics with the others; rank 0 alone
evaluates, logs, checkpoints and owns the run directory (the others only read it, on
``--resume``); stop decisions (time limit, Ctrl-C) are rank 0's, sent to all.  P ranks give the
parameters of one process to round-off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from kfc_ref.curvature.damping import NonFiniteCurvatureError
from kfc_ref.backend import namespace_for, to_numpy
from kfc_ref.comm import LocalComm, MPIComm
from kfc_ref.data import DeviceBatches, MinibatchStream, load_dataset, preprocess
from kfc_ref.experiments.checkpoint import (CHECKPOINT_NAME, CheckpointError, FileWriteError,
                                            load_checkpoint, save_checkpoint)
from kfc_ref.experiments.cli import fail
from kfc_ref.experiments.config import (
    CONFIG_NAME, DEFAULT_ARCH, DEFAULT_LR, RESUMABLE, SUD_EXAMPLES, TrainConfig,
    build_train_parser,
    config_from_args, new_run_record, read_run_record, reconcile, resolve, settings_of,
    write_run_record)
from kfc_ref.experiments.metrics import (  # noqa: F401  (read_metrics: part of a run's API)
    METRIC_COLUMNS, METRICS_NAME, format_metric, info_columns, read_metrics,
    write_metrics)
from kfc_ref.experiments.progress import Progress
from kfc_ref.experiments.sud_history import record_sud_history
from kfc_ref.experiments.rundir import RUN_FILES, check_new_output, make_output
from kfc_ref.nn.losses import classification_error, cross_entropy
from kfc_ref.nn.models import build_model
from kfc_ref.optim import make_optimizer, state_from_numpy, state_to_numpy
from kfc_ref.optim.base import host_value
from kfc_ref.validate import ArgumentError

#: A loss above this multiple of the first mini-batch loss (or above EXPLODE_ABSOLUTE) counts as
#: exploding: far beyond any loss a working run reaches, well before float overflow.
EXPLODE_FACTOR = 20.0
EXPLODE_ABSOLUTE = 1e4


class TrainingStopped(RuntimeError):
    """Raised when the loss became NaN or exploded; the last good checkpoint is kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; log and checkpoint are consistent."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class TrainResult:
    out_dir: str
    metrics: list
    net: object
    params: list
    dataset: object
    status: str
    rank: int = 0              # the data-parallel rank that returned it (0 logs and writes)


@dataclass
class Setup:
    """What a run computes with, built once from its (resolved) config."""

    cfg: TrainConfig
    data: object
    net: object
    stream: MinibatchStream
    batches: DeviceBatches
    opt: object
    eval_sets: dict            # 'train' / 'test' -> (x, y) device arrays
    data_sizes: dict
    comm: object = dataclasses.field(default_factory=LocalComm)   # the data-parallel ranks

    @property
    def root(self) -> bool:
        """Whether this process evaluates and writes (rank 0; the only one without MPI)."""
        return self.comm.rank == 0


@dataclass
class RunState:
    """What changes as a run proceeds; exactly what the checkpoint holds."""

    params: list
    state: object
    rng: np.random.Generator
    k: int = 0
    rows: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0           # training seconds (evaluation excluded)
    first_loss: float | None = None
    info: dict = dataclasses.field(default_factory=dict)   # the last step's


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
    try:
        return make_optimizer(cfg.optimizer, **options)
    except TypeError as exc:                         # an unknown keyword in optimizer_options
        raise ArgumentError(f"optimizer_options={cfg.optimizer_options!r} is not allowed for "
                            f"optimizer={cfg.optimizer!r}: {exc}") from None


def evaluate(net, params, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and classification error of ``params`` on (x, y) (device arrays)."""
    logits = net.predict_logits(params, x, batch_size)
    return float(cross_entropy(logits, y).mean()), classification_error(logits, y)


# --------------------------------------------------------------------------- setting up
def open_communicator(cfg: TrainConfig):
    """The ranks of this run: an :class:`~kfc_ref.comm.MPIComm` with ``cfg.distributed``
    (which also picks each rank's GPU), else one process."""
    return MPIComm(device=cfg.device) if cfg.distributed else LocalComm()


def set_up(cfg: TrainConfig, comm=None) -> Setup:
    """Load the data, build net, stream and optimizer (data-parallel over ``comm``); resolve
    the config's defaults."""
    comm = LocalComm() if comm is None else comm
    xp = namespace_for(cfg.device)
    data = preprocess(load_dataset(cfg.data, cfg.data_dir, seed=cfg.seed,
                                   max_train=cfg.max_train, max_test=cfg.max_test), zca=cfg.zca)
    net = build_model(cfg.arch or DEFAULT_ARCH[cfg.data], data.image_shape, data.num_classes)
    stream = MinibatchStream(data.x_train, data.y_train, cfg.batch_size, seed=cfg.seed)
    opt = build_optimizer(cfg, stream.steps_per_epoch).set_communicator(comm)
    n = cfg.eval_examples or None
    # Inputs in the run's dtype, so a float64 run computes in float64 from the first layer on.
    eval_sets = {split: (xp.asarray(getattr(data, f"x_{split}")[:n].astype(cfg.dtype,
                                                                          copy=False)),
                         xp.asarray(getattr(data, f"y_{split}")[:n]))
                 for split in ("train", "test")}
    sizes = {"train": len(data.y_train), "test": len(data.y_test),
             "eval_train": len(eval_sets["train"][1]), "eval_test": len(eval_sets["test"][1])}
    cfg = resolve(cfg, stream.steps_per_epoch, sizes["eval_train"] + sizes["eval_test"], opt)
    batches = DeviceBatches(data.x_train.astype(cfg.dtype, copy=False), data.y_train, xp)
    return Setup(cfg, data, net, stream, batches, opt, eval_sets, sizes, comm)


def fresh_state(setup: Setup) -> RunState:
    """Initial parameters and optimizer state; the Kronecker-factored optimizers average their
    first factors over ``opt.factor_init_batches`` mini-batches of a separate stream (Algorithm 1;
    KFC-pre 5, K-FAC and SGD none)."""
    cfg, net, opt = setup.cfg, setup.net, setup.opt
    params = net.init(cfg.seed, cfg.dtype, cfg.device)
    state = opt.init_state(net, params)
    rng = np.random.default_rng([cfg.seed, 1])
    if opt.factor_init_batches:
        init_stream = MinibatchStream(setup.data.x_train, setup.data.y_train, cfg.batch_size,
                                      seed=cfg.seed + 10_000)
        batches = [setup.batches.gather(init_stream.next_indices())[0] for _ in
                   range(min(opt.factor_init_batches, init_stream.steps_per_epoch))]
        state = opt.initialize_factors(state, net, params, batches, rng)
    return RunState(params, state, rng)


# --------------------------------------------------------------------------- checkpoint
def save_run_state(path: str, setup: Setup, run: RunState) -> None:
    """Write the checkpoint of ``run`` (atomic; the previous one stays until it is complete)."""
    arrays = {"theta": to_numpy(setup.net.flatten(run.params))}
    arrays.update({f"state/{n}": v for n, v in state_to_numpy(run.state).items()})
    arrays.update({f"stream/{n}": np.asarray(v) for n, v in setup.stream.state_dict().items()})
    meta = {"config": settings_of(setup.cfg), "iteration": run.k, "metrics": run.rows,
            "wall_seconds": run.elapsed, "rng_state": run.rng.bit_generator.state,
            "first_loss": run.first_loss,
            "info": {key: host_value(value) for key, value in run.info.items()}}
    save_checkpoint(path, arrays, meta)


def checkpoint_state(arrays, device: str):
    """The optimizer state stored under ``state/`` in a checkpoint's arrays, on ``device``."""
    return state_from_numpy({k[len("state/"):]: v for k, v in arrays.items()
                             if k.startswith("state/")}, device)


def load_run_state(path: str, setup: Setup) -> RunState:
    """The RunState of the checkpoint at ``path``, checked to belong to this run."""
    arrays, meta = load_checkpoint(path, required=("theta",))
    theirs = meta.get("config", {})
    mine = settings_of(setup.cfg)
    foreign = [n for n in mine if n not in RESUMABLE and theirs.get(n) != mine[n]]
    if foreign:
        raise CheckpointError(f"checkpoint {path} belongs to another run: its "
                              f"{', '.join(f'{n}={theirs.get(n)!r}' for n in foreign)} differ "
                              f"from {CONFIG_NAME}; restore the matching files or start a new run")
    try:
        params = setup.net.unflatten(namespace_for(setup.cfg.device).asarray(arrays["theta"]))
        state = checkpoint_state(arrays, setup.cfg.device)
        setup.stream.load_state_dict({k[7:]: v for k, v in arrays.items()
                                      if k.startswith("stream/")})
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng_state"]
        return RunState(params, state, rng, int(meta["iteration"]), list(meta["metrics"]),
                        float(meta["wall_seconds"]), meta["first_loss"], dict(meta["info"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: "
                              f"{exc}); restore the run directory from a copy or start a new "
                              "run") from None


# --------------------------------------------------------------------------- the loop
class _StopRequest:
    """Set by the first SIGINT/SIGTERM; the loop stops at the next iteration boundary."""

    signum = None


@contextlib.contextmanager
def _deferred_signals():
    """SIGINT and SIGTERM ask the loop to stop cleanly; a second one interrupts at once."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise RunInterrupted(signum)
        stop.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration (send it again "
              "to stop at once; the last checkpoint stays intact)", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _check_loss(run: RunState, path: str) -> None:
    """Stop on a NaN/inf or exploding mini-batch loss (read from the device here)."""
    loss = host_value(run.info.get("loss"))
    if loss is None:
        return
    run.first_loss = loss if run.first_loss is None else run.first_loss
    if not math.isfinite(loss) or loss > min(EXPLODE_FACTOR * run.first_loss, EXPLODE_ABSOLUTE):
        last = run.rows[-1]["iteration"] if run.rows else "none yet"
        raise TrainingStopped(
            f"loss {loss!r} at iteration {run.k} is NaN/inf or exploding (first loss "
            f"{run.first_loss:.4g}); stopped. The last good checkpoint (iteration {last}) is "
            f"kept in {path}; try a smaller --lr")


def _step(setup: Setup, run: RunState) -> None:
    """One optimizer step; an exception inside it leaves ``run`` and the stream untouched."""
    before = (setup.stream.state_dict(), run.rng.bit_generator.state)
    try:
        xb, yb = setup.batches.gather(setup.stream.next_indices())
        t0 = time.perf_counter()
        params, state, info = setup.opt.step(run.state, setup.net, run.params, (xb, yb), run.rng)
    except BaseException as exc:
        setup.stream.load_state_dict(before[0])
        run.rng.bit_generator.state = before[1]
        if isinstance(exc, NonFiniteCurvatureError):      # diverged statistics: a divergence
            raise TrainingStopped(f"{exc} at iteration {run.k + 1}; stopped. The last good "
                                  "checkpoint is kept; try a smaller --lr") from None
        raise
    run.params, run.state, run.info, run.k = params, state, info, run.k + 1
    if run.first_loss is None:        # the reference for 'exploding': one host read, once a run
        run.first_loss = host_value(info.get("loss"))
    run.elapsed += time.perf_counter() - t0


def _evaluate(setup: Setup, run: RunState) -> dict:
    avg = setup.opt.averaged_params(setup.net, run.state)
    row = {"iteration": run.k, "examples_seen": run.k * setup.cfg.batch_size,
           "wall_seconds": run.elapsed}
    for split, (x, y) in setup.eval_sets.items():
        row[f"{split}_loss"], row[f"{split}_error"] = evaluate(setup.net, avg, x, y)
    row.update(info_columns(run.info))
    return row


def _record_sud(setup: Setup, run: RunState, run_dir: str) -> None:
    """Append the SUD summary of the averaged parameters on the first SUD_EXAMPLES evaluation
    test images (targets sampled with a generator keyed by seed and iteration, so a resumed run
    records the same line) -- before the checkpoint, so a kill in between re-records it."""
    x = setup.eval_sets["test"][0][:SUD_EXAMPLES]
    record_sud_history(run_dir, run.k, setup.net, setup.opt.averaged_params(setup.net, run.state),
                       x, np.random.default_rng([setup.cfg.seed, 2, run.k]))


def _save(setup: Setup, run: RunState, run_dir: str) -> None:
    """Checkpoint first, then metrics.csv (which a resume rewrites from the checkpoint)."""
    save_run_state(os.path.join(run_dir, CHECKPOINT_NAME), setup, run)
    write_metrics(os.path.join(run_dir, METRICS_NAME), run.rows)


def _run_loop(setup: Setup, run: RunState, run_dir: str, stop, progress: Progress) -> str:
    cfg, total = setup.cfg, setup.cfg.iters
    ckpt = os.path.join(run_dir, CHECKPOINT_NAME)
    comm = setup.comm
    while True:
        timed_out = cfg.time_limit is not None and run.elapsed >= cfg.time_limit
        signum = stop.signum
        if comm.size > 1:                # rank 0's clock and signals decide for all ranks
            timed_out, signum = comm.agree((timed_out, signum))
        due = run.k > 0 and (run.k % cfg.eval_every == 0 or run.k >= total or timed_out)
        if due and setup.root and (not run.rows or run.rows[-1]["iteration"] != run.k):
            _check_loss(run, ckpt)
            row = _evaluate(setup, run)
            if not math.isfinite(row["train_loss"]):
                raise TrainingStopped(f"the averaged parameters give a training loss of "
                                      f"{row['train_loss']} at iteration {run.k}; stopped. The "
                                      f"last good checkpoint is kept in {ckpt}; try a smaller --lr")
            run.rows.append(row)
            if cfg.sud_every and len(run.rows) % cfg.sud_every == 0:
                _record_sud(setup, run, run_dir)
            _save(setup, run, run_dir)
            progress.update(run.k, run.k * cfg.batch_size, run.elapsed,
                            host_value(run.info.get("loss", math.nan)),
                            run.rows[-1]["test_error"], force=True)
        if timed_out or run.k >= total:
            return "time_limit" if timed_out and run.k < total else "finished"
        if signum is not None:
            raise RunInterrupted(signum)
        _step(setup, run)
        if isinstance(run.info.get("loss"), float) or progress.wants_loss(run.k):
            _check_loss(run, ckpt)                   # host floats: every step, for free
        progress.update(run.k, run.k * cfg.batch_size, run.elapsed,
                        lambda: host_value(run.info["loss"]))


def _root_only(comm, work):
    """``work()`` on rank 0; its error (if any) raised on every rank, so none waits forever."""
    error = None
    if comm.rank == 0:
        try:
            work()
        except Exception as exc:           # sent to the other ranks, then raised here
            error = exc
    message = comm.agree(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 stopped the run: {message}")


def _open_run(cfg: TrainConfig, resume: bool, overwrite: bool,
              comm=None) -> tuple[Setup, RunState]:
    """Validate, set up and either start the run directory or restore its checkpoint.  Nothing
    in the directory changes before the arguments and the data are checked; only rank 0
    writes (the other data-parallel ranks read the record and the checkpoint)."""
    comm = LocalComm() if comm is None else comm
    cfg = dataclasses.replace(cfg).validate()
    run_dir = os.fspath(cfg.out)
    changed = record = None
    if resume:
        record = read_run_record(run_dir)
        cfg, changed = reconcile(record, cfg, run_dir)
    else:
        _root_only(comm, lambda: check_new_output(run_dir, overwrite=overwrite))
    setup = set_up(cfg, comm)
    ckpt, metrics = (os.path.join(run_dir, name) for name in (CHECKPOINT_NAME, METRICS_NAME))
    if not resume:
        def start():
            make_output(run_dir, overwrite=overwrite, owned=RUN_FILES)
            write_run_record(run_dir, new_run_record(setup.cfg, setup.opt, setup.data_sizes))
        _root_only(comm, start)
        return setup, fresh_state(setup)
    if os.path.exists(ckpt):
        run = load_run_state(ckpt, setup)
    elif os.path.exists(metrics):
        raise FileNotFoundError(f"--resume {run_dir}: {metrics} exists but {ckpt} is missing; "
                                "restore the checkpoint or start a new run")
    else:                                            # stopped before its first checkpoint
        run = fresh_state(setup)

    def tidy():
        for name in os.listdir(run_dir):             # half-written files of a killed run
            if name.startswith(".tmp-"):
                os.remove(os.path.join(run_dir, name))
        if changed:
            record["resumes"].append({"at_iteration": run.k, "changed": changed})
            record.update(settings_of(setup.cfg))
            write_run_record(run_dir, record)
        write_metrics(metrics, run.rows)             # the log matches the checkpoint
    _root_only(comm, tidy)
    return setup, run


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or, with ``resume=True``, continue) the training described by ``cfg`` in the run
    directory ``cfg.out`` (module doc).  ``overwrite`` reuses a non-empty directory."""
    comm = open_communicator(dataclasses.replace(cfg).validate())
    setup, run = _open_run(cfg, resume, overwrite, comm)
    run_dir = os.fspath(cfg.out)
    progress = Progress(setup.cfg.iters, run.k, setup.cfg.quiet or not setup.root)
    try:
        with _deferred_signals() as stop:
            status = _run_loop(setup, run, run_dir, stop, progress)
    except KeyboardInterrupt:
        # At an iteration boundary, inside a step (which rewound itself) or inside an
        # evaluation: the state at k is consistent; a pending evaluation at k is done on resume.
        # A diverged state is never saved (TrainingStopped instead).
        progress.close()
        _check_loss(run, os.path.join(run_dir, CHECKPOINT_NAME))
        if setup.root:
            _save(setup, run, run_dir)
        raise
    finally:
        progress.close()
    return TrainResult(run_dir, run.rows, setup.net,
                       setup.opt.averaged_params(setup.net, run.state), setup.data, status,
                       setup.comm.rank)


# --------------------------------------------------------------------------- CLI
build_parser = build_train_parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, resume = config_from_args(args)
        result = train(cfg, resume=resume, overwrite=bool(args.overwrite))
    except (TrainingStopped, FileWriteError) as exc:
        return fail(exc, 1)
    except KeyboardInterrupt as exc:                 # RunInterrupted carries SIGINT/SIGTERM
        signum = getattr(exc, "signum", signal.SIGINT)
        where = args.resume or args.out
        print(f"stopped by {signal.Signals(signum).name}; log and checkpoint are consistent in "
              f"{where} (continue with --resume {where})", file=sys.stderr)
        return 128 + signum
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        return fail(exc)
    if result.rank != 0:
        return 0
    last = result.metrics[-1] if result.metrics else {}
    print(f"{result.status}: {len(result.metrics)} evaluations in {result.out_dir}; last: "
          + ", ".join(f"{k}={format_metric(last.get(k))}" for k in
                      ("iteration", "train_loss", "train_error", "test_error")))
    return 0
