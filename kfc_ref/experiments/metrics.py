"""``metrics.csv``: one row per evaluation of a training run, written atomically.

Columns: :data:`METRIC_COLUMNS` (iteration, examples seen, training seconds, train and test
loss and error of the averaged parameters), then every entry of the optimizer's ``info`` of the
last step (:func:`info_columns`), in order of first appearance.  Lists (KFC-pre's pi per layer)
are ';'-joined; booleans are 0/1; missing values are empty cells.
"""
from __future__ import annotations

import csv
import io
import os


from kfc_ref.experiments.checkpoint import atomic_write_text
from kfc_ref.optim.base import host_value

METRIC_COLUMNS = ("iteration", "examples_seen", "wall_seconds", "train_loss", "train_error",
                  "test_loss", "test_error")
METRICS_NAME = "metrics.csv"


def info_columns(info: dict) -> dict:
    """The optimizer's ``info`` as metrics columns: every key, ``loss`` renamed ``batch_loss``
    (the mini-batch loss before the step), ``k`` dropped (it is the iteration)."""
    return {("batch_loss" if key == "loss" else key): host_value(value)
            for key, value in info.items() if key != "k"}


def format_metric(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(f"{v:.6g}" for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def write_metrics(path: str, rows: list[dict]) -> None:
    """Rewrite ``path`` atomically with every row so far (columns: module doc)."""
    columns = list(METRIC_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_metric(row.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def read_metrics(out_dir: str) -> list[dict]:
    """Rows of ``out_dir/metrics.csv`` as dicts of floats (empty cells -> None; ``pi`` and
    other ';'-joined cells -> lists)."""
    path = os.path.join(out_dir, METRICS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {METRICS_NAME} in {out_dir!r}")
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            rows.append({key: None if value == "" else
                         [float(v) for v in value.split(";")] if key == "pi" or ";" in value
                         else float(value) for key, value in raw.items()})
    return rows
