"""Command line: ``python -m kfc_ref <command> [options]`` (``--help`` on each command).

Installing the package (``pip install .``) also installs the same entry point as the
``kfc-ref`` console script; ``--version`` prints the package version.

Each command lives in its own module with a ``main(argv) -> int`` function; this file only
dispatches, so importing one command never pulls in the others.
"""
from __future__ import annotations

import sys

from kfc_ref.experiments.cli import dispatch, subcommand_usage

COMMANDS = {
    "check": ("kfc_ref.experiments.checks", "run the paper's theorem checks on fresh random cases"),
    "train": ("kfc_ref.experiments.train",
              "train a net with SGD, KFC-pre or K-FAC and log metrics"),
    "sweep": ("kfc_ref.experiments.sweep", "learning-rate sweep over {0.3, 0.1, ..., 0.0003}"),
    "sud": ("kfc_ref.experiments.sud_report",
            "SUD analysis (App. D.1, Figs. 3-4) of a trained run: correlations, dead maps"),
    "figures": ("kfc_ref.experiments.figures", "write the figures (PNG and PDF)"),
    "tour": ("kfc_ref.experiments.tour",
             "one-command tour: checks, exact vs KFC, SUD, KFC-pre vs SGD"),
    "bench": ("kfc_ref.experiments.bench",
              "benchmarks: conv, curvature, optim, speedup, distributed (ratios measured side "
              "by side)"),
    "distributed-model": ("kfc_ref.experiments.distributed_model",
                          "predicted time to target of data-parallel SGD and KFC-pre at P = "
                          "1..256 workers (Section 5.3)"),
}


def _usage() -> str:
    lines = ["usage: python -m kfc_ref <command> [options]   (installed: kfc-ref <command>)",
             "       python -m kfc_ref --version", "", "commands:"]
    return "\n".join(lines + subcommand_usage("python -m kfc_ref", COMMANDS, 8))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from kfc_ref import __version__
        print(f"kfc_ref {__version__}")
        return 0
    return dispatch("command", COMMANDS, argv, _usage())


if __name__ == "__main__":
    sys.exit(main())
