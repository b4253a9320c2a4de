"""Test bodies written once and run per array module (NumPy, the guarded namespace, CuPy).

Each body takes ``to_device`` (host array -> array of the module under test) and checks that
the core path (forward, backward, forward-mode, sampled records, KFC factors, both dampings)
runs in that module and returns the float64 NumPy results to ``RTOL``.
"""
from __future__ import annotations

import numpy as np

from kfc_ref.backend import get_xp, to_numpy
from kfc_ref.curvature.damping import eigen_factors, factored_inverse
from kfc_ref.curvature.factors import network_factors
from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, ReLU, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d, ResponseNorm

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


def core_path_matches_numpy(to_device, seed=0):
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
