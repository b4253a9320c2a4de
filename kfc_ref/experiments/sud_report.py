"""``python -m kfc_ref sud RUN_DIR``: the SUD analysis (Appendix D.1, Figures 3-4) of a trained run.

Loads the run written by ``python -m kfc_ref train`` (``config.json`` and ``checkpoint.npz``:
the parameters and the optimizer state), rebuilds its network and its preprocessed dataset,
takes the first ``examples`` images of a split, samples one target per image from the model
(Section 3.1, as App. D.1 does) and writes, into ``--out`` (default ``RUN_DIR/sud``):

* ``sud_derivatives.{png,pdf}``: Figure 3's layout, one row per conv layer: |spatial
  autocorrelation| of the pre-activation derivatives of three maps, and the cross-map matrix
  at the centre location;
* ``sud_activations.{png,pdf}``: Figure 4's layout for the layers' (uncentred) input
  activations;
* ``sud_profile.{png,pdf}``: mean |correlation| per offset ring with the shuffled-example
  baseline dashed;
* ``sud_summary.json``: per layer, for derivatives and activations, mean |correlation| at
  offsets 1..R and overall, dead maps (count and indices; left out of every average), the
  shuffled-example baseline (:mod:`kfc_ref.theory.sud`), and how it was computed;
* ``sud_history.{png,pdf}`` when the run recorded the summary during training
  (:func:`record_sud_history` writes ``RUN_DIR/sud_history.jsonl``).

The run's settings are read through :mod:`kfc_ref.experiments.config`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from kfc_ref.backend import DEVICES, check_device, namespace_for
from kfc_ref.data import load_dataset, preprocess
from kfc_ref.experiments import plotting
from kfc_ref.experiments.checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint
from kfc_ref.experiments.config import (
    CONFIG_NAME, DEFAULT_ARCH, config_from_settings, read_run_record, record_settings,
)
from kfc_ref.experiments.train import checkpoint_state
from kfc_ref.experiments.sud_history import (  # noqa: F401  (part of this command's API)
    SUD_HISTORY_NAME, read_sud_history, record_sud_history,
)
from kfc_ref.nn.models import build_model
from kfc_ref.optim.base import expand
from kfc_ref.theory.correlation import DEFAULT_MAX_OFFSET
from kfc_ref.theory.sud import sud_analysis, summaries_to_json
from kfc_ref.validate import ArgumentError, check_choice, check_int

DEFAULT_EXAMPLES = 500
PARAM_CHOICES = ("averaged", "current")
DEAD_NOTE = ("Dead maps (exactly 0 on every example; counted in the row labels) are excluded "
             "from all averages. Blank panels / cross-map rows: maps that are 0 everywhere, or "
             "at the centre location, in every example (correlation undefined).")


def read_run_config(run_dir: str) -> dict:
    """What the SUD report needs from the settings ``train`` recorded in ``RUN_DIR/config.json``:
    {data, data_dir, arch, seed, max_train, max_test, zca, dtype}, the architecture resolved.

    Read through :mod:`kfc_ref.experiments.config` (the one owner of that layout), so a missing,
    unknown or mistyped key is named with the file, as for ``train --resume``."""
    record = read_run_record(run_dir)
    cfg = config_from_settings(record_settings(record), os.path.join(run_dir, CONFIG_NAME))
    return {"data": cfg.data, "data_dir": cfg.data_dir, "arch": cfg.arch or DEFAULT_ARCH[cfg.data],
            "seed": cfg.seed, "max_train": cfg.max_train, "max_test": cfg.max_test,
            "zca": cfg.zca, "dtype": cfg.dtype}


def load_run(run_dir: str, device: str = "cpu", params: str = "averaged", data_dir=None):
    """(net, params, dataset, config) of a run: the network of its config, its parameters from
    ``checkpoint.npz`` on ``device`` (``params='averaged'``: theta_bar, what ``train`` evaluates
    (App. B.1); ``'current'``: the last iterate), and its preprocessed dataset."""
    check_choice("params", params, PARAM_CHOICES)
    cfg = read_run_config(run_dir)
    if data_dir is not None:
        cfg["data_dir"] = data_dir
    arrays, _ = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))
    dataset = preprocess(load_dataset(cfg["data"], cfg["data_dir"], seed=cfg["seed"],
                                      max_train=cfg["max_train"], max_test=cfg["max_test"]),
                         zca=cfg["zca"])
    net = build_model(cfg["arch"], dataset.image_shape, dataset.num_classes)
    xp = namespace_for(device)
    if params == "averaged":
        values = expand(net, checkpoint_state(arrays, device).theta_bar)
    else:
        values = net.unflatten(xp.asarray(arrays["theta"]))
    return net, values, dataset, cfg


# --------------------------------------------------------------------------- over training
def plot_history(history: list[dict], out: str) -> list[str]:
    """sud_history.{png,pdf}: mean |corr.| at non-zero offsets per layer against iteration,
    derivatives and activations, shuffled baseline dashed."""
    its = [h["iteration"] for h in history]
    panels = []
    for field in ("derivatives", "activations"):
        series = {}
        for k, layer in enumerate(history[-1]["layers"]):
            def values(key, k=k, field=field):
                return np.array([np.nan if h["layers"][k][field][key] is None
                                 else h["layers"][k][field][key] for h in history], dtype=float)
            series[layer["layer"]] = (values("mean_abs_corr"), values("shuffled_baseline"))
        panels.append((field, series))
    return plotting.plot_sud_history(its, panels, "SUD over training (mean |corr.|, offsets "
                                     "!= 0; dashed: shuffled baseline)", out, "sud_history")


def _rows(results, field: str, maps):
    rows = []
    for k, r in enumerate(results):
        f = getattr(r, field)
        total = f.dead.size
        label = f"conv{k + 1} ({f.num_dead}/{total} dead)" if f.num_dead else f"conv{k + 1}"
        chosen = None if maps is None else [m for m in maps if m < total] or None
        rows.append((label, f.autocorr, f.cross, chosen))
    return rows


def sud_report(run_dir: str, out: str | None = None, *, examples: int = DEFAULT_EXAMPLES,
               max_offset: int = DEFAULT_MAX_OFFSET, maps=None, device: str = "cpu",
               split: str = "test", seed: int = 0, params: str = "averaged",
               data_dir=None) -> dict:
    """Run the SUD analysis of a trained run and write the figures and ``sud_summary.json``
    into ``out`` (default ``RUN_DIR/sud``); returns the JSON summary (a dict).

    examples: the first ``examples`` images of ``split`` ('test' or 'train'; fewer if the split
    is smaller, at least 2); max_offset: R, offsets |d| <= R per axis; maps: map indices shown
    in each row of the figures (those beyond a layer's count are dropped; default three spread
    over the live maps); seed: the sampled targets and the baseline's derangement.
    """
    examples = check_int("examples", examples, minimum=2)
    max_offset = check_int("max_offset", max_offset, minimum=1)
    split = check_choice("split", split, ("test", "train"))
    if maps is not None:
        maps = [check_int("maps", m, minimum=0) for m in maps]
    check_device(device)
    out = out or os.path.join(run_dir, "sud")
    net, values, dataset, cfg = load_run(run_dir, device, params, data_dir)
    x_host = getattr(dataset, f"x_{split}")[:examples]
    if x_host.shape[0] < 2:
        raise ValueError(f"split {split!r} of {cfg['data']} has {x_host.shape[0]} example(s); "
                         "the analysis needs at least 2")
    xp = namespace_for(device)
    x = xp.asarray(x_host.astype(cfg["dtype"]))
    results = sud_analysis(net, values, x, np.random.default_rng(seed), max_offset)
    layers = summaries_to_json(results, net)
    n = int(x.shape[0])
    where = f"{cfg['data']} {split}, N={n}, {params} params"
    plotting.plot_correlation_panels(
        _rows(results, "derivatives", maps),
        f"Pre-activation derivatives, targets sampled from the model (Fig. 3); {where}",
        out, "sud_derivatives", note=DEAD_NOTE)
    plotting.plot_correlation_panels(
        _rows(results, "activations", maps),
        f"Input activations, uncentred (Fig. 4); {where}", out, "sud_activations",
        note=DEAD_NOTE)
    plotting.plot_sud_profile(
        [(field, {f"{l['layer']} ({l[field]['dead_maps']}/{l[field]['maps']} dead)":
                  (np.array(l[field]["mean_abs_corr_by_offset"], dtype=float),
                   np.array(l[field]["shuffled_baseline_by_offset"], dtype=float))
                  for l in layers}) for field in ("derivatives", "activations")],
        f"SUD by offset; {where}", out, "sud_profile", note=DEAD_NOTE)
    history = read_sud_history(run_dir)
    if history:
        plot_history(history, out)
    summary = {"run_dir": os.path.abspath(run_dir), "arch": cfg["arch"], "data": cfg["data"],
               "split": split, "examples": n, "max_offset": max_offset, "seed": seed,
               "params": params, "device": device,
               "method": ("targets sampled from the model (one per example); mean |corr.| over "
                          "live maps on rings max(|d1|,|d2|) = r; dead maps (exactly 0 on all "
                          "examples) excluded; shuffled baseline pairs example n with example "
                          "pi(n), pi a random derangement"),
               "layers": layers}
    atomic_write_text(os.path.join(out, "sud_summary.json"),
                      json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """A table: layer, field, dead maps, mean |corr.| overall and at r = 1, baseline."""
    def f(v):
        return "   n/a" if v is None else f"{v:6.3f}"
    lines = [f"{'layer':<6} {'field':<12} {'dead':>7} {'mean':>6} {'r=1':>6} {'base':>6}"]
    for l in summary["layers"]:
        for field in ("derivatives", "activations"):
            s = l[field]
            lines.append(f"{l['layer']:<6} {field:<12} {s['dead_maps']:>3}/{s['maps']:<3} "
                         f"{f(s['mean_abs_corr'])} {f(s['mean_abs_corr_by_offset'][0])} "
                         f"{f(s['shuffled_baseline'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kfc_ref sud",
        description="SUD analysis (App. D.1, Figures 3-4) of a run written by `python -m "
                    "kfc_ref train`: spatial and cross-map correlations of the pre-activation "
                    "derivatives (targets sampled from the model) and of the input activations "
                    "of every conv layer, dead maps, and a shuffled-example baseline.",
        epilog="example: python -m kfc_ref sud runs/sgd --examples 500 --out runs/sgd/sud")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder with config.json and "
                                                      "checkpoint.npz")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/sud)")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                   help=f"images analysed, the first of the split (default {DEFAULT_EXAMPLES})")
    p.add_argument("--max-offset", type=int, default=DEFAULT_MAX_OFFSET, metavar="R",
                   help=f"largest offset per axis (default {DEFAULT_MAX_OFFSET}: the paper's "
                        "13x13 panels)")
    p.add_argument("--maps", type=int, nargs="+", default=None, metavar="C",
                   help="map indices shown per layer (default: three spread over live maps)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--params", choices=PARAM_CHOICES, default="averaged",
                   help="averaged parameters (what train evaluates) or the last iterate")
    p.add_argument("--data-dir", default=None, help="override the run's data folder")
    p.add_argument("--seed", type=int, default=0, help="sampled targets and shuffle")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = sud_report(args.run_dir, args.out, examples=args.examples,
                             max_offset=args.max_offset, maps=args.maps, device=args.device,
                             split=args.split, seed=args.seed, params=args.params,
                             data_dir=args.data_dir)
    except (ArgumentError, ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote sud_derivatives, sud_activations, sud_profile"
          f"{', sud_history' if read_sud_history(args.run_dir) else ''} (.png, .pdf) and "
          f"sud_summary.json to {args.out or os.path.join(args.run_dir, 'sud')}")
    return 0
