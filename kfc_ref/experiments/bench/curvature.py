"""Curvature benchmarks (``python -m kfc_ref bench curvature``).

* :func:`bench_exact_fisher`: time and peak host memory of ``fisher.true_fisher`` on a tiny
  conv net with P ~ 1,000 parameters, N = 256 examples and 10 classes (dense P x P result);
* :func:`ladder_report`: the approximation ladder (docs/ladder.md) on
  ``models.tiny_convnet()`` for its two conv layers.

Timings are wall-clock (best of ``repeats``) and depend on the machine and the BLAS; peak memory
is what ``tracemalloc`` sees (NumPy reports its allocations to it) in a separate, untimed run.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as _host_np  # host-side benchmark inputs

from kfc_ref.curvature.fisher import true_fisher
from kfc_ref.experiments.bench.cli import run_cli
from kfc_ref.theory.ladder import approximation_ladder, format_ladder
from kfc_ref.nn.models import tiny_convnet


def bench_exact_fisher(n: int = 256, num_classes: int = 10, input_shape=(1, 5, 5),
                       channels=(3, 4), seed: int = 0, repeats: int = 3) -> dict:
    """Time and peak memory of ``true_fisher`` (float64, CPU); prints and returns the figures."""
    net = tiny_convnet(input_shape, channels=channels, num_classes=num_classes)
    params = net.init(seed, "float64")
    x = _host_np.random.default_rng(seed).normal(size=(n,) + tuple(input_shape))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F = true_fisher(net, params, x)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    true_fisher(net, params, x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    P = net.num_params
    out = dict(num_params=P, n=n, num_classes=num_classes, seconds=min(times),
               peak_mib=peak / 2**20, result_mib=F.nbytes / 2**20)
    print(f"true_fisher: P = {P}, N = {n}, C = {num_classes}: {out['seconds']:.3f} s "
          f"(best of {repeats}), peak traced memory {out['peak_mib']:.1f} MiB "
          f"(the P x P result alone is {out['result_mib']:.1f} MiB)")
    return out


def ladder_report(n: int = 64, seed: int = 0, layers=(0, 2), damping: float = 1e-3) -> dict:
    """Ladder rows for the conv layers of ``tiny_convnet()`` on n standard-normal inputs."""
    net = tiny_convnet()
    params = net.init(seed, "float64")
    rng = _host_np.random.default_rng(seed)
    x = rng.normal(size=(n,) + net.input_shape)
    y = rng.integers(0, net.shapes[-1][0], n)
    out = {}
    for index in layers:
        ladder = approximation_ladder(net, params, x, y, index, damping)
        out[index] = ladder.rows
        print(f"layer {index} ({net.layers[index]!r}), N = {n}, damping {damping:g}, "
              f"||F||_F = {float(_host_np.linalg.norm(ladder.matrices['exact'])):.4g}")
        print(format_ladder(ladder))
    return out


def bench_kfc_statistics(device: str = "cpu", batch: int = 512, repeats: int = 3,
                         seed: int = 0) -> dict:
    """KFC statistics on the CIFAR-10 net vs one gradient evaluation, measured side by side.

    gradient: forward + backward with the true labels (``Sequential.loss_and_grads``);
    statistics: the extra backward pass with targets sampled from the model (reusing the
    gradient's forward tape) plus Omega and Gamma of every layer (Eq. 23).
    """
    from kfc_ref.backend import namespace_for, synchronize
    from kfc_ref.curvature.factors import network_factors
    from kfc_ref.nn.models import cifar10_convnet

    xp = namespace_for(device)
    net = cifar10_convnet()
    params = net.init(seed, "float32", device)
    rng = _host_np.random.default_rng(seed)
    x = xp.asarray(rng.normal(size=(batch, 3, 32, 32)), dtype="float32")
    y = xp.asarray(rng.integers(0, 10, batch))
    grad_times, stat_times = [], []
    for rep in range(repeats + 1):                       # the first round is a warm-up
        synchronize(x)
        t0 = time.perf_counter()
        _, _, tape = net.loss_and_grads(params, x, y)
        synchronize(x)
        t1 = time.perf_counter()
        network_factors(net.sampled_records(params, x, rng, tape=tape))
        synchronize(x)
        t2 = time.perf_counter()
        if rep:
            grad_times.append(t1 - t0)
            stat_times.append(t2 - t1)
    g, s = float(_host_np.median(grad_times)), float(_host_np.median(stat_times))
    out = dict(device=device, batch=batch, gradient_seconds=g, statistics_seconds=s,
               statistics_over_gradient=s / g)
    print(f"CIFAR-10 net, batch {batch}, {device}: gradient {g:.3f} s, KFC statistics "
          f"(extra backward + Omega, Gamma) {s:.3f} s = {s / g:.2f} x one gradient")
    return out


def bench_curvature(device: str = "cpu", batch: int = 512, repeats: int = 3,
                    quick: bool = False) -> dict:
    """Both curvature benchmarks of issue 3 (``python -m kfc_ref bench curvature``)."""
    stats = bench_kfc_statistics(device, batch, repeats)
    exact = bench_exact_fisher(n=16 if quick else 256, repeats=1 if quick else 3)
    return {**stats, **{f"exact_fisher_{k}": v for k, v in exact.items()}}


if __name__ == "__main__":
    bench_exact_fisher()
    ladder_report()


def main(argv=None) -> int:
    """``python -m kfc_ref bench curvature``."""
    return run_cli("curvature", "KFC statistics (Omega, Gamma of every layer) as a multiple of "
                   "one gradient evaluation; exact-Fisher time and memory.", argv,
                   lambda a: bench_curvature(a.device, a.batch or (8 if a.quick else 512),
                                             1 if a.quick else a.repeats, quick=a.quick))
