"""Benchmarks, one command: ``python -m kfc_ref bench {conv,curvature,optim,speedup,distributed}``.

Each reports ratios measured side by side in one run (never timed assertions):

* ``conv``: forward+backward GFLOP/s of the CIFAR-10 net against this machine's matmul rate;
* ``curvature``: the KFC statistics against one gradient evaluation; exact-Fisher cost;
* ``optim``: KFC-pre against SGD per iteration (App. B.3);
* ``speedup``: updates and wall-clock to a target error, KFC-pre against SGD (Figs. 1-2);
* ``distributed``: per-iteration compute, bytes communicated and communication time of the
  data-parallel optimizers (run it under ``mpiexec -n P``).
"""
from __future__ import annotations

import sys

from kfc_ref.experiments.cli import dispatch, subcommand_usage

#: subcommand -> (module, one-line description)
BENCHMARKS = {
    "conv": ("kfc_ref.experiments.bench.conv", "net GFLOP/s vs this machine's matmul GFLOP/s"),
    "curvature": ("kfc_ref.experiments.bench.curvature",
                  "KFC statistics vs one gradient; exact Fisher time and memory"),
    "optim": ("kfc_ref.experiments.bench.optim", "KFC-pre vs SGD per-iteration cost (App. B.3)"),
    "speedup": ("kfc_ref.experiments.bench.speedup",
                "updates / wall-clock to a target error, KFC-pre vs SGD (Figs. 1-2)"),
    "distributed": ("kfc_ref.experiments.bench.distributed",
                    "data-parallel compute, bytes and communication time per iteration"),
}


def usage() -> str:
    lines = ["usage: python -m kfc_ref bench <benchmark> [options]", "", "benchmarks:"]
    return "\n".join(lines + subcommand_usage("python -m kfc_ref bench", BENCHMARKS))


def main(argv=None) -> int:
    return dispatch("benchmark", BENCHMARKS, list(sys.argv[1:] if argv is None else argv), usage())


__all__ = ["BENCHMARKS", "main"]
