"""GPU acceptance run for issue 12: one summary.json and one log.txt in one folder.

Steps, in order (each records status, seconds and its numbers; a failed step does not stop
the later ones, but the exit code is 1 if any step failed):

1. ``cupy``: CuPy version, device name, compute capability, memory;
2. ``suite``: ``pytest --xp cupy -m "not slow" -x -q`` (the whole suite on CuPy arrays);
3. ``check_float64`` / ``check_float32``: ``python -m kfc_ref check --device gpu --json``;
4. ``train_equivalence``: SGD, KFC-pre and K-FAC on the built-in digits set in float64, CPU vs
   GPU: final parameters and full-precision losses (recomputed on the host from the final
   parameters, not read from the rounded metrics.csv) agree to ``EQUIV_RTOL``;
   ``resume``: on the GPU, 4 + 2 iterations resumed equal 6 uninterrupted, bit for bit;
5. ``bench``: ``bench conv``/``curvature`` (JSON) and ``bench optim`` on GPU and CPU;
6. ``linalg``: eigh and inv seconds per factor size on the GPU vs one CPU thread
   (threadpoolctl), and the smallest size from which the GPU is faster.

``--device cpu`` (``--dry-run``) runs every step's logic on the CPU with tiny sizes: the suite
under ``--xp guarded`` on one module, checks and training on NumPy, so the script is tested by
tests/test_gpu_acceptance.py without a GPU.  No network, no optional dataset packages.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # this checkout's kfc_ref, not another installed copy
# Same float64 arithmetic on cuBLAS/cuSOLVER (other summation orders) for ~20 steps of a
# well-conditioned run: differences grow from ~1e-15 per step to well under 1e-8.
EQUIV_RTOL = 1e-8
OPTIMIZERS = (("sgd", {"lr": 0.05}), ("kfc-pre", {"lr": 0.01}), ("kfac", {}))


class Recorder:
    """Runs steps, writes summary.json after each one (a killed run keeps what it had)."""

    def __init__(self, out_dir: str, mode: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "summary.json")
        self.log = open(os.path.join(out_dir, "log.txt"), "w")
        self.summary = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()), "steps": []}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text.rstrip() + "\n")
        self.log.flush()

    def step(self, name: str, fn, *args) -> None:
        self.say(f"== {name}")
        t0 = time.perf_counter()
        try:
            numbers = fn(self, *args) or {}
            status = "failed" if numbers.pop("failed", False) else "ok"
        except Exception:
            self.say(traceback.format_exc())
            numbers, status = {}, "failed"
        row = {"name": name, "status": status,
               "seconds": round(time.perf_counter() - t0, 3), **numbers}
        self.summary["steps"].append(row)
        self.say(f"-- {name}: {status} in {row['seconds']} s")
        self.write()

    def write(self) -> None:
        self.summary["failed"] = [s["name"] for s in self.summary["steps"]
                                  if s["status"] != "ok"]
        with open(self.path, "w") as f:
            json.dump(self.summary, f, indent=1, default=float)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """A subprocess from the repository root; its output goes to the log."""
        self.say("$ " + " ".join(argv))
        env = {**os.environ, "MPLBACKEND": "Agg", "HYPOTHESIS_PROFILE": "ci"}
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        self.log.write(proc.stdout[-20000:] + proc.stderr[-5000:])
        self.log.flush()
        return proc


# --------------------------------------------------------------------------- steps
def step_cupy(rec, device):
    if device == "cpu":
        return {"numpy": np.__version__, "device": "cpu (dry run)"}
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    free, total = cupy.cuda.runtime.memGetInfo()
    out = {"cupy": cupy.__version__, "numpy": np.__version__,
           "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
           "device": props["name"].decode() if isinstance(props["name"], bytes)
           else str(props["name"]),
           "compute_capability": f"{props['major']}.{props['minor']}",
           "memory_gib": round(total / 2**30, 1)}
    rec.say(json.dumps(out))
    return out


def step_suite(rec, device):
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
            "-x", "-q", "-rs"]                  # -q once: the last line is the summary
    argv += (["--xp", "cupy", "-m", "not slow"] if device == "gpu"
             else ["--xp", "guarded", "tests/test_backend.py"])
    proc = rec.run(argv, timeout=420)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "result": last, "failed": proc.returncode != 0}


def step_check(rec, device, dtype):
    argv = [sys.executable, "-m", "kfc_ref", "check", "--device", device, "--dtype", dtype,
            "--json"]
    if device == "cpu":
        argv += ["--only", "damping.factored_solve"]
    proc = rec.run(argv, timeout=180)
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    bad = [r["name"] for r in rows if not r["passed"]]
    return {"returncode": proc.returncode, "checks": len(rows), "not_passed": bad,
            "failed": proc.returncode != 0 or bool(bad)}


def _train(device, optimizer, kw, out, iters, resume=False, max_train=512):
    from kfc_ref.experiments.train import TrainConfig, train
    cfg = TrainConfig(optimizer=optimizer, data="digits", device=device, dtype="float64",
                      out=out, iters=iters, eval_every=2, batch_size=64, seed=1,
                      max_train=max_train, max_test=128, quiet=True, **kw)
    return cfg, train(cfg)


def _host_loss(result):
    """Full-precision training loss of the final parameters, on the host."""
    from kfc_ref.backend import to_numpy
    from kfc_ref.experiments.train import evaluate
    params = [None if p is None else to_numpy(p) for p in result.params]
    data = result.dataset
    x, y = to_numpy(data.x_train), to_numpy(data.y_train)
    return evaluate(result.net, params, x, y)[0], result.net.flatten(params)


def step_train(rec, device, iters):
    numbers, failed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in OPTIMIZERS:
            losses, thetas = {}, {}
            for k, dev in enumerate(("cpu", device)):     # dry run: cpu twice
                _, res = _train(dev, name, kw, os.path.join(tmp, f"{name}-{k}"), iters)
                losses[dev], thetas[dev] = _host_loss(res)
            rel_loss = abs(losses["cpu"] - losses[device]) / abs(losses["cpu"])
            rel_theta = float(np.max(np.abs(thetas["cpu"] - thetas[device]))
                              / np.max(np.abs(thetas["cpu"])))
            ok = rel_loss <= EQUIV_RTOL and rel_theta <= EQUIV_RTOL
            failed |= not ok
            numbers[name] = {"loss_cpu": losses["cpu"], f"loss_{device}": losses[device],
                             "rel_loss_diff": rel_loss, "rel_theta_diff": rel_theta,
                             "ok": ok}
            rec.say(f"{name}: {numbers[name]}")
    return {**numbers, "iters": iters, "rtol": EQUIV_RTOL, "failed": failed}


def step_resume(rec, device, iters):
    from kfc_ref.experiments.train import train
    with tempfile.TemporaryDirectory() as tmp:
        _, full = _train(device, "kfc-pre", {"lr": 0.01}, os.path.join(tmp, "full"), iters)
        cfg, _ = _train(device, "kfc-pre", {"lr": 0.01}, os.path.join(tmp, "part"), iters - 2)
        cfg.iters = iters
        part = train(cfg, resume=True)
        a, b = _host_loss(full), _host_loss(part)
    same = a[0] == b[0] and bool(np.array_equal(a[1], b[1]))
    rec.say(f"resume: uninterrupted loss {a[0]!r}, resumed {b[0]!r}, identical={same}")
    return {"loss_uninterrupted": a[0], "loss_resumed": b[0], "identical": same,
            "failed": not same}


def _json_tail(text):
    return json.loads(text[text.index("{"):])


def step_bench(rec, device):
    from kfc_ref.experiments.bench.optim import bench_optim
    quick = ["--quick"] if device == "cpu" else []
    out, failed = {}, False
    for dev in dict.fromkeys((device, "cpu")):
        for name in ("conv", "curvature"):
            proc = rec.run([sys.executable, "-m", "kfc_ref", "bench", name, "--device", dev,
                            "--json", *quick], timeout=240)
            try:
                out[f"{name}_{dev}"] = _json_tail(proc.stdout)
            except ValueError:
                out[f"{name}_{dev}"], failed = {"error": proc.stderr[-500:]}, True
        t0 = time.perf_counter()
        if device == "cpu":                        # dry run: tiny batch
            out[f"optim_{dev}"] = bench_optim(dev, batch_size=8, quick=True)
        else:                                      # batch 512; one rep on the (slow) CPU
            out[f"optim_{dev}"] = bench_optim(dev, reps=3 if dev == "gpu" else 1)
        rec.say(f"bench optim {dev}: {time.perf_counter() - t0:.1f} s")
    return {**out, "failed": failed}


def _best_seconds(fn, a, xp, repeats):
    from kfc_ref.backend import synchronize
    fn(a)
    synchronize(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(a)
        synchronize(a)
        best = min(best, time.perf_counter() - t0)
    return best


def step_linalg(rec, device, sizes):
    from threadpoolctl import threadpool_limits
    from kfc_ref.backend import namespace_for
    xp = namespace_for(device)
    rows, crossover = [], {}
    for n in sizes:
        rng = np.random.default_rng(n)
        g = rng.standard_normal((n, 2 * n))
        host = g @ g.T / (2 * n) + 1e-3 * np.eye(n)    # a damped factor: SPD
        dev = xp.asarray(host)
        row = {"n": n}
        for op in ("eigh", "inv"):
            repeats = 3 if n <= 512 else 1
            with threadpool_limits(1):
                row[f"{op}_cpu1"] = _best_seconds(getattr(np.linalg, op), host, np, repeats)
            row[f"{op}_{device}"] = _best_seconds(getattr(xp.linalg, op), dev, xp, repeats)
            if op not in crossover and row[f"{op}_{device}"] < row[f"{op}_cpu1"]:
                crossover[op] = n
        rows.append(row)
        rec.say(json.dumps(row))
    return {"rows": rows, "device_faster_from_n": crossover}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                 "gpu_acceptance"))
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: a dry run of every step on NumPy with tiny sizes")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    dry = device == "cpu"
    rec = Recorder(args.out, "dry-run (cpu)" if dry else "gpu")
    rec.step("cupy", step_cupy, device)
    if not dry and rec.summary["steps"][-1]["status"] != "ok":
        rec.say("no usable CuPy/GPU: the remaining steps cannot run")
        rec.write()
        return 1
    rec.step("suite", step_suite, device)
    rec.step("check_float64", step_check, device, "float64")
    rec.step("check_float32", step_check, device, "float32")
    rec.step("train_equivalence", step_train, device, 2 if dry else 20)
    rec.step("resume", step_resume, device, 4 if dry else 10)
    rec.step("bench", step_bench, device)
    rec.step("linalg", step_linalg, device,
             (8, 16) if dry else (32, 64, 128, 256, 512, 1024, 2048))
    rec.summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rec.write()
    rec.say(f"failed steps: {rec.summary['failed'] or 'none'}; summary in {rec.path}")
    return 1 if rec.summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
