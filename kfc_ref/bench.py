"""Benchmarks (``python -m kfc_ref bench <name>``): ratios measured side by side in one run.

* ``conv``: forward+backward of the CIFAR-10 net at batch 128 (float32); achieved GFLOP/s of the
  conv and dense layers (6 N |T| K I flops per layer: forward, weight gradient, input gradient)
  as a fraction of the machine's own float32 matmul GFLOP/s measured in the same run.
* ``curvature``: the KFC statistics (Omega and Gamma of every layer, including the extra backward
  pass with sampled targets) on the CIFAR-10 net as a multiple of one gradient evaluation on the
  same batch, and the exact true Fisher of a tiny net (time and peak memory).
* ``optim``: per-iteration wall-clock of KFC-pre over SGD on the CIFAR-10 net.

Timings are medians over repeats after a warm-up; nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from kfc_ref.backend import namespace_for, synchronize
from kfc_ref.models import cifar10_convnet


def _median_time(fn, repeats: int, sync_on=None) -> float:
    fn()
    synchronize(sync_on)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(sync_on)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_gflops(xp, dtype="float32", size: int = 2048, repeats: int = 5) -> float:
    """The machine's own matmul rate: 2 n^3 flops per n x n product."""
    a = xp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype=dtype)
    b = xp.asarray(np.random.default_rng(1).normal(size=(size, size)), dtype=dtype)
    t = _median_time(lambda: a @ b, repeats, a)
    return 2 * size ** 3 / t / 1e9


def network_flops(net, batch: int) -> float:
    """6 N |T| K I per conv/dense layer (K = 1 + J|Delta| columns of [[A]]_H)."""
    total = 0.0
    for i in net.param_layers:
        rows, cols = net.layers[i].param_shape
        out_shape = net.shapes[i + 1]
        locations = out_shape[1] * out_shape[2] if len(out_shape) == 3 else 1
        total += 6.0 * batch * locations * cols * rows
    return total


def bench_conv(device="cpu", batch=128, repeats=5) -> dict:
    """Forward+backward GFLOP/s of the CIFAR-10 net vs the matmul GFLOP/s, same run."""
    from kfc_ref.losses import softmax_cross_entropy

    xp = namespace_for(device)
    net = cifar10_convnet()
    params = net.init(0, "float32", device)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.normal(size=(batch, 3, 32, 32)), dtype="float32")
    y = xp.asarray(rng.integers(0, 10, batch))

    def step():
        tape = net.forward(params, x, check=False)
        _, dlogits = softmax_cross_entropy(tape.output, y)
        net.backward(params, tape, dlogits)

    t = _median_time(step, repeats, x)
    gflops = network_flops(net, batch) / t / 1e9
    peak = matmul_gflops(xp)
    return {"benchmark": "conv", "device": device, "batch": batch, "seconds_per_step": t,
            "net_gflops": gflops, "matmul_gflops": peak, "fraction_of_matmul": gflops / peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kfc_ref bench",
        description="Benchmarks that report ratios measured side by side in one run.")
    parser.add_argument("name", choices=["conv", "curvature", "optim"],
                        help="conv: net GFLOP/s vs matmul GFLOP/s; curvature: KFC statistics "
                             "vs one gradient, exact Fisher cost; optim: KFC-pre vs SGD")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=None,
                        help="mini-batch size (default: 128 for conv, 512 otherwise)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    try:
        namespace_for(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.name == "conv":
        result = bench_conv(args.device, args.batch or (8 if args.quick else 128),
                            1 if args.quick else args.repeats)
    elif args.name == "curvature":
        from kfc_ref.bench_curvature import bench_curvature
        result = bench_curvature(args.device, args.batch or (8 if args.quick else 512),
                                 1 if args.quick else args.repeats, quick=args.quick)
    else:
        from kfc_ref.bench_optim import bench_optim
        result = bench_optim(args.device, args.batch or (8 if args.quick else 512),
                             quick=args.quick)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
