"""Shared pytest configuration: hypothesis profiles and the array module under test.

Profiles: ``dev`` (default, random, 30 examples) and ``ci`` (derandomized, no deadline,
selected by ``HYPOTHESIS_PROFILE=ci`` as .ci/run does).

Array module (in the manner of SciPy's array-backend testing): ``--xp numpy|guarded|cupy``
or the environment variable ``KFC_REF_TEST_XP`` (default ``numpy``) chooses the module whose
arrays the tests build, through these fixtures:

* ``xp``: the module (numpy, ``guarded_xp.guarded``, or cupy);
* ``to_xp(host_array)``: a host NumPy array moved into that module (None passes through);
* ``device``: the device string for APIs that take one ('cpu' for numpy, 'gpu' otherwise;
  under ``guarded`` every ``namespace_for('gpu')`` in kfc_ref answers the guarded namespace,
  so ``--device gpu`` code paths run on this CPU without CuPy);
* ``module_device``: the same for module-scoped fixtures (one patch held per module).

Tests keep their NumPy assertions: results come back with ``kfc_ref.backend.to_numpy``.

Under a non-numpy module, tests marked ``host_only`` (file readers, CLI parsing, notebooks,
docs, packaging) and tests that request none of these fixtures skip with a reason, so the
skip summary lists what does not run on the device.  ``--xp cupy`` without CuPy or a CUDA
device skips everything with the reason instead of failing.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

XP_CHOICES = ("numpy", "guarded", "cupy")
ARRAY_FIXTURES = {"xp", "to_xp", "device", "module_device"}


def pytest_addoption(parser):
    parser.addoption(
        "--xp", choices=XP_CHOICES, default=os.environ.get("KFC_REF_TEST_XP", "numpy"),
        help="array module the tests run on (default: $KFC_REF_TEST_XP or numpy)")


def _xp_name(config) -> str:
    name = config.getoption("--xp")
    if name not in XP_CHOICES:                 # a bad KFC_REF_TEST_XP is not seen by argparse
        raise pytest.UsageError(f"KFC_REF_TEST_XP={name!r}; use one of {XP_CHOICES}")
    return name


def pytest_report_header(config):
    return f"kfc_ref array module under test (--xp): {_xp_name(config)}"


def pytest_collection_modifyitems(config, items):
    name = _xp_name(config)
    if name == "numpy":
        return
    if name == "cupy":
        from kfc_ref.backend import gpu_unavailable_reason
        reason = gpu_unavailable_reason()
        if reason is not None:
            skip = pytest.mark.skip(reason=f"--xp cupy: {reason}")
            for item in items:
                item.add_marker(skip)
            return
    for item in items:
        marker = item.get_closest_marker("host_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "host-side code"
            item.add_marker(pytest.mark.skip(reason=f"host only under --xp {name}: {why}"))
        elif not ARRAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.skip(
                reason=f"--xp {name}: builds no arrays through the xp fixtures "
                       "(runs under --xp numpy)"))


@pytest.fixture(scope="session")
def xp_name(request) -> str:
    return _xp_name(request.config)


@pytest.fixture(scope="session")
def xp(xp_name):
    """The array module under test."""
    if xp_name == "numpy":
        return np
    if xp_name == "guarded":
        from guarded_xp import guarded
        return guarded
    import cupy
    return cupy


@pytest.fixture(scope="session")
def to_xp(xp_name):
    """``to_xp(host_array)`` -> the array in the module under test (None passes through)."""
    if xp_name == "numpy":
        move = np.asarray
    elif xp_name == "guarded":
        from guarded_xp import asguarded as move
    else:
        import cupy
        move = cupy.asarray

    def convert(a):
        return None if a is None else move(a)
    return convert


def _pretend_gpu(monkeypatch):
    """Make every ``namespace_for('gpu')``/``check_device('gpu')`` in kfc_ref answer the
    guarded namespace, so --device gpu paths run on a machine without CuPy."""
    from guarded_xp import guarded
    from kfc_ref import backend

    real_ns, real_check = backend.namespace_for, backend.check_device

    def check_device(device):
        return device if device == "gpu" else real_check(device)

    def namespace_for(device):
        return guarded if check_device(device) == "gpu" else real_ns(device)

    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("kfc_ref"):
            continue
        if getattr(mod, "namespace_for", None) is real_ns:
            monkeypatch.setattr(mod, "namespace_for", namespace_for)
        if getattr(mod, "check_device", None) is real_check:
            monkeypatch.setattr(mod, "check_device", check_device)


def _enter_device(xp_name, monkeypatch) -> str:
    """The device string for --xp ``xp_name``, patching kfc_ref through ``monkeypatch`` under
    guarded so that 'gpu' answers the guarded namespace."""
    if xp_name == "numpy":
        return "cpu"
    if xp_name == "guarded":
        _import_device_users()
        _pretend_gpu(monkeypatch)
    return "gpu"


@pytest.fixture
def device(xp_name, monkeypatch) -> str:
    """The device string for APIs that take one: 'cpu' under numpy, else 'gpu'."""
    return _enter_device(xp_name, monkeypatch)


@pytest.fixture(scope="module")
def module_device(xp_name, xp):
    """``device`` for module-scoped fixtures (``device`` is per test): the same string, with
    the guarded patch held for the whole module."""
    with pytest.MonkeyPatch.context() as patch:
        yield _enter_device(xp_name, patch)


def _import_device_users():
    """Import the modules that bind ``namespace_for``/``check_device`` before patching them
    (one imported while patched would keep the stand-in after the test)."""
    import importlib
    for name in ("kfc_ref.nn.network", "kfc_ref.experiments.train",
                 "kfc_ref.experiments.checks", "kfc_ref.experiments.config",
                 "kfc_ref.experiments.figures", "kfc_ref.experiments.sud_report",
                 "kfc_ref.experiments.bench.cli", "kfc_ref.experiments.bench.conv",
                 "kfc_ref.experiments.bench.optim", "kfc_ref.experiments.bench.distributed"):
        importlib.import_module(name)
