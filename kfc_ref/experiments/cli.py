"""Command-line conventions shared by ``train``, ``sweep``, ``figures`` and ``tour``: every
error is one line on stderr, without a traceback, with exit code 2; output folders need
``--out`` and refuse to replace an existing non-empty folder without ``--overwrite``."""
from __future__ import annotations

import argparse
import importlib
import sys


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``prog: error: ... (see --help)``)
    and exit with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(message, code: int = 2) -> int:
    """Print ``error: message`` as one line on stderr; return the exit code."""
    text = " ".join(str(message).split())
    print(f"error: {text}", file=sys.stderr)
    return code


def add_output_arguments(p: argparse.ArgumentParser, what: str, *, required: bool = True):
    """``--out DIR`` (required unless told otherwise) and ``--overwrite``."""
    p.add_argument("--out", required=required, metavar="DIR",
                   help=f"{what} to create (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"reuse an existing non-empty {what}, replacing the files this command "
                        "writes there (nothing is removed before the arguments are checked)")


def subcommand_usage(prog: str, table: dict, width: int = 10) -> list[str]:
    """The lines listing ``table``'s subcommands ({name: (module, description)})."""
    return [f"  {name:<{width}} {doc}" for name, (_, doc) in table.items()] + [
        "", f"Run `{prog} <name> --help` for its options."]


def dispatch(kind: str, table: dict, argv: list, usage: str) -> int:
    """Run ``table[argv[0]]``'s ``main(argv[1:])`` (modules imported on demand, so one command
    never loads the others); ``-h``/nothing prints ``usage``; an unknown name is a one-line
    error with exit code 2."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        return fail(f"unknown {kind} {name!r}; choose one of {', '.join(table)}")
    return int(importlib.import_module(table[name][0]).main(rest) or 0)

