"""Atomic files: checkpoints (NumPy arrays + JSON metadata in one .npz) and text files.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the target with ``os.replace`` (atomic on POSIX).  A crash or Ctrl-C during a write leaves
the previous file intact and readable; a stale temporary file is ignored by readers.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"
_META_KEY = "__meta_json__"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str, arrays: dict, meta: dict) -> None:
    """Save host arrays (``{name: np.ndarray}``) and JSON-serialisable ``meta`` atomically."""
    if _META_KEY in arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    buf = io.BytesIO()
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **payload)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(arrays, meta) from a checkpoint written by :func:`save_checkpoint`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != _META_KEY}
            meta = json.loads(bytes(data[_META_KEY]).decode("utf-8"))
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"checkpoint {path!r} is unreadable or not a kfc_ref checkpoint: "
                         f"{exc}") from exc
    return arrays, meta
