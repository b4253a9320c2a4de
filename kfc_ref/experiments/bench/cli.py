"""The options ``bench conv`` and ``bench curvature`` share, and how they print results."""
from __future__ import annotations

import argparse
import json
import sys

from kfc_ref.backend import namespace_for


def run_cli(name: str, description: str, argv, compute, extra=()) -> int:
    """Parse the shared options (and ``extra``: (flags, argparse keywords) pairs), check the
    device, run ``compute(args) -> dict``, print it (as one JSON line with ``--json``).
    Returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m kfc_ref bench {name}",
                                     description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=None,
                        help="mini-batch size (default: 128 for conv, 512 for curvature)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    for flags, kwargs in extra:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    try:
        namespace_for(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = compute(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0
