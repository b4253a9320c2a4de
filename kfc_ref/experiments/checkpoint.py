"""Atomic files: checkpoints (NumPy arrays + JSON metadata in one .npz) and text files.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the target with ``os.replace`` (atomic on POSIX), and the folder is fsync'ed.  A crash,
SIGKILL or Ctrl-C during a write leaves the previous file intact and readable; a failed write
(full disk, unwritable folder) removes its temporary file and raises :class:`FileWriteError`
naming the file.  Files get the permissions of ``open()`` under the user's umask.

Loading never unpickles (``allow_pickle=False``): a truncated, corrupt, foreign or malicious
file raises :class:`CheckpointError` naming the file and what to do.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile

import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = "kfc_ref checkpoint 1"
_META_KEY = "__meta_json__"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used (missing keys, corrupt, truncated, foreign)."""


class FileWriteError(OSError):
    """Writing a run file failed (disk full, permissions); the previous file is intact.
    ``errno`` and ``filename`` are those of the failed write."""

    def __str__(self):
        return str(self.args[0])


def describe_os_error(exc: OSError) -> str:
    """'No space left on device (ENOSPC)' and the like."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _user_mode() -> int:
    """0o666 under the current umask (what ``open(path, 'w')`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_and_sync(fh, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
        os.fchmod(fd, _user_mode())
        with os.fdopen(fd, "wb") as fh:
            _write_and_sync(fh, data)
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        error = FileWriteError(f"cannot write {path}: {describe_os_error(exc)}; the previous "
                               "version of the file (if any) is kept intact")
        error.errno, error.filename = exc.errno, path
        raise error from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str, arrays: dict, meta: dict) -> None:
    """Save host arrays (``{name: np.ndarray}``) and JSON-serialisable ``meta`` atomically
    (``meta`` gains ``"format"``)."""
    if _META_KEY in arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    buf = io.BytesIO()
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    meta = {"format": CHECKPOINT_FORMAT, **meta}
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **payload)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, required=()) -> tuple[dict, dict]:
    """(arrays, meta) from a checkpoint written by :func:`save_checkpoint`; ``required`` names
    arrays that must be present.  Never unpickles."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    advice = ("it is not a complete kfc_ref checkpoint; restore the run directory from a copy or "
              "start a new run with --out (or --overwrite)")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with data:
            arrays = {k: data[k] for k in data.files if k != _META_KEY}
            if _META_KEY not in data.files:
                raise ValueError("it has no kfc_ref metadata")
            meta = json.loads(bytes(data[_META_KEY]).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001  (BadZipFile, EOFError, zlib.error, OSError, ...)
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: "
                              f"{exc}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT!r} file; {advice}")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {advice}")
    meta.pop("format")
    return arrays, meta
