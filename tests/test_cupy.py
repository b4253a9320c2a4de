"""The same test bodies as tests/test_backend.py, run on CuPy (skipped without CuPy or GPU)."""
import pytest

from kfc_ref import backend
from backend_cases import core_path_matches_numpy

_reason = backend.gpu_unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_reason is not None, reason=f"no GPU: {_reason}")]


def test_core_path_runs_on_cupy():
    core_path_matches_numpy(lambda a: backend.to_device(a, "gpu"))
