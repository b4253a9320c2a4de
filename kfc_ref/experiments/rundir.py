"""Output folders of ``train``, ``sweep``, ``figures`` and ``tour``: created fresh, never
replaced by accident.

* :func:`check_new_output` (before any work): the folder must not exist, or be empty; an
  existing non-empty one is refused with a message naming ``--resume`` and ``--overwrite``; a
  file of that name is refused.  Nothing is created or removed here.
* :func:`make_output` (once the arguments and data are validated): creates the folder, and with
  ``overwrite`` removes the files the command owns (``owned``), never anything else;
  :func:`clear_runs` does that for the training runs of ``figures`` and ``tour``.

Every error is a :class:`RunDirectoryError` (a ``ValueError``) naming the path.
"""
from __future__ import annotations

import os

from kfc_ref.experiments.checkpoint import describe_os_error

__all__ = ["RUN_FILES", "RunDirectoryError", "check_new_output", "clear_runs", "make_output"]

#: The files a training run writes in its directory.
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.npz")


class RunDirectoryError(ValueError):
    """An output folder cannot be used (exists, is a file, cannot be created)."""


def check_new_output(path, *, overwrite: bool, what: str = "run directory",
                     resume_hint: bool = True) -> str:
    """Refuse ``path`` unless it is absent or empty (or ``overwrite``); returns it as str."""
    path = os.fspath(path)
    if not path:
        raise RunDirectoryError(f"the {what} path is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirectoryError(f"{what} {path!r} is a file, not a folder; choose another path")
    if os.path.isdir(path) and _has_content(path) and not overwrite:
        hint = (f"continue it with --resume {path}, " if resume_hint else "")
        raise RunDirectoryError(
            f"{what} {path!r} already exists and is not empty; {hint}choose a new path, or pass "
            "--overwrite to replace what this command writes there")
    return path


def _has_content(path: str) -> bool:
    """Anything but stale temporary files of an interrupted atomic write."""
    return any(not name.startswith(".tmp-") for name in os.listdir(path))


def make_output(path, *, overwrite: bool, owned=(), what: str = "run directory") -> str:
    """Create ``path`` (parents too); with ``overwrite`` remove the files named in ``owned``
    (and stale temporary files) so a fresh run starts clean."""
    path = check_new_output(path, overwrite=overwrite, what=what)
    try:
        os.makedirs(path, exist_ok=True)
        if overwrite:
            for name in os.listdir(path):
                if name in owned or name.startswith(".tmp-"):
                    os.remove(os.path.join(path, name))
    except OSError as exc:
        raise RunDirectoryError(f"cannot create {what} {path!r}: {describe_os_error(exc)}") \
            from None
    return path


def clear_runs(runs_dir, *, overwrite: bool) -> None:
    """With ``overwrite``, empty the run directories under ``runs_dir`` of their
    :data:`RUN_FILES` so that a command that trains there again (figures, tour) starts fresh."""
    if not overwrite or not os.path.isdir(runs_dir):
        return
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        if os.path.isdir(path):
            make_output(path, overwrite=True, owned=RUN_FILES)
