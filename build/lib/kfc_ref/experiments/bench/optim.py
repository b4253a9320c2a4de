"""Per-iteration cost of KFC-pre relative to SGD (App. B.3's profiling rule for T_s, T_f, subsets).

App. B.3 chooses the statistics period T_s, the inverse period T_f and the mini-batch subsets so
that KFC-pre's per-epoch wall-clock time stays below 2x SGD's (our training issue asks for 1.5x on
the CIFAR-10 net at batch 512).  At equal batch size per-epoch time is proportional to
per-iteration time, and KFC-pre's iterations come in three kinds, so the amortised cost is

    t_KFC = t_plain + t_stats / T_s + t_inverse / T_f,

where t_plain is an iteration without refreshes (gradient, Eq. 22 preconditioning, nu for
clipping on ``nu_fraction`` of the batch, momentum, averaging), t_stats the extra cost of a factor
refresh and t_inverse that of recomputing the damped inverses.  Each is measured on a few
iterations of differently configured optimizers, interleaved with SGD iterations so that machine
noise hits all of them alike, and summarised by the *minimum* over repetitions (interference from
other processes only ever adds time).  Both wall-clock and process CPU time are reported: on a
shared machine the CPU-time ratio (best with ``--threads 1``) is the more reproducible estimate
of the work ratio.  Random data; the timings do not depend on the values.

Run: ``python -m kfc_ref bench optim`` (add ``--quick`` for a smoke
run on a small batch, or ``python -m kfc_ref bench optim --help``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as _host_np  # host-side random data

from kfc_ref.backend import namespace_for, synchronize
from kfc_ref.optim.kfc_pre import (
    INVERSE_PERIOD, NU_FRACTION, STATS_FRACTION, STATS_PERIOD, KFCPre,
)
from kfc_ref.nn.models import cifar10_convnet
from kfc_ref.optim import SGD

NEVER = 10**9   # a refresh period that does not fire during the measurement


def _timed_step(opt, state, net, params, batch, rng):
    """(wall seconds, process CPU seconds) of one step, and the new state."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    _, new_state, _ = opt.step(state, net, params, batch, rng)
    synchronize()
    return (time.perf_counter() - wall, time.process_time() - cpu), new_state


def _amortised(best: dict, stats_period: int, inverse_period: int, which: int) -> dict:
    t = {name: v[which] for name, v in best.items()}
    t_stats = max(t["kfc_stats"] - t["kfc_plain"], 0.0)
    t_inverse = max(t["kfc_all"] - t["kfc_stats"], 0.0)
    amortised = t["kfc_plain"] + t_stats / stats_period + t_inverse / inverse_period
    return {"t_sgd": t["sgd"], "t_plain": t["kfc_plain"],
            "t_nu": max(t["kfc_plain"] - t["kfc_no_clip"], 0.0), "t_stats": t_stats,
            "t_inverse": t_inverse, "t_kfc_amortised": amortised, "ratio": amortised / t["sgd"]}


def measure_overhead(batch_size: int = 512, reps: int = 3, *, stats_period: int = STATS_PERIOD,
                     inverse_period: int = INVERSE_PERIOD, stats_fraction: float = STATS_FRACTION,
                     nu_fraction: float = NU_FRACTION, dtype: str = "float32",
                     device: str = "cpu", seed: int = 0, net=None, log=print) -> dict:
    """Per-iteration seconds (minimum over ``reps``) of SGD and of each kind of KFC-pre
    iteration on ``net`` (default: the paper's CIFAR-10 net), and the amortised ratio
    t_KFC / t_SGD (module doc), as ``{"wall": {...}, "cpu": {...}}`` plus the settings.

    Parameters are not updated between timed iterations (each step starts from the same
    parameters and state), so every repetition does identical work.
    """
    net = cifar10_convnet() if net is None else net
    xp = namespace_for(device)
    rng = _host_np.random.default_rng(seed)
    params = net.init(seed, dtype=dtype, device=device)
    x = xp.asarray(rng.standard_normal((batch_size,) + net.input_shape).astype(dtype))
    y = xp.asarray(rng.integers(0, net.shapes[-1][0], batch_size))
    batch = (x, y)
    common = dict(lr=0.01, stats_fraction=stats_fraction, nu_fraction=nu_fraction)
    configs = {
        "sgd": SGD(lr=0.01),
        "kfc_plain": KFCPre(stats_period=NEVER, inverse_period=NEVER, **common),
        "kfc_no_clip": KFCPre(stats_period=NEVER, inverse_period=NEVER, clip=None, **common),
        "kfc_stats": KFCPre(stats_period=1, inverse_period=NEVER, **common),
        "kfc_all": KFCPre(stats_period=1, inverse_period=1, **common),
    }
    states = {}
    for name, opt in configs.items():
        state = opt.init_state(net, params)
        if isinstance(opt, KFCPre):
            state = opt.initialize_factors(state, net, params, [x], rng)
        _, state = _timed_step(opt, state, net, params, batch, rng)     # warm-up, k = 1
        states[name] = state
    times = {name: [] for name in configs}
    for rep in range(reps):
        for name, opt in configs.items():
            seconds, _ = _timed_step(opt, states[name], net, params, batch, rng)
            times[name].append(seconds)
        log(f"  rep {rep + 1}/{reps} (wall/cpu s): " + ", ".join(
            f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}" for k, v in times.items()))
    best = {name: (min(w for w, _ in v), min(c for _, c in v)) for name, v in times.items()}
    return {"batch_size": batch_size, "dtype": dtype, "device": device, "reps": reps,
            "stats_period": stats_period, "inverse_period": inverse_period,
            "stats_fraction": stats_fraction, "nu_fraction": nu_fraction,
            "wall": _amortised(best, stats_period, inverse_period, 0),
            "cpu": _amortised(best, stats_period, inverse_period, 1), "samples": times}


def bench_optim(device: str = "cpu", batch_size: int = 512, *, quick: bool = False,
                reps: int = 3, **options) -> dict:
    """Flat summary of :func:`measure_overhead` (host scalars, for ``python -m kfc_ref bench
    optim``): per-iteration wall seconds of each part, the amortised KFC-pre/SGD ratio by wall
    clock and by CPU time, and the knobs used.  ``quick``: one repetition."""
    r = measure_overhead(batch_size, 1 if quick else reps, device=device, log=lambda _: None,
                         **options)
    out = {key: r[key] for key in ("batch_size", "reps", "stats_period", "inverse_period",
                                   "stats_fraction", "nu_fraction", "dtype", "device")}
    out.update({f"{key}_wall_s": value for key, value in r["wall"].items() if key != "ratio"})
    out.update(ratio_wall=r["wall"]["ratio"], ratio_cpu=r["cpu"]["ratio"])
    return out


def format_report(r: dict) -> str:
    w, c = r["wall"], r["cpu"]

    def row(label, key, note=""):
        return f"  {label:<34}{w[key]:9.3f} {c[key]:9.3f}{note}"

    lines = [
        f"KFC-pre vs SGD, CIFAR-10 net, batch {r['batch_size']}, {r['dtype']} on {r['device']} "
        f"(min of {r['reps']} iterations each):",
        f"  {'':<34}{'wall s':>9} {'cpu s':>9}",
        row("SGD iteration", "t_sgd"),
        row("KFC-pre iteration, no refresh", "t_plain"),
        row(f"  of which nu on {r['nu_fraction']:.3g} of the batch", "t_nu"),
        row(f"+ factor refresh (subset {r['stats_fraction']:.3g})", "t_stats",
            f"   every T_s = {r['stats_period']}"),
        row("+ inverse refresh", "t_inverse", f"   every T_f = {r['inverse_period']}"),
        row("KFC-pre amortised", "t_kfc_amortised"),
        row("ratio KFC-pre / SGD", "ratio", "   (target <= 1.5; App. B.3: < 2)"),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfc_ref bench optim",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 64, one repetition")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stats-period", type=int, default=STATS_PERIOD)
    parser.add_argument("--inverse-period", type=int, default=INVERSE_PERIOD)
    parser.add_argument("--stats-fraction", type=float, default=STATS_FRACTION)
    parser.add_argument("--nu-fraction", type=float, default=NU_FRACTION)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit BLAS threads (threadpoolctl), e.g. 1 on a shared machine")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    batch, reps = (64, 1) if args.quick else (args.batch_size, args.reps)
    if batch < 1 or reps < 1:
        parser.error(f"--batch-size={batch} and --reps={reps} must be >= 1")
    limit = contextlib.nullcontext()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=args.threads)
    with limit:
        result = measure_overhead(batch, reps, stats_period=args.stats_period,
                                  inverse_period=args.inverse_period,
                                  stats_fraction=args.stats_fraction,
                                  nu_fraction=args.nu_fraction, dtype=args.dtype,
                                  device=args.device)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
