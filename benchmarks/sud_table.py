"""Print the paper-setting SUD table (markdown) from the sud_summary.json files of
``bench speedup --preset sud-cifar10`` runs: per conv layer, max vs average pooling, mean
|correlation| of derivatives and activations at non-zero offsets, their shuffled-example
baselines, cross-map correlations and dead-map counts.

    python benchmarks/sud_table.py OUT          # OUT holds cifar10/sud and cifar10-avg/sud
"""
from __future__ import annotations

import json
import os
import sys


def pair(stats: dict, value: str, baseline: str) -> str:
    return f"{stats[value]:.3f} ({stats[baseline]:.3f})"


def rows(out: str):
    for arch, label in (("cifar10", "max"), ("cifar10-avg", "avg")):
        path = os.path.join(out, arch, "sud", "sud_summary.json")
        with open(path) as f:
            summary = json.load(f)
        for layer in summary["layers"]:
            d, a = layer["derivatives"], layer["activations"]
            yield (layer["layer"], label, pair(d, "mean_abs_corr", "shuffled_baseline"),
                   f"{d['mean_abs_corr_by_offset'][0]:.3f}",
                   pair(d, "cross_map_mean_abs_offdiag", "cross_map_shuffled_baseline"),
                   f"{d['dead_maps']}/{d['maps']}",
                   pair(a, "mean_abs_corr", "shuffled_baseline"),
                   pair(a, "cross_map_mean_abs_offdiag", "cross_map_shuffled_baseline"),
                   f"{a['dead_maps']}/{a['maps']}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    head = ("layer", "first pool", "DS spatial (shuffled)", "DS offset 1",
            "DS cross-map (shuffled)", "DS dead", "A spatial (shuffled)",
            "A cross-map (shuffled)", "A dead")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in sorted(rows(argv[0]))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
