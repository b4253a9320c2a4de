"""A cost model of data-parallel SGD and KFC-pre: Section 5.3's argument as a figure.

The paper argues (Section 5.3, Fig. 2) that at large mini-batches KFC-pre needs far fewer
updates than SGD, so that a distributed KFC-pre could reach a target much sooner than a
distributed SGD.  This module turns measured quantities into a prediction:

* per update at P workers and global mini-batch N (one worker's numbers measured by
  ``python -m kfc_ref bench distributed``, scaled to N)::

      t(P) = c N / P                                 compute, split evenly over the workers
           + A(g, P)                                 gradients, every step
           + A(f, P) / T_s                           Omega/Gamma sums, every T_s steps
           + B(i, P) / T_f                           inverses broadcast from their owners
           + A(8, P)                                 nu, a scalar (KFC-pre with clipping)

  with the payloads g, f, i in bytes as measured, c the measured compute seconds per example,
  a ring all-reduce A(b, P) = 2 (P - 1) / P * b / W + 2 (P - 1) L and a binomial-tree
  broadcast B(b, P) = ceil(log2 P) (L + b / W) for a stated bandwidth W and latency L;
* time to target = U t(P), with U the updates to the target error measured at the same N
  (``python -m kfc_ref bench speedup iterations``, or numbers given on the command line).

What it leaves out, and says on the figure: the compute per example is assumed to stay what it
is at the measured batch (it gets worse on small per-worker batches), KFC-pre's inversions
split over at most L layers, not P workers (measured at ~2% of an iteration at T_f = 10), and
the communication overlaps nothing.

    python -m kfc_ref distributed-model --bench p1.json --updates summary_iterations.json \\
        --out figures/paper/distributed_model.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from kfc_ref.experiments.checkpoint import atomic_write_text
from kfc_ref.experiments.cli import fail
from kfc_ref.validate import ArgumentError, check_int, check_positive

#: Defaults for the network: 10 Gbit/s Ethernet (1.25e9 bytes/s) and 20 us per message.
BANDWIDTH = 1.25e9
LATENCY = 20e-6
WORKERS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def allreduce_seconds(payload: float, workers: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of ``payload`` bytes over ``workers``: 2 (P-1)/P b/W + 2 (P-1) L."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) / workers * payload / bandwidth + 2 * (workers - 1) * latency


def broadcast_seconds(payload: float, workers: int, bandwidth: float, latency: float) -> float:
    """Binomial-tree broadcast of ``payload`` bytes: ceil(log2 P) (L + b/W)."""
    if workers == 1:
        return 0.0
    return math.ceil(math.log2(workers)) * (latency + payload / bandwidth)


@dataclass(frozen=True)
class MethodCosts:
    """One method's measured costs: compute seconds per example, payload bytes per call of
    each tag, and the periods of the tags that do not fire every step."""

    name: str
    compute_per_example: float
    gradients: float
    factors: float = 0.0
    inverses: float = 0.0
    nu: float = 0.0
    stats_period: int = 1
    inverse_period: int = 1

    @classmethod
    def from_bench(cls, name: str, bench: dict) -> MethodCosts:
        """From ``bench distributed`` JSON (its rank count times the compute per iteration is
        the one-worker compute at its batch size)."""
        m = bench["methods"][name]
        tags = m["tags"]
        payload = {t: tags.get(t, {}).get("payload_bytes_per_call", 0.0)
                   for t in ("gradients", "factors", "inverses", "nu")}
        return cls(name, m["compute_seconds_per_iteration"] * bench["ranks"] / bench["batch_size"],
                   payload["gradients"], payload["factors"], payload["inverses"], payload["nu"],
                   m.get("stats_period", 1), m.get("inverse_period", 1))

    def update_seconds(self, batch_size: int, workers: int, bandwidth: float = BANDWIDTH,
                       latency: float = LATENCY) -> dict:
        """The terms of t(P) (module doc) in seconds, and their sum under "total"."""
        terms = {
            "compute": self.compute_per_example * batch_size / workers,
            "gradients": allreduce_seconds(self.gradients, workers, bandwidth, latency),
            "factors": allreduce_seconds(self.factors, workers, bandwidth, latency)
            / self.stats_period if self.factors else 0.0,
            "inverses": broadcast_seconds(self.inverses, workers, bandwidth, latency)
            / self.inverse_period if self.inverses else 0.0,
            "nu": allreduce_seconds(self.nu, workers, bandwidth, latency) if self.nu else 0.0,
        }
        terms["total"] = sum(terms.values())
        return terms


def predict(costs: list[MethodCosts], updates: dict, batch_size: int, workers=WORKERS,
            bandwidth: float = BANDWIDTH, latency: float = LATENCY) -> dict:
    """Per method and worker count: t(P) terms and U t(P), the predicted time to target."""
    out = {}
    for c in costs:
        rows = []
        for p in workers:
            t = c.update_seconds(batch_size, p, bandwidth, latency)
            rows.append({"workers": p, **t, "time_to_target": updates[c.name] * t["total"]})
        out[c.name] = rows
    return out


def read_updates(path: str) -> tuple[dict, int, str]:
    """Updates to target per method, the batch size and a description, from a ``bench
    speedup iterations`` summary: updates to its target if both reached it, else to the
    lowest error both reached."""
    with open(path) as f:
        s = json.load(f)
    m = s["methods"]
    if all(m[k].get("updates_to_target") for k in ("sgd", "kfc-pre")):
        key, what = "updates_to_target", f"training error {s['target']:.0%}"
    else:
        key, what = "updates_to_common_error", \
            f"training error {s['lowest_error_both_reach']:.1%} (lowest both reached)"
    updates = {k: m[k][key] for k in ("sgd", "kfc-pre")}
    if not all(updates.values()):
        raise ArgumentError(f"{path}: a method never reached the common error; no "
                            "updates-to-target to model")
    return updates, int(s["batch_size"]), what


def draw(prediction: dict, assumptions: list[str], path: str) -> None:
    """Two panels: t(P) split into compute and communication; predicted time to target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = {"sgd": "tab:blue", "kfc-pre": "tab:red"}
    for name, rows in prediction.items():
        p = [r["workers"] for r in rows]
        comm = [r["total"] - r["compute"] for r in rows]
        a.plot(p, [r["total"] for r in rows], "o-", color=colours.get(name), label=f"{name}: total")
        a.plot(p[1:], comm[1:], "--", color=colours.get(name),     # none at P = 1
               label=f"{name}: communication")
        b.plot(p, [r["time_to_target"] / 3600 for r in rows], "o-", color=colours.get(name),
               label=name)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers P")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    a.set_ylabel("seconds per update")
    a.set_title("time per update t(P)")
    b.set_ylabel("predicted hours to target")
    b.set_title("time to target = updates x t(P)")
    fig.text(0.01, 0.01, "\n".join(assumptions), fontsize=7.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.028 * len(assumptions), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kfc_ref distributed-model",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True,
                   help="JSON of `bench distributed` (per-iteration compute and payloads)")
    p.add_argument("--updates", help="summary_iterations.json of `bench speedup iterations`")
    p.add_argument("--updates-sgd", type=float, help="updates to target for SGD (instead)")
    p.add_argument("--updates-kfc", type=float, help="updates to target for KFC-pre (instead)")
    p.add_argument("--batch-size", type=int,
                   help="global mini-batch N of the updates (default: the --updates file's)")
    p.add_argument("--bandwidth-gbps", type=float, default=BANDWIDTH * 8 / 1e9,
                   help="network bandwidth in Gbit/s (default 10)")
    p.add_argument("--latency-us", type=float, default=LATENCY * 1e6,
                   help="latency per message in microseconds (default 20)")
    p.add_argument("--out", required=True, help="figure path (.png or .pdf); a .json beside it")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.bench) as f:
            bench = json.load(f)
        if args.updates:
            updates, batch, target = read_updates(args.updates)
            source = f"updates to {target}, measured at N = {batch} ({args.updates})"
        elif args.updates_sgd and args.updates_kfc:
            updates = {"sgd": check_positive("--updates-sgd", args.updates_sgd),
                       "kfc-pre": check_positive("--updates-kfc", args.updates_kfc)}
            batch, source = None, "updates to target given on the command line"
        else:
            raise ArgumentError("give --updates FILE or both --updates-sgd and --updates-kfc")
        batch = check_int("--batch-size", args.batch_size or batch, minimum=1)
        bandwidth = check_positive("--bandwidth-gbps", args.bandwidth_gbps) * 1e9 / 8
        latency = check_positive("--latency-us", args.latency_us) * 1e-6
        costs = [MethodCosts.from_bench(m, bench) for m in ("sgd", "kfc-pre")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return fail(exc)
    prediction = predict(costs, updates, batch, WORKERS, bandwidth, latency)
    assumptions = [
        f"updates: SGD {updates['sgd']:g}, KFC-pre {updates['kfc-pre']:g}; {source}",
        f"compute: {costs[0].compute_per_example * 1e3:.2f} (SGD) / "
        f"{costs[1].compute_per_example * 1e3:.2f} (KFC-pre) ms per example, measured on one "
        f"{bench['device']} worker at N = {bench['batch_size']}, assumed to split evenly over P",
        f"payloads: gradients {costs[0].gradients / 1e6:.2f} MB every step; factors "
        f"{costs[1].factors / 1e6:.2f} MB every {costs[1].stats_period}; inverses "
        f"{costs[1].inverses / 1e6:.2f} MB every {costs[1].inverse_period} (KFC-pre)",
        f"network: {bandwidth * 8 / 1e9:g} Gbit/s, {latency * 1e6:g} us per message; ring "
        "all-reduce, tree broadcast, no overlap of communication with compute",
    ]
    try:
        draw(prediction, assumptions, args.out)
        atomic_write_text(args.out.rsplit(".", 1)[0] + ".json", json.dumps(
            {"assumptions": assumptions, "batch_size": batch, "updates": updates,
             "prediction": prediction}, indent=2))
    except OSError as exc:
        return fail(exc)
    for name, rows in prediction.items():
        print(name, " ".join(f"P={r['workers']}:{r['time_to_target'] / 3600:.3g}h" for r in rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
