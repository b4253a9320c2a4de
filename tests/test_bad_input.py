"""Bad input at every public boundary: the API (loss, Fisher, optimizers, run settings), the
command line and the file readers (corrupt, truncated, wrong-layout and malicious files made
here).  Every case asserts the error's type and that its message names the argument or file;
command-line cases also assert one line on stderr, no traceback and exit code 2."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from kfc_ref.data import MinibatchStream, load_dataset
from kfc_ref.data import readers
from kfc_ref.experiments import figures, sweep, tour
from kfc_ref.experiments import train as train_mod
from kfc_ref.experiments.checkpoint import CheckpointError, load_checkpoint
from kfc_ref.experiments.config import TrainConfig
from kfc_ref.experiments.rundir import RunDirectoryError
from kfc_ref.curvature.fisher import empirical_fisher, per_example_gradients
from kfc_ref.nn.losses import classification_error, cross_entropy, softmax_cross_entropy
from kfc_ref.nn.models import tiny_convnet
from kfc_ref.optim import make_optimizer
from kfc_ref.validate import ArgumentError

pytestmark = pytest.mark.host_only(
    "argument validation at the API and CLI boundary happens on host values before "
    "any array is built")

TINY_RUN = dict(data="digits", max_train=64, max_test=32, batch_size=16, iters=2, eval_every=1,
                eval_examples=32, quiet=True, seed=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-iteration run (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("runs") / "base")
    train_mod.train(TrainConfig(out=out, **TINY_RUN))
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(run_dir, dst)
    return dst


@pytest.fixture(scope="module")
def tiny():
    net = tiny_convnet()
    params = net.init(0, "float64")
    x = np.random.default_rng(0).standard_normal((4, 1, 6, 6))
    return net, params, x


# --------------------------------------------------------------------------- API: labels
LOGITS = np.zeros((3, 10))


@pytest.mark.parametrize("func", [cross_entropy, softmax_cross_entropy, classification_error])
@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 10, 1]), "labels holds labels in [0, 10]"),          # == C
    (np.array([0, -1, 1]), "labels holds labels in [-1, 1]"),
    (np.array([0.0, 1.0, 2.0]), "labels must hold integer class indices"),
    (np.array(["0", "1", "2"]), "labels must hold integer class indices"),
    (np.array([0, 1]), "labels must have shape (N,) = (3,)"),
])
def test_loss_refuses_bad_labels(func, labels, needle):
    with pytest.raises(ArgumentError) as exc:
        func(LOGITS, labels)
    assert needle in str(exc.value)


def test_loss_refuses_an_empty_batch():
    with pytest.raises(ArgumentError, match="labels is empty"):
        cross_entropy(np.zeros((0, 10)), np.zeros(0, dtype=np.int64))


def test_fisher_refuses_bad_labels(tiny):
    net, params, x = tiny
    with pytest.raises(ArgumentError, match=r"y holds labels in \[0, 10\]"):
        per_example_gradients(net, params, x, np.array([0, 1, 2, 10]))
    with pytest.raises(ArgumentError, match="y must hold integer class indices"):
        empirical_fisher(net, params, x, np.zeros(4))


@pytest.mark.parametrize("name, options", [("sgd", {"lr": 0.1}), ("kfc-pre", {"lr": 0.01}),
                                           ("kfac", {})])
@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 1, 2, 10]), "labels holds labels in [0, 10]"),
    (np.array([0.0, 1.0, 2.0, 3.0]), "batch labels must hold integer class indices"),
    (np.array([0, 1]), "batch labels must have shape (N,) = (4,)"),
])
def test_optimizers_take_no_step_on_bad_labels(tiny, name, options, labels, needle):
    net, params, x = tiny
    opt = make_optimizer(name, **options)
    state = opt.init_state(net, params)
    with pytest.raises(ArgumentError) as exc:
        opt.step(state, net, params, (x, labels), np.random.default_rng(0))
    assert needle in str(exc.value)


def test_optimizer_refuses_an_empty_batch(tiny):
    net, params, x = tiny
    opt = make_optimizer("sgd", lr=0.1)
    with pytest.raises(ArgumentError, match="batch labels is empty"):
        opt.step(opt.init_state(net, params), net, params,
                 (x[:0], np.zeros(0, dtype=np.int64)), np.random.default_rng(0))


# --------------------------------------------------------------------------- API: settings
@pytest.mark.parametrize("field, value, needle", [
    ("batch_size", 0, "batch_size=0"),
    ("batch_size", 2.5, "batch_size=2.5"),
    ("lr", -1.0, "lr=-1.0"),
    ("lr", float("nan"), "lr=nan"),
    ("optimizer", "adam", "optimizer='adam'"),
    ("iters", True, "iters=True"),
    ("zca", "yes", "zca='yes'"),
    ("eval_examples", -1, "eval_examples=-1"),
    ("weight_decay", -0.1, "weight_decay=-0.1"),
    ("dtype", "float16", "dtype='float16'"),
])
def test_train_config_names_the_bad_setting(field, value, needle):
    with pytest.raises(ArgumentError) as exc:
        TrainConfig(**{field: value}).validate()
    assert needle in str(exc.value)


def test_numpy_scalars_are_accepted_where_numbers_are():
    cfg = TrainConfig(lr=np.float32(0.01), damping=np.float64(1e-3), batch_size=np.int64(32),
                      iters=np.int32(5), weight_decay=np.float32(0.0)).validate()
    assert type(cfg.lr) is float and type(cfg.batch_size) is int and cfg.iters == 5
    assert make_optimizer("kfc-pre", lr=np.float32(0.01), damping=np.float32(1e-3)).lr > 0


def test_stream_and_loader_name_their_argument():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        MinibatchStream(np.zeros((4, 1)), np.zeros(4, dtype=np.int64), 5)
    with pytest.raises(ValueError, match="max_train"):
        load_dataset("digits", max_train=0)


def test_new_run_into_a_non_empty_directory_is_refused(run_dir):
    with pytest.raises(RunDirectoryError) as exc:
        train_mod.train(TrainConfig(out=run_dir, **TINY_RUN))
    assert run_dir in str(exc.value) and "--resume" in str(exc.value) \
        and "--overwrite" in str(exc.value)


def test_out_naming_a_file_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        train_mod.train(TrainConfig(out=str(path), **TINY_RUN))


def test_resume_refuses_a_setting_that_may_not_change(run_copy):
    with pytest.raises(ArgumentError) as exc:
        train_mod.train(TrainConfig(out=run_copy, **{**TINY_RUN, "lr": 0.5}), resume=True)
    assert "lr=0.5" in str(exc.value) and "config.json" in str(exc.value)


# --------------------------------------------------------------------------- files: checkpoints
def _ckpt(run):
    return os.path.join(run, "checkpoint.npz")


def _evil_pickle(marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return pickle.dumps(Evil())


@pytest.mark.parametrize("make", [
    lambda good, tmp: b"",                                        # empty
    lambda good, tmp: good[: len(good) // 2],                     # truncated
    lambda good, tmp: np.random.default_rng(0).bytes(4096),       # random bytes
    lambda good, tmp: _evil_pickle(tmp / "pwned"),               # malicious pickle
], ids=["empty", "truncated", "random", "malicious-pickle"])
def test_unreadable_checkpoint_is_named(run_copy, tmp_path, make):
    path = _ckpt(run_copy)
    with open(path, "rb") as fh:
        good = fh.read()
    with open(path, "wb") as fh:
        fh.write(make(good, tmp_path))
    with pytest.raises(CheckpointError) as exc:
        train_mod.train(TrainConfig(out=run_copy, **TINY_RUN), resume=True)
    assert path in str(exc.value) and "start a new run" in str(exc.value)
    assert not (tmp_path / "pwned").exists()


def test_object_array_checkpoint_is_not_unpickled(tmp_path):
    path = str(tmp_path / "obj.npz")
    np.savez(path, theta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="obj.npz"):
        load_checkpoint(path)


def test_foreign_npz_is_refused(tmp_path):
    path = str(tmp_path / "foreign.npz")
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="foreign.npz.*no kfc_ref metadata"):
        load_checkpoint(path)


def test_checkpoint_of_another_run_is_refused(run_copy, tmp_path):
    other = str(tmp_path / "other")
    train_mod.train(TrainConfig(out=other, **{**TINY_RUN, "seed": 2}))
    shutil.copy(_ckpt(other), _ckpt(run_copy))
    with pytest.raises(CheckpointError) as exc:
        train_mod.train(TrainConfig(out=run_copy, **TINY_RUN), resume=True)
    assert "belongs to another run" in str(exc.value) and "seed=2" in str(exc.value)


# --------------------------------------------------------------------------- files: config.json
def _edit_config(run, edit):
    path = os.path.join(run, "config.json")
    with open(path) as fh:
        record = json.load(fh)
    edit(record)
    with open(path, "w") as fh:
        json.dump(record, fh)
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.update(colour="red"), "unknown setting(s) 'colour'"),
    (lambda r: r.pop("batch_size"), "missing setting(s) 'batch_size'"),
    (lambda r: r.update(batch_size="16"), "batch_size='16'"),
    (lambda r: r.pop("resumes"), "key 'resumes' is missing"),
    (lambda r: r.update(format="something else"), "not a kfc_ref run record"),
])
def test_config_file_problems_are_named(run_copy, edit, needle):
    path = _edit_config(run_copy, edit)
    with pytest.raises(ValueError) as exc:
        train_mod.train(TrainConfig(out=run_copy, **TINY_RUN), resume=True)
    assert path in str(exc.value) and needle in str(exc.value)


def test_broken_json_names_the_file(run_copy):
    path = os.path.join(run_copy, "config.json")
    with open(path, "a") as fh:
        fh.write("}{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        train_mod.train(TrainConfig(out=run_copy, **TINY_RUN), resume=True)


# --------------------------------------------------------------------------- files: datasets
def _cifar_bin(folder, records_per_file):
    folder.mkdir(parents=True)
    raw = bytes(readers.CIFAR10_RECORD_BYTES)
    for name in [*readers.CIFAR10_TRAIN_BATCHES, readers.CIFAR10_TEST_BATCH]:
        (folder / f"{name}.bin").write_bytes(raw * records_per_file.get(name, 3))


def test_cifar_bin_cut_at_a_record_boundary_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CIFAR10_EXPECTED_RECORDS",
                        {n: 3 for n in [*readers.CIFAR10_TRAIN_BATCHES,
                                        readers.CIFAR10_TEST_BATCH]})
    _cifar_bin(tmp_path / "cifar-10-batches-bin", {"data_batch_2": 2})
    with pytest.raises(ValueError, match=r"data_batch_2\.bin: holds 2 records, the official "
                                         r"file holds 3"):
        load_dataset("cifar10", tmp_path)


def test_official_cifar_count_is_required_by_default(tmp_path):
    _cifar_bin(tmp_path / "cifar-10-batches-bin", {})
    with pytest.raises(ValueError, match=r"data_batch_1\.bin: holds 3 records.*10000"):
        load_dataset("cifar10", tmp_path)


def test_cifar_py_batch_with_the_wrong_count_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="data_batch_1: holds 2 records"):
        readers.read_cifar10_py_batch(path, expected_records=10_000)


def test_cifar_py_wrong_layout_is_named(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_1: b'data' must be a uint8 array"):
        readers.read_cifar10_py_batch(path)


def test_svhn_with_the_wrong_count_is_refused(tmp_path):
    from scipy.io import savemat
    path = tmp_path / "train_32x32.mat"
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match="train_32x32.mat: holds 2 images, the official file "
                                         "holds 73257"):
        readers.read_svhn_mat(path, expected_records=73_257)


def test_truncated_svhn_mat_is_named(tmp_path):
    from scipy.io import savemat
    path = tmp_path / "test_32x32.mat"
    savemat(path, {"X": np.zeros((32, 32, 3, 20), np.uint8), "y": np.ones((20, 1))})
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ValueError, match="test_32x32.mat: not a readable MATLAB v5 SVHN file"):
        readers.read_svhn_mat(path)


# --------------------------------------------------------------------------- command line
def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], err


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "abc", "--out", "X"], "argument --batch-size: invalid int value: 'abc'"),
    (["--optimizer", "adam", "--out", "X"], "argument --optimizer: invalid choice: 'adam'"),
    (["--data", "digits"], "one of the arguments --out --resume is required"),
    (["--data", "digits", "--iters", "0", "--out", "X"], "iters=0 is not allowed"),
    (["--data", "digits", "--lr", "-1", "--out", "X"], "lr=-1.0 is not allowed"),
    (["--resume", "X/none"], "no such run directory"),
])
def test_train_cli_errors_are_one_line(tmp_path, capsys, argv, needle):
    argv = [a.replace("X", str(tmp_path)) for a in argv]
    _one_line_error(capsys, _exit_code(train_mod.main, argv), needle)


def test_train_cli_refuses_an_existing_run_and_a_changed_setting(run_copy, capsys):
    code = train_mod.main(["--data", "digits", "--out", run_copy])
    _one_line_error(capsys, code, "--resume")
    code = train_mod.main(["--resume", run_copy, "--seed", "7"])
    _one_line_error(capsys, code, "seed=7 differs from the run's recorded seed=1")
    code = train_mod.main(["--resume", run_copy, "--overwrite"])
    _one_line_error(capsys, code, "--overwrite cannot be combined with --resume")


def test_train_cli_names_a_corrupt_checkpoint(run_copy, capsys):
    with open(_ckpt(run_copy), "wb") as fh:
        fh.write(b"PK\x03\x04 broken")
    _one_line_error(capsys, train_mod.main(["--resume", run_copy]), _ckpt(run_copy))


@pytest.mark.parametrize("main, argv, needle", [
    (figures.main, ["--quick"], "the following arguments are required: --out"),
    (tour.main, ["--quick"], "the following arguments are required: --out"),
    (figures.main, ["--quick", "--out", "RUN"], "--overwrite"),
    (tour.main, ["--quick", "--out", "RUN"], "--overwrite"),
    (sweep.main, ["--rates", "a,b", "--out", "X"], "--rates must be comma-separated numbers"),
    (sweep.main, ["--out", "RUN"], "--overwrite"),
])
def test_other_commands_errors_are_one_line(run_dir, tmp_path, capsys, main, argv, needle):
    argv = [a.replace("RUN", run_dir).replace("X", str(tmp_path / "new")) for a in argv]
    _one_line_error(capsys, _exit_code(main, argv), needle)


def test_a_plain_npy_file_is_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        load_checkpoint(path)


def test_an_unwritable_run_directory_is_named(tmp_path, monkeypatch):
    from kfc_ref.experiments import rundir

    def refuse(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(rundir.os, "makedirs", refuse)
    out = str(tmp_path / "locked" / "run")
    with pytest.raises(RunDirectoryError) as exc:
        train_mod.train(TrainConfig(out=out, **TINY_RUN))
    assert out in str(exc.value) and "Permission denied (EACCES)" in str(exc.value)


def test_an_unknown_optimizer_option_in_config_json_is_named(run_copy, capsys):
    _edit_config(run_copy, lambda r: r.update(optimizer_options={"colour": 1}))
    _one_line_error(capsys, train_mod.main(["--resume", run_copy]),
                    "optimizer_options={'colour': 1} is not allowed for optimizer='sgd'")
