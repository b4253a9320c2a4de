"""The backend: namespace discovery, device errors, and the core path under a second namespace.

CI has no GPU, so ``guarded`` (tests/guarded_xp.py) stands in for CuPy: it refuses direct
``numpy.*`` calls on its arrays and arithmetic that mixes them with plain NumPy arrays.
"""
import numpy as np
import pytest

from kfc_ref import backend
from kfc_ref.backend import check_device, get_xp, to_numpy
from backend_cases import core_path_matches_numpy
from guarded_xp import GuardedArray, asguarded, guarded


def test_core_path_runs_in_numpy():
    core_path_matches_numpy(np.asarray)


def test_core_path_never_reaches_for_numpy_behind_the_namespace():
    core_path_matches_numpy(asguarded)


def test_guard_is_a_working_negative_control():
    """The guard must catch the two mistakes it exists for."""
    a = asguarded(np.ones((2, 2)))
    with pytest.raises(TypeError, match="called directly"):
        np.sum(a)
    with pytest.raises(TypeError, match="mixed a guarded array"):
        a + np.ones((2, 2))
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
