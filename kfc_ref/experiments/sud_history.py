"""SUD summaries recorded during training: ``RUN_DIR/sud_history.jsonl``, one line per record.

``train --sud-every K`` appends the per-layer summary of :func:`kfc_ref.theory.sud.
sud_layer_summaries` (mean |correlation| at offsets 1..R of the pre-activation derivatives and
the input activations, dead maps, shuffled-example baseline; App. D.1) every K-th evaluation;
``sud RUN_DIR`` draws how the correlations evolve.
"""
from __future__ import annotations

import json
import os

from kfc_ref.theory.correlation import DEFAULT_MAX_OFFSET
from kfc_ref.theory.sud import sud_layer_summaries

SUD_HISTORY_NAME = "sud_history.jsonl"


def record_sud_history(run_dir: str, iteration: int, net, params, x, rng,
                       max_offset: int = DEFAULT_MAX_OFFSET) -> dict:
    """Append one line {"iteration", "examples", "max_offset", "layers"} to
    ``RUN_DIR/sud_history.jsonl``, with ``layers`` from
    :func:`kfc_ref.theory.sud.sud_layer_summaries` on the fixed inputs ``x`` (device array,
    e.g. the first 256 test images) with targets sampled from ``rng``; returns the record.
    ``sud RUN_DIR`` then also draws ``sud_history.{png,pdf}``.  A line for an iteration that
    is already there (after ``--resume``) supersedes the earlier one when read."""
    record = {"iteration": int(iteration), "examples": int(x.shape[0]),
              "max_offset": int(max_offset),
              "layers": sud_layer_summaries(net, params, x, rng, max_offset)}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, SUD_HISTORY_NAME), "a") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
    return record


def read_sud_history(run_dir: str) -> list[dict]:
    """The records of ``RUN_DIR/sud_history.jsonl`` by iteration (the last line per iteration
    wins; a truncated last line is skipped); [] when there is none."""
    path = os.path.join(run_dir, SUD_HISTORY_NAME)
    if not os.path.exists(path):
        return []
    by_iteration = {}
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_iteration[int(record["iteration"])] = record
    return [by_iteration[k] for k in sorted(by_iteration)]
