"""The paper's SVHN net (Srivastava 2013) as ``--arch svhn``: its layer structure, and training
end to end on a small synthetic SVHN ``.mat`` through ``python -m kfc_ref train``, then ``sud``."""
import csv
import json
import math
import os

import numpy as np
import pytest

from kfc_ref.__main__ import main as cli
from kfc_ref.backend import to_numpy
from kfc_ref.nn.layers import Conv2d, Dense, Dropout
from kfc_ref.nn.models import ARCHITECTURES, SVHN_DROPOUT, build_model, svhn_convnet
from kfc_ref.optim import make_optimizer

sio = pytest.importorskip("scipy.io")


def write_synthetic_svhn(folder, n_train=24, n_test=12, seed=0):
    """train_32x32.mat / test_32x32.mat in the official layout: X (32, 32, 3, N) uint8, y (N, 1)
    in 1..10 (10 = digit 0); each class gets a brighter block at its own position so the
    labels are learnable."""
    rng = np.random.default_rng(seed)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        y = rng.integers(1, 11, size=(n, 1))
        X = rng.integers(0, 120, size=(32, 32, 3, n)).astype(np.uint8)
        for k in range(n):
            r = 3 * int(y[k, 0] - 1)
            X[r:r + 3, 4:28, :, k] = 250
        sio.savemat(os.path.join(folder, name), {"X": X, "y": y.astype(np.uint8)})


@pytest.mark.host_only("layer structure and shapes, no arrays")
def test_structure_follows_srivastava_2013():
    net = build_model("svhn", (3, 32, 32), 10)
    assert "svhn" in ARCHITECTURES
    convs = [l for l in net.layers if isinstance(l, Conv2d)]
    denses = [l for l in net.layers if isinstance(l, Dense)]
    assert [l.out_channels for l in convs] == [96, 128, 256]
    assert all(l.geom.kh == l.geom.kw == 5 and l.geom.stride == 1 for l in convs)
    assert [net.shapes[i + 1] for i, l in enumerate(net.layers) if isinstance(l, Conv2d)] == \
        [(96, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert len(denses) == 3 and net.shapes[-1] == (10,)
    assert net.shapes[net.layers.index(denses[0])] == (4096,)
    assert [l.rate for l in net.layers if isinstance(l, Dropout)] == list(SVHN_DROPOUT)
    assert net.num_params == 13_741_578


def test_dropout_masks_act_in_training_only(to_xp):
    net = svhn_convnet(widths=(4, 4, 8), hidden=(16, 16))
    params = [to_xp(p) for p in net.init(0, "float64")]
    x = to_xp(np.random.default_rng(0).normal(size=(3, 3, 32, 32)))
    eval_a, eval_b = (to_numpy(net.forward(params, x).output) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    train = to_numpy(net.forward(params, x, train=True, rng=np.random.default_rng(1)).output)
    assert not np.allclose(train, eval_a)


def test_kfc_pre_steps_on_a_narrow_twin(to_xp):
    """KFC-pre's factors and update go through the dropout layers (shapes, finite loss), on
    the --xp module."""
    net = svhn_convnet(widths=(4, 4, 8), hidden=(16, 16))
    params = [to_xp(p) for p in net.init(0, "float64")]
    rng = np.random.default_rng(0)
    x, y = to_xp(rng.normal(size=(8, 3, 32, 32))), to_xp(rng.integers(0, 10, 8))
    opt = make_optimizer("kfc-pre", lr=0.01)
    state = opt.init_state(net, params)
    state = opt.initialize_factors(state, net, params, [x], rng)
    for _ in range(2):
        params, state, info = opt.step(state, net, params, (x, y), rng)
    assert math.isfinite(float(to_numpy(info["loss"])))


@pytest.mark.slow
def test_train_end_to_end_on_synthetic_mat_then_sud(tmp_path, capsys, device):
    data_dir = tmp_path / "svhn"
    data_dir.mkdir()
    write_synthetic_svhn(str(data_dir))
    out = str(tmp_path / "run")
    assert cli(["train", "--data", "svhn", "--data-dir", str(data_dir), "--arch", "svhn",
                "--iters", "2", "--batch-size", "8", "--lr", "0.001", "--eval-every", "1",
                "--out", out, "--quiet", "--device", device]) == 0
    with open(os.path.join(out, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["arch"] == "svhn"
    assert cli(["sud", out, "--examples", "12", "--max-offset", "2", "--device", device]) == 0
    with open(os.path.join(out, "sud", "sud_summary.json")) as fh:
        layers = json.load(fh)["layers"]
    assert [l["derivatives"]["maps"] for l in layers] == [96, 128, 256]
    capsys.readouterr()


@pytest.mark.host_only("layer structure and shapes, no arrays")
def test_average_pooled_twin_replaces_every_max_pool():
    from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
    mx, av = build_model("svhn", (3, 32, 32), 10), build_model("svhn-avg", (3, 32, 32), 10)
    assert sum(isinstance(l, MaxPool2d) for l in mx.layers) == 3
    assert sum(isinstance(l, AvgPool2d) for l in av.layers) == 3
    assert not any(isinstance(l, MaxPool2d) for l in av.layers)
    assert mx.shapes == av.shapes and mx.num_params == av.num_params
