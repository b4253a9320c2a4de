"""Kernel launches and host syncs per optimizer step on the CIFAR-10 net, counted on the CPU.

The tests' guarded namespace (tests/guarded_xp.py) stands in for a GPU: it counts every call that
would launch a kernel on CuPy and every device-to-host read.  Batch 8, float32, 12 steps, so
KFC-pre's factor (every T_s) and inverse (every T_f) refreshes show up.
Run from the repository root: ``python benchmarks/count_launches_syncs.py``.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from guarded_xp import asguarded, counting  # noqa: E402

from kfc_ref.nn.models import cifar10_convnet  # noqa: E402
from kfc_ref.optim import make_optimizer  # noqa: E402


def main(steps: int = 12) -> None:
    net = cifar10_convnet()
    params = [None if p is None else asguarded(p) for p in net.init(0, "float32")]
    rng = np.random.default_rng(0)
    x = asguarded(rng.normal(size=(8, 3, 32, 32)).astype(np.float32))
    y = asguarded(rng.integers(0, 10, 8))
    for name, hyper in [("sgd", {"lr": 0.01}), ("kfc-pre", {"lr": 0.001}), ("kfac", {})]:
        opt = make_optimizer(name, **hyper)
        state, p, counts = opt.init_state(net, params), params, []
        for _ in range(steps):
            with counting() as c:
                p, state, _info = opt.step(state, net, p, (x, y), rng)
            counts.append((c.launches, c.syncs))
        print(f"{name:8s} (launches, syncs) per step: {counts}")


if __name__ == "__main__":
    main()
