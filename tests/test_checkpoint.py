"""Atomic checkpoints: round trip, and an interrupted write leaves the previous file readable."""
import os

import numpy as np
import pytest

from kfc_ref.experiments import checkpoint
from kfc_ref.experiments.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.host_only("checkpoint files hold host arrays (callers bring device "
                                   "arrays back with to_numpy first)")


def test_round_trip(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"theta": np.arange(5.0), "k": np.array(3)}, {"iteration": 3})
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["theta"], np.arange(5.0))
    assert meta == {"iteration": 3} and int(arrays["k"]) == 3


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"theta": np.zeros(3)}, {"iteration": 1})

    def crash(fd):
        raise KeyboardInterrupt("simulated Ctrl-C during fsync")
    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"theta": np.ones(3)}, {"iteration": 2})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    assert meta["iteration"] == 1 and arrays["theta"].sum() == 0
    assert os.listdir(tmp_path) == ["c.npz"]          # no temporary file left behind


def test_bad_checkpoints_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(str(bad))
    atomic_write_text(str(tmp_path / "t.txt"), "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"
