"""The backend: namespace discovery, device errors, and the core path under a second namespace.

CI has no GPU, so ``guarded`` (tests/guarded_xp.py) stands in for CuPy: it refuses direct
``numpy.*`` calls on its arrays and arithmetic that mixes them with plain NumPy arrays.
"""
import numpy as np
import pytest

from kfc_ref import backend
from kfc_ref.backend import check_device, get_xp, to_numpy
from kfc_ref.curvature.damping import eigen_factors, factored_inverse
from kfc_ref.curvature.factors import network_factors
from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, ReLU, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm
from guarded_xp import GuardedArray, asguarded, guarded

# Same float64 arithmetic in a different library (cuBLAS/cuSOLVER may reorder sums).
RTOL = 1e-9


def _net():
    return Sequential([
        Conv2d(2, 3, 3, padding=1), MaxPool2d(3, 2, ceil_mode=True), ReLU(),
        ResponseNorm(3, 1.0, 0.75), Conv2d(3, 4, 3, padding=1), Tanh(),
        AvgPool2d(2, 1, ceil_mode=True), Dropout(0.2), Flatten(), Dense(16, 5)], (2, 7, 7))


def _run(net, params, x, y, seed):
    loss, grads, tape = net.loss_and_grads(params, x, y, train=True,
                                           rng=np.random.default_rng(seed))
    records = net.sampled_records(params, x, np.random.default_rng(seed + 1), tape=tape)
    factors = network_factors(records)
    out = {"loss": loss, "logits": tape.output, "theta": net.flatten(params)}
    out["grad"] = net.flatten(grads)
    out["jvp"] = net.jvp(params, tape, grads)
    for k, (f, i) in enumerate(zip(factors, net.param_layers)):
        out[f"Omega{k}"], out[f"Gamma{k}"] = f.Omega, f.Gamma
        out[f"fact{k}"] = factored_inverse(f.Omega, f.Gamma, 1e-3).apply(grads[i])
        out[f"eig{k}"] = eigen_factors(f.Omega, f.Gamma).apply(grads[i], 1e-3)
    return out


def _core_path_matches_numpy(to_device, seed=0):
    """The core path (forward, backward, forward-mode, sampled records, KFC factors, both
    dampings) runs in the module of ``to_device`` and returns the float64 NumPy results."""
    net = _net()
    host_params = net.init(seed, "float64")
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(4, 2, 7, 7)), rng.integers(0, 5, 4)
    ref = _run(net, host_params, x, y, seed)
    dev_params = [None if p is None else to_device(p) for p in host_params]
    got = _run(net, dev_params, to_device(x), to_device(y), seed)
    xp = get_xp(to_device(x))
    for key, value in got.items():
        if key != "loss":
            assert get_xp(value) is xp, f"{key} left the array module {xp.__name__}"
        np.testing.assert_allclose(to_numpy(value), to_numpy(ref[key]), rtol=RTOL,
                                   atol=RTOL, err_msg=key)


def test_core_path_runs_in_the_module_under_test(to_xp):
    """numpy, guarded or CuPy, as chosen by --xp (tests/conftest.py)."""
    _core_path_matches_numpy(to_xp)


def test_core_path_never_reaches_for_numpy_behind_the_namespace():
    """Always run (also under the default --xp numpy), so plain CI keeps the guard's proof."""
    _core_path_matches_numpy(asguarded)


def test_guard_is_a_working_negative_control():
    """The guard must catch the two mistakes it exists for."""
    a = asguarded(np.ones((2, 2)))
    with pytest.raises(TypeError, match="called directly"):
        np.sum(a)
    with pytest.raises(TypeError, match="mixed a guarded array"):
        a + np.ones((2, 2))
    with pytest.raises(TypeError, match="mixed a guarded array"):   # 0-d too, as CuPy 14
        a * np.asarray(2.0)
    with pytest.raises(TypeError, match="plain numpy array"):
        a[0, 0] = np.asarray(1.0)
    assert isinstance(a * np.float64(2.0), GuardedArray)          # NumPy scalars are fine
    assert isinstance(guarded.zeros((2,)), GuardedArray)
    assert get_xp(a) is guarded


def test_get_xp_rejects_mixed_modules_and_non_arrays():
    with pytest.raises(TypeError, match="different array modules"):
        get_xp(np.ones(2), asguarded(np.ones(2)))
    with pytest.raises(TypeError, match="expected an array"):
        get_xp("text")
    assert get_xp(None, 1.0, np.ones(1)) is np


def test_device_argument_is_validated():
    with pytest.raises(ValueError, match="device='tpu' is not supported"):
        check_device("tpu")
    reason = backend.gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is available here; the missing-GPU message cannot be exercised")
    with pytest.raises(RuntimeError, match="device='gpu' was requested but"):
        check_device("gpu")


def test_to_numpy_and_to_device_on_cpu():
    a = asguarded(np.arange(3.0))
    host = to_numpy(a)
    assert type(host) is np.ndarray and host.tolist() == [0.0, 1.0, 2.0]
    assert type(backend.to_device(a, "cpu")) is np.ndarray


@pytest.mark.slow
def test_the_device_tests_pass_on_the_guarded_namespace():
    """CI has no GPU: the suite's device-aware tests (those using the ``xp``/``to_xp``/``device``
    fixtures) run once more with ``--xp guarded``, the NumPy stand-in that refuses what CuPy
    refuses and that the ``device="gpu"`` paths are routed to.  Inside that run this test itself
    builds no arrays through the fixtures and is skipped, so it does not recurse."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--xp", "guarded", "-rN",
                           "-p", "no:cacheprovider", "-x"], cwd=root, capture_output=True,
                          text=True, timeout=600)
    tail = proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 50, tail   # the device-aware tests really ran
