"""Runs you can trust: a run killed with SIGKILL anywhere (inside a step, inside a checkpoint
write) and resumed ends identical to an uninterrupted run; a copied run directory resumes where
it is and leaves the original untouched; a full disk loses nothing good; SIGTERM stops like
Ctrl-C; config.json records the resolved settings and every resume; files follow the umask;
progress is readable in a log file; the training set stays on the device.

Every run trains on the --xp device (``module_device``: one patch for the module, so the tests
that undo their own monkeypatches mid-test keep it)."""
import errno
import hashlib
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest
from guarded_xp import GuardedArray, counting, guarded

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.data import DeviceBatches, MinibatchStream
from kfc_ref.experiments import checkpoint
from kfc_ref.experiments import train as train_mod
from kfc_ref.experiments.checkpoint import FileWriteError, load_checkpoint
from kfc_ref.experiments.config import (EVAL_EXAMPLES, TRAIN_PER_EVAL_EXAMPLE, TrainConfig,
                                        default_eval_every)
from kfc_ref.experiments.progress import Progress
from kfc_ref.experiments.train import RunInterrupted, read_metrics, train

RUN = dict(optimizer="kfc-pre", lr=0.01, data="digits", max_train=128, max_test=32,
           eval_examples=32, batch_size=16, iters=12, eval_every=3, quiet=True, seed=5)


def _cfg(out, **kw):
    return TrainConfig(out=str(out), **{**RUN, **kw})


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


def _final(out):
    arrays, meta = load_checkpoint(os.path.join(out, "checkpoint.npz"))
    return arrays, meta, read_metrics(str(out))


@pytest.fixture(scope="module")
def dev_cfg(module_device):
    """``_cfg`` on the --xp device."""
    def make(out, **kw):
        return _cfg(out, device=module_device, **kw)
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dev_cfg):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(dev_cfg(out))
    return _final(out)


def _assert_identical(out, reference):
    arrays, meta, rows = _final(out)
    ref_arrays, ref_meta, ref_rows = reference
    assert set(arrays) == set(ref_arrays)
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], ref_arrays[key], err_msg=key)
    assert _strip_time(rows) == _strip_time(ref_rows)
    iterations = [int(r["iteration"]) for r in rows]
    assert iterations == [3, 6, 9, 12]                    # each evaluation exactly once
    assert _strip_time(meta["metrics"]) == _strip_time(ref_meta["metrics"])


# --------------------------------------------------------------------------- SIGKILL
def _killed_child(action):
    """Run ``action`` in a forked child that is expected to SIGKILL itself."""
    pid = os.fork()
    if pid == 0:                                          # child: never returns to pytest
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _kill_at_step(n):
    real, calls = train_mod._step, [0]

    def step(setup, run):
        calls[0] += 1
        if calls[0] == n:
            real(setup, run) if n % 2 else None           # after or before the update
            os.kill(os.getpid(), signal.SIGKILL)
        real(setup, run)
    train_mod._step = step


def _kill_in_checkpoint_write(n):
    real, calls = checkpoint._write_and_sync, [0]

    def write(fh, data):
        if data[:2] == b"PK":
            calls[0] += 1
            if calls[0] == n:
                fh.write(data[: len(data) // 2])          # a half-written temporary file
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(fh, data)
    checkpoint._write_and_sync = write


def test_sigkill_anywhere_then_resume_equals_the_uninterrupted_run(tmp_path, reference,
                                                                   dev_cfg):
    rng = np.random.default_rng(20261203)                 # the "random" kill points, reproducible
    out = tmp_path / "run"
    kills = [("step", int(rng.integers(1, 3))),           # before the first checkpoint
             ("write", int(rng.integers(1, 3))),          # inside a checkpoint write
             ("step", int(rng.integers(1, 5))),
             ("write", 1)]
    for i, (where, n) in enumerate(kills):
        def action(where=where, n=n, first=(i == 0)):
            (_kill_at_step if where == "step" else _kill_in_checkpoint_write)(n)
            train(dev_cfg(out), resume=not first)
        _killed_child(action)
    train(dev_cfg(out), resume=True)
    _assert_identical(out, reference)
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.csv"]


# --------------------------------------------------------------------------- copies
def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_a_copied_run_resumes_where_it_is(tmp_path, reference, dev_cfg):
    original = tmp_path / "original"
    train(dev_cfg(original, iters=6))
    before = _digest(original)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    assert train_mod.main(["--resume", str(copy), "--iters", "12", "--quiet"]) == 0
    assert _digest(original) == before                    # untouched
    _assert_identical(copy, reference)
    record = json.loads((copy / "config.json").read_text())
    assert record["iters"] == 12
    assert record["resumes"] == [{"at_iteration": 6, "changed": {"iters": [6, 12]}}]


def test_a_moved_run_resumes_and_leaves_no_stray_directory(tmp_path, monkeypatch, dev_cfg):
    first = tmp_path / "first"
    train(dev_cfg(first, iters=3))
    moved = tmp_path / "moved"
    os.rename(first, moved)
    monkeypatch.chdir(tmp_path)
    train(dev_cfg(moved, iters=6), resume=True)
    assert not first.exists() and len(read_metrics(str(moved))) == 2


# --------------------------------------------------------------------------- disk full
def test_disk_full_gives_a_clear_error_and_keeps_the_last_good_state(tmp_path, monkeypatch,
                                                                     reference, dev_cfg):
    out = tmp_path / "run"
    real, calls = checkpoint._write_and_sync, [0]

    def write(fh, data):
        if data[:2] == b"PK":
            calls[0] += 1
            if calls[0] == 2:
                fh.write(data[:100])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fh, data)
    monkeypatch.setattr(checkpoint, "_write_and_sync", write)
    with pytest.raises(FileWriteError) as exc:
        train(dev_cfg(out))
    message = str(exc.value)
    assert "checkpoint.npz" in message and "No space left on device (ENOSPC)" in message
    monkeypatch.undo()
    _, meta, rows = _final(out)
    assert meta["iteration"] == 3 and [r["iteration"] for r in rows] == [3.0]
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.csv"]
    train(dev_cfg(out), resume=True)                      # space freed: the run completes
    _assert_identical(out, reference)


def test_disk_full_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys,
                                                   module_device):
    def full(fh, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "_write_and_sync", full)
    code = train_mod.main(["--data", "digits", "--max-train", "64", "--batch-size", "16",
                           "--iters", "1", "--quiet", "--out", str(tmp_path / "run"),
                           "--device", module_device])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "ENOSPC" in err


# --------------------------------------------------------------------------- signals
def _signal_at_step(monkeypatch, n, signum):
    real, calls = train_mod._step, [0]

    def step(setup, run):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)              # arrives mid-iteration
        real(setup, run)
    monkeypatch.setattr(train_mod, "_step", step)


def test_sigterm_stops_at_a_clean_point_like_ctrl_c(tmp_path, monkeypatch, reference, dev_cfg):
    out = tmp_path / "run"
    _signal_at_step(monkeypatch, 4, signal.SIGTERM)
    with pytest.raises(RunInterrupted) as exc:
        train(dev_cfg(out))
    assert exc.value.signum == signal.SIGTERM
    monkeypatch.undo()
    _, meta, rows = _final(out)
    assert meta["iteration"] == 4 and [r["iteration"] for r in rows] == [3.0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored
    train(dev_cfg(out), resume=True)
    _assert_identical(out, reference)


def test_sigterm_on_the_command_line(tmp_path, monkeypatch, capsys, module_device):
    _signal_at_step(monkeypatch, 2, signal.SIGTERM)
    out = str(tmp_path / "run")
    code = train_mod.main(["--data", "digits", "--max-train", "64", "--batch-size", "16",
                           "--iters", "5", "--quiet", "--out", out, "--device", module_device])
    assert code == 128 + signal.SIGTERM
    assert f"--resume {out}" in capsys.readouterr().err


# --------------------------------------------------------------------------- the record
def test_config_records_resolved_settings_and_versions(tmp_path, module_device):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data="digits", max_train=64, max_test=32, epochs=0.5,
                      quiet=True, batch_size=16, device=module_device))
    record = json.loads((out / "config.json").read_text())
    s = record
    assert s["arch"] == "small" and s["lr"] == train_mod.DEFAULT_LR["sgd"]
    assert s["iters"] == 2 and s["epochs"] is None and s["eval_every"] >= 1
    assert s["eval_examples"] == EVAL_EXAMPLES and "out" not in s
    assert record["software"]["kfc_ref"] and "git_commit" in record["software"]
    assert record["optimizer_hyperparameters"]["momentum"] == 0.9


def test_files_follow_the_umask(tmp_path, dev_cfg):
    old = os.umask(0o027)
    try:
        train(dev_cfg(tmp_path / "run", iters=3))
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.csv", "checkpoint.npz"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o640, name


def test_every_optimizer_info_key_is_logged(tmp_path, module_device):
    result = train(TrainConfig(out=str(tmp_path / "kfac"), optimizer="kfac", data="digits",
                               max_train=64, max_test=32, batch_size=16, iters=2, quiet=True,
                               device=module_device))
    row = read_metrics(result.out_dir)[-1]
    for key in ("batch_loss", "lambda", "gamma", "rho", "alpha", "mu", "model_change"):
        assert key in row, key


# --------------------------------------------------------------------------- progress
@pytest.mark.host_only("evaluation schedule arithmetic, no arrays")
def test_default_evaluation_is_cheap():
    for total, batch in ((60, 128), (20, 32), (1000, 128), (5, 512)):
        every = default_eval_every(total, batch, 2 * EVAL_EXAMPLES)
        evaluations = total // every + (total % every != 0)
        assert evaluations <= 20
        if evaluations > 1:      # trained examples per evaluated example
            assert total * batch / (evaluations * 2 * EVAL_EXAMPLES) >= TRAIN_PER_EVAL_EXAMPLE * (
                1 - 1 / evaluations)


@pytest.mark.host_only("progress text from host numbers")
def test_progress_in_a_log_file_is_plain_lines():
    log = io.StringIO()
    progress = Progress(total=100, start=0, quiet=False, stream=log)
    for k in range(1, 101):
        progress.update(k, 32 * k, 0.01 * k, 2.0 / k, 0.5 if k % 50 == 0 else None,
                        force=k % 50 == 0)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 20 <= len(lines) <= 23
    assert lines[-1].startswith("iteration 100/100 (100%)") and "ETA" in lines[-1]
    assert "3,200 train ex/s" in lines[-1]              # training seconds only


@pytest.mark.host_only("progress text from host numbers")
def test_progress_in_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    progress = Progress(total=10, start=0, quiet=False, stream=term)
    for k in range(1, 11):
        progress.update(k, 10 * k, 0.1 * k, 1.0, force=True)
    progress.close()
    text = term.getvalue()
    assert "\r" in text and "10/10" in text and "100 train ex/s" in text and "<" in text


# --------------------------------------------------------------------------- device data
def test_device_batches_gather_on_the_device_with_host_indices(xp):
    """On the --xp module (the guarded stand-in under --xp numpy); launches and syncs are
    counted where the module is the guarded one."""
    dev_xp = guarded if xp is np else xp
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 1, 4, 4)), rng.integers(0, 10, 50)
    host = MinibatchStream(x, y, 8, seed=3)
    device = DeviceBatches(x, y, dev_xp)
    indices = MinibatchStream(x, y, 8, seed=3)
    for _ in range(10):                                   # crosses an epoch boundary
        xb, yb = next(host)
        with counting() as c:
            gx, gy = device.gather(indices.next_indices())
        assert get_xp(gx) is dev_xp and get_xp(gy) is dev_xp
        if dev_xp is guarded:
            assert c.syncs == 0 and c.launches <= 3
        np.testing.assert_array_equal(to_numpy(gx), xb)
        np.testing.assert_array_equal(to_numpy(gy), yb)


def test_a_whole_run_on_the_guarded_namespace_equals_the_cpu_run(tmp_path, monkeypatch, xp):
    """The --device gpu path on CPU: every array lives in the guarded namespace (which refuses
    direct NumPy calls), the training set is uploaded once, and the run equals the CPU run in
    float64 to round-off (RUN_RTOL): the NumPy engine sums some products in another order
    (blocks, row products for Omega) and inverts the damped factors by Cholesky where the
    few-launch path (``backend.few_launches``) takes one GEMM and ``inv``; the logged
    decisions (clipping) and counts are equal.  Runs under --xp numpy and guarded; CuPy's
    kernels round differently again, and its float equality is checked elsewhere."""
    if xp is not np and xp is not guarded:
        pytest.skip("the comparison with the CPU run is for the NumPy-backed guarded "
                    "namespace")
    from guarded_xp import asguarded
    from kfc_ref.nn.network import Sequential
    cpu = train(_cfg(tmp_path / "cpu", iters=4, eval_every=2, dtype="float64"))
    real_init, uploads = Sequential.init, []

    class CountingBatches(DeviceBatches):
        def __init__(self, x, y, xp):
            uploads.append(len(y))
            super().__init__(x, y, xp)
    monkeypatch.setattr(Sequential, "init", lambda self, *a, **k: [
        None if p is None else asguarded(p) for p in real_init(self, *a, **k)])
    monkeypatch.setattr(train_mod, "namespace_for", lambda device: guarded)
    monkeypatch.setattr(train_mod, "DeviceBatches", CountingBatches)
    dev = train(_cfg(tmp_path / "dev", iters=4, eval_every=2, dtype="float64"))
    assert uploads == [RUN["max_train"]]
    assert all(isinstance(p, GuardedArray) for p in dev.params if p is not None)
    _assert_rows_close(_strip_time(dev.metrics), _strip_time(cpu.metrics))
    np.testing.assert_allclose(_final(tmp_path / "dev")[0]["theta"],
                               _final(tmp_path / "cpu")[0]["theta"], rtol=RUN_RTOL,
                               atol=RUN_RTOL)


#: float64 runs whose kernels sum in different orders (and invert by Cholesky vs inv) agree to
#: this over a few iterations; measured: they differ above 1e-14 and agree below 1e-12
RUN_RTOL = 1e-12


def _assert_rows_close(rows, ref):
    """Metric rows equal key by key: numbers to RUN_RTOL, everything else exactly."""
    assert len(rows) == len(ref)
    for row, want in zip(rows, ref):
        assert sorted(row) == sorted(want)
        for key, value in row.items():
            if isinstance(value, float) and isinstance(want[key], float):
                assert value == pytest.approx(want[key], rel=RUN_RTOL, abs=RUN_RTOL), key
            else:
                assert value == want[key], key


def test_an_interrupt_never_checkpoints_a_diverged_state(tmp_path, monkeypatch, dev_cfg, to_xp):
    """A device loss (a 0-d array on the --xp module, not a host float) is read only at log
    points; a Ctrl-C after it went NaN stops the run without saving that state."""
    out = tmp_path / "run"
    real, calls = train_mod._step, [0]

    def step(setup, run):
        calls[0] += 1
        real(setup, run)
        if calls[0] >= 4:
            run.info = {**run.info, "loss": to_xp(np.array(np.nan, dtype=np.float32))}
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train_mod, "_step", step)
    with pytest.raises(train_mod.TrainingStopped, match="loss nan at iteration 5"):
        train(dev_cfg(out))
    _, meta, rows = _final(out)
    assert meta["iteration"] == 3 and [r["iteration"] for r in rows] == [3.0]


def test_a_second_ctrl_c_stops_at_once_and_the_run_still_resumes(tmp_path, monkeypatch,
                                                                  reference, dev_cfg):
    out = tmp_path / "run"
    real, calls = train_mod._step, [0]

    def step(setup, run):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)       # raises here, before the update
        real(setup, run)
    monkeypatch.setattr(train_mod, "_step", step)
    with pytest.raises(RunInterrupted):
        train(dev_cfg(out))
    monkeypatch.undo()
    _, meta, rows = _final(out)
    assert meta["iteration"] == 4 and [r["iteration"] for r in rows] == [3.0]
    train(dev_cfg(out), resume=True)
    _assert_identical(out, reference)
