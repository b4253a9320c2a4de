"""Data-parallel cost per iteration: compute, bytes communicated and communication time.

    mpiexec -n P python -m kfc_ref bench distributed [--batch-size 512] [--iters 10]

Every rank trains the CIFAR-10 net on random data (the timings do not depend on the values)
with SGD and with KFC-pre (its default T_s and T_f), data-parallel over the P ranks
(:mod:`kfc_ref.optim.data_parallel`).  Reported per method, from rank 0, over ``--iters``
iterations after warm-up:

* the wall-clock seconds per iteration and the part spent inside the collectives (waiting for
  slower ranks included), per tag: "gradients" (every step), "factors" (every T_s), "nu"
  (every step with clipping), "inverses" (every T_f);
* the payload per call of each tag: the bytes of the packed buffer each rank contributes (a
  ring all-reduce moves 2 (P-1)/P of it in and out of every rank);
* compute = wall - communication.

Without ``mpiexec`` (or without mpi4py) it runs as one process, which still reports the
payloads a P-rank run would send.  The JSON (``--out``) feeds the cost model of
``python -m kfc_ref figures distributed-model`` (:mod:`kfc_ref.experiments.distributed_model`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as _host_np  # host-side random data

from kfc_ref.backend import namespace_for, synchronize
from kfc_ref.comm import LocalComm, MPIComm
from kfc_ref.experiments.checkpoint import atomic_write_text
from kfc_ref.nn.models import build_model
from kfc_ref.optim import make_optimizer


def communicator(device: str):
    """MPI's ranks when mpi4py is installed (one rank without mpiexec), else one process."""
    try:
        return MPIComm(device=device)
    except ImportError:
        return LocalComm()


def measure(method: str, comm, *, arch: str = "cifar10", batch_size: int = 512,
            iters: int = 10, warmup: int = 2, device: str = "cpu", seed: int = 0) -> dict:
    """Per-iteration wall, communication and compute seconds and payloads of ``method``."""
    xp = namespace_for(device)
    net = build_model(arch, (3, 32, 32), 10)
    rng = _host_np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((batch_size, 3, 32, 32)).astype("float32"))
    y = xp.asarray(rng.integers(0, 10, batch_size))
    params = net.init(seed, "float32", device)
    opt = make_optimizer(method, lr=1e-3).set_communicator(comm)
    step_rng = _host_np.random.default_rng(seed + 1)
    state = opt.init_state(net, params)
    if opt.factor_init_batches:
        state = opt.initialize_factors(state, net, params, [x], step_rng)
    for _ in range(warmup):
        params, state, _ = opt.step(state, net, params, (x, y), step_rng)
    comm.reset_stats()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        params, state, _ = opt.step(state, net, params, (x, y), step_rng)
    synchronize()
    wall = (time.perf_counter() - t0) / iters
    tags = {tag: {"calls_per_iteration": s.calls / iters,
                  "payload_bytes_per_call": s.payload_bytes / max(s.calls, 1),
                  "seconds_per_iteration": s.seconds / iters}
            for tag, s in sorted(comm.stats.items())}
    communication = sum(t["seconds_per_iteration"] for t in tags.values())
    out = {"wall_seconds_per_iteration": wall, "communication_seconds_per_iteration":
           communication, "compute_seconds_per_iteration": wall - communication, "tags": tags}
    if method == "kfc-pre":
        out.update(stats_period=opt.stats_period, inverse_period=opt.inverse_period)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kfc_ref bench distributed",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="run under mpiexec -n P for P ranks; e.g. mpiexec -n 2 "
                                       "python -m kfc_ref bench distributed --out p2.json")
    p.add_argument("--arch", default="cifar10", choices=("cifar10", "cifar10-avg"))
    p.add_argument("--batch-size", type=int, default=512, help="global mini-batch (N)")
    p.add_argument("--iters", type=int, default=10,
                   help="timed iterations (10 covers KFC-pre's default T_s = 5 and T_f = 10)")
    p.add_argument("--methods", default="sgd,kfc-pre")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", help="write the JSON here (rank 0)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in ("sgd", "kfc-pre")]
    if bad or args.batch_size < 1 or args.iters < 1:
        print(f"error: --methods must list sgd and/or kfc-pre (got {bad}); --batch-size and "
              "--iters must be >= 1", file=sys.stderr)
        return 2
    comm = communicator(args.device)
    if args.batch_size < comm.size:
        print(f"error: --batch-size {args.batch_size} is smaller than the {comm.size} ranks",
              file=sys.stderr)
        return 2
    result = {"ranks": comm.size, "batch_size": args.batch_size, "arch": args.arch,
              "device": args.device, "device_path": comm.device_path, "iters": args.iters,
              "methods": {m: measure(m, comm, arch=args.arch, batch_size=args.batch_size,
                                     iters=args.iters, device=args.device) for m in methods}}
    if comm.rank == 0:
        text = json.dumps(result, indent=2)
        if args.out:
            atomic_write_text(args.out, text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
