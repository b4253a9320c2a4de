"""Command line: ``python -m kfc_ref <command> [options]`` (``--help`` on each command).

Installing the package (``pip install .``) also installs the same entry point as the
``kfc-ref`` console script; ``--version`` prints the package version.

Each command lives in its own module with a ``main(argv) -> int`` function; this file only
dispatches, so importing one command never pulls in the others.
"""
from __future__ import annotations

import importlib
import sys

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
              "benchmarks: conv, curvature, optim, speedup (ratios measured side by side)"),
}


def _usage() -> str:
    lines = ["usage: python -m kfc_ref <command> [options]   (installed: kfc-ref <command>)",
             "       python -m kfc_ref --version", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "Run `python -m kfc_ref <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from kfc_ref import __version__
        print(f"kfc_ref {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n",
              file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
