"""The training loop: resume reproduces the uninterrupted run exactly, the NaN guard keeps the
last good checkpoint, Ctrl-C leaves log and checkpoint consistent, CLI errors are clear."""
import json
import os

import numpy as np
import pytest

from kfc_ref.backend import get_xp
from kfc_ref.experiments import train as train_mod
from kfc_ref.experiments.checkpoint import load_checkpoint
from kfc_ref.experiments.train import TrainConfig, TrainingStopped, main, read_metrics, train

SMALL = dict(data="digits", max_train=256, max_test=64, batch_size=32, quiet=True, seed=3)


def _cfg(tmp_path, name, **kw):
    return TrainConfig(out=str(tmp_path / name), **{**SMALL, **kw})


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("kfc-pre", 0.01)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, optimizer, lr, device, xp):
    """On the --xp module's device (--device gpu under guarded/cupy)."""
    full = train(_cfg(tmp_path, "full", optimizer=optimizer, lr=lr, iters=6, eval_every=2,
                      device=device))
    part = _cfg(tmp_path, "part", optimizer=optimizer, lr=lr, iters=4, eval_every=2,
                device=device)
    train(part)
    part.iters = 6
    resumed = train(part, resume=True)
    assert get_xp(*(p for p in resumed.params if p is not None)) is xp   # ran on the device
    a, _ = load_checkpoint(os.path.join(full.out_dir, "checkpoint.npz"))
    b, _ = load_checkpoint(os.path.join(resumed.out_dir, "checkpoint.npz"))
    np.testing.assert_array_equal(a["theta"], b["theta"])
    assert _strip_time(read_metrics(full.out_dir)) == _strip_time(read_metrics(resumed.out_dir))


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, device):
    cfg = _cfg(tmp_path, "nan", optimizer="sgd", lr=50.0, iters=40, eval_every=1,
               device=device)
    with pytest.raises(TrainingStopped, match="NaN/inf or exploding"):
        train(cfg)
    arrays, meta = load_checkpoint(os.path.join(cfg.out, "checkpoint.npz"))
    assert np.all(np.isfinite(arrays["theta"]))
    rows = read_metrics(cfg.out)
    assert rows and rows[-1]["iteration"] == meta["iteration"]


def test_ctrl_c_leaves_log_and_checkpoint_consistent(tmp_path, monkeypatch, device):
    cfg = _cfg(tmp_path, "int", optimizer="sgd", lr=0.05, iters=6, eval_every=2,
               device=device)
    real_step = train_mod.make_optimizer("sgd", lr=0.05).__class__.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train_mod.make_optimizer("sgd", lr=0.05).__class__, "step", step)
        train(cfg)
    _, meta = load_checkpoint(os.path.join(cfg.out, "checkpoint.npz"))
    assert meta["iteration"] == 3
    assert [r["iteration"] for r in read_metrics(cfg.out)] == [2.0]
    resumed = train(cfg, resume=True)
    full = train(_cfg(tmp_path, "ref", optimizer="sgd", lr=0.05, iters=6, eval_every=2,
                      device=device))
    assert _strip_time(resumed.metrics) == _strip_time(full.metrics)


def test_cli_writes_config_and_metrics(tmp_path, capsys, device):
    out = str(tmp_path / "cli")
    code = main(["--optimizer", "sgd", "--data", "digits", "--iters", "3", "--batch-size", "16",
                 "--max-train", "64", "--max-test", "32", "--quiet", "--out", out,
                 "--device", device])
    assert code == 0
    assert json.load(open(os.path.join(out, "config.json")))["optimizer"] == "sgd"
    assert len(read_metrics(out)) >= 1
    assert "finished" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--data", "digits", "--batch-size", "0", "--out", "X"], "batch_size=0 is not allowed"),
    (["--data", "cifar10", "--out", "X"], "--data-dir"),
    (["--data", "digits", "--device", "gpu", "--out", "X"], "device='gpu' was requested"),
    (["--optimizer", "kfac", "--lr", "0.1", "--data", "digits", "--out", "X"], "omit lr"),
])
@pytest.mark.host_only("CLI argument validation (the gpu case asks about the real device)")
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    from kfc_ref.backend import gpu_unavailable_reason
    if "gpu" in argv and gpu_unavailable_reason() is None:
        pytest.skip("a GPU is present")
    argv = [a if a != "X" else str(tmp_path / "o") for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.host_only("CLI argument parsing")
def test_cli_rejects_unknown_choices():
    with pytest.raises(SystemExit) as exc:
        main(["--optimizer", "adam", "--out", "x"])
    assert exc.value.code == 2


def test_overwrite_removes_nothing_before_the_new_run_is_validated(tmp_path, capsys, device):
    out = str(tmp_path / "run")
    common = ["--data", "digits", "--iters", "2", "--batch-size", "16", "--max-train", "64",
              "--max-test", "32", "--quiet", "--out", out, "--device", device]
    assert main(common) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert main(common + ["--overwrite", "--lr", "-1"]) == 2          # refused: old run intact
    assert main(common + ["--overwrite", "--data-dir", "/no/such", "--data", "cifar10"]) == 2
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    assert main(common + ["--overwrite", "--lr", "0.01"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["lr"] == 0.01
    capsys.readouterr()
