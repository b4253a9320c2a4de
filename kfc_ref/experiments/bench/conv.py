"""``bench conv``: forward+backward of the CIFAR-10 net at batch 128 (float32).

The achieved GFLOP/s of the conv and dense layers (6 N |T| K I flops per layer: forward, weight
gradient, input gradient) as a fraction of the machine's own float32 matmul GFLOP/s measured in
the same run.  Timings are medians over repeats after a warm-up; nothing here is a test.
``--profile`` adds the per-stage times (each layer's forward and backward, the loss) of the same
step, run layer by layer exactly as :class:`~kfc_ref.nn.network.Sequential` runs it.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from kfc_ref.backend import namespace_for, synchronize
from kfc_ref.experiments.bench.cli import run_cli
from kfc_ref.nn.models import cifar10_convnet


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


def profile_stages(net, params, x, y, repeats: int) -> dict:
    """Median milliseconds per stage of one forward+backward step: ``"<i> <Layer> fwd"``,
    ``"<i> <Layer> bwd"`` and ``"loss"``; the layers run in the network's own layout and with
    its own first-layer shortcut (through ``Sequential.forward``/``backward`` on one-layer
    slices of the tape)."""
    from kfc_ref.nn.losses import softmax_cross_entropy
    from kfc_ref.nn.network import stage_runner

    times: dict[str, list] = {}

    def record(name, fn):
        synchronize(x)
        t0 = time.perf_counter()
        out = fn()
        synchronize(x)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(repeats + 1):
        run = stage_runner(net, params, x)
        for i, layer in enumerate(net.layers):
            record(f"{i:2d} {type(layer).__name__} fwd", run.forward_next)
        _, dlogits = record("loss", lambda run=run: softmax_cross_entropy(run.output(), y))
        run.start_backward(dlogits)
        for i in range(len(net.layers) - 1, -1, -1):
            record(f"{i:2d} {type(net.layers[i]).__name__} bwd", run.backward_next)
    return {k: 1e3 * float(np.median(v[1:])) for k, v in times.items()}


def bench_conv(device="cpu", batch=128, repeats=5, profile: bool = False) -> dict:
    """Forward+backward GFLOP/s of the CIFAR-10 net vs the matmul GFLOP/s, same run."""
    from kfc_ref.nn.losses import softmax_cross_entropy

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
    result = {"benchmark": "conv", "device": device, "batch": batch, "seconds_per_step": t,
              "net_gflops": gflops, "matmul_gflops": peak, "fraction_of_matmul": gflops / peak}
    if profile:
        result.update({f"ms {k}": v for k, v in
                       profile_stages(net, params, x, y, repeats).items()})
    return result


def main(argv=None) -> int:
    """``python -m kfc_ref bench conv``."""
    return run_cli("conv", "Forward+backward GFLOP/s of the CIFAR-10 net as a fraction of this "
                   "machine's float32 matmul GFLOP/s, measured in the same run.", argv,
                   lambda a: bench_conv(a.device, a.batch or (8 if a.quick else 128),
                                        1 if a.quick else a.repeats, a.profile),
                   extra=[(("--profile",), {"action": "store_true",
                                            "help": "add per-stage milliseconds"})])


if __name__ == "__main__":
    sys.exit(main())
