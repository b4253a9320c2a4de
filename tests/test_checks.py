"""The `python -m kfc_ref check` command, run in-process: exit codes, JSON schema, a deliberately
broken check, bad arguments, the GPU message, and the dispatcher."""
import json

import numpy as np
import pytest

from kfc_ref import __main__ as dispatcher
from kfc_ref.experiments import checks
from kfc_ref.backend import gpu_unavailable_reason

checks.load_checks()

#: Checks fast enough to run on every test invocation of the CLI paths below.
QUICK = ["damping.factored_solve", "theorem3.kfc_invariant", "control.sgd_not_invariant"]


def run_json(capsys, *args):
    code = checks.main(["--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_all_checks_pass_at_seed_0_float64(capsys, device):
    code, results = run_json(capsys, "--seed", "0", "--device", device)
    assert code == 0, [r for r in results if not r["passed"]]
    assert [r["name"] for r in results] == list(checks.REGISTRY)
    expected = {"damping.pi_argmin", "damping.factored_solve", "damping.exact_solve",
                "conventions.flat_gradient", "theorem3.same_function", "theorem3.kfc_invariant",
                "theorem3.kfc_invariant_padded", "theorem3.damped_orthogonal",
                "control.sgd_not_invariant", "control.diagonal_fisher_not_invariant",
                "control.damped_kfc_not_invariant", "theorem1.exact",
                "control.theorem1_without_sud", "theorem2.beta_construction",
                "control.plugin_not_psd", "theorem2.gram_psd", "theorem2.kfac_1x1",
                "fisher.mc_unbiased", "control.mc_biased_sampler", "estimators.omega_exact",
                "estimators.gamma_unbiased", "control.gamma_without_1_over_T",
                "control.omega_divided_by_T"}
    assert expected <= set(checks.REGISTRY)


def test_all_checks_pass_in_float32(capsys, device):
    code, results = run_json(capsys, "--seed", "1", "--dtype", "float32", "--device", device)
    assert code == 0, [r for r in results if not r["passed"]]


def test_json_schema(capsys, device):
    """On a device too: errors are Python floats read back, not device scalars."""
    code, results = run_json(capsys, "--only", *QUICK, "--device", device)
    assert code == 0 and len(results) == len(QUICK)
    for r in results:
        assert {"name", "error", "tolerance", "passed", "expect", "detail"} <= set(r)
        assert isinstance(r["name"], str) and isinstance(r["passed"], bool)
        assert isinstance(r["error"], float) and isinstance(r["tolerance"], float)
        assert r["expect"] in ("below", "above")
        assert r["passed"] == ((r["error"] <= r["tolerance"]) if r["expect"] == "below"
                               else (r["error"] >= r["tolerance"]))


def test_same_seed_same_cases_other_seed_other_cases(capsys, device):
    _, a = run_json(capsys, "--only", *QUICK, "--seed", "3", "--device", device)
    _, b = run_json(capsys, "--only", *QUICK, "--seed", "3", "--device", device)
    _, c = run_json(capsys, "--only", *QUICK, "--seed", "4", "--device", device)
    assert [r["error"] for r in a] == [r["error"] for r in b]
    assert [r["error"] for r in a] != [r["error"] for r in c]


def test_table_output(capsys, device):
    assert checks.main(["--only", *QUICK, "--device", device]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "tolerance" in out and "3/3 checks passed" in out
    assert ">=" in out and "<=" in out


def test_a_broken_check_makes_the_exit_code_1(capsys, monkeypatch, device):
    registry = dict(checks.REGISTRY)

    def broken(rng, dtype, xp):
        return checks.measured("broken.equality", 1.0, {"float64": 1e-8, "float32": 1e-4},
                               dtype, "deliberately wrong")

    def crashing(rng, dtype, xp):
        raise ArithmeticError("boom")

    registry["broken.equality"] = checks.Check("broken.equality", broken, "always fails")
    registry["broken.crash"] = checks.Check("broken.crash", crashing, "always raises")
    monkeypatch.setattr(checks, "REGISTRY", registry)
    code, results = run_json(capsys, "--only", "damping.exact_solve", "broken.equality",
                             "broken.crash", "--device", device)
    assert code == 1
    by_name = {r["name"]: r for r in results}
    assert by_name["damping.exact_solve"]["passed"]
    assert not by_name["broken.equality"]["passed"]
    crash = by_name["broken.crash"]
    assert not crash["passed"] and crash["error"] is None
    assert "ArithmeticError: boom" in crash["detail"]
    assert checks.main(["--only", "broken.equality", "--device", device]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.host_only("measured() compares Python floats")
def test_a_negative_control_that_stops_failing_is_reported():
    res = checks.measured("control.x", 1e-15, {"float64": 1e-2}, "float64", expect="above")
    assert not res.passed
    assert not checks.measured("eq.x", float("nan"), {"float64": 1.0}, "float64").passed


@pytest.mark.parametrize("args", [["--dtype", "float16"], ["--seed", "zero"],
                                  ["--only", "no.such.check"], ["--frobnicate"],
                                  ["--device", "tpu"]])
@pytest.mark.host_only("CLI argument parsing")
def test_bad_arguments_exit_2(capsys, args):
    assert checks.main(args) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.host_only("CLI help text")
def test_help_exits_0_and_lists_checks(capsys):
    assert checks.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "--json" in out and "exit status" in out
    assert all(name in out for name in checks.REGISTRY)


@pytest.mark.host_only("the message for a machine without CuPy")
@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is available here")
def test_gpu_without_cupy_exits_2_with_the_backend_message(capsys):
    assert checks.main(["--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "device='gpu' was requested but" in err and gpu_unavailable_reason() in err


def test_dispatcher_routes_check(capsys, device):
    assert dispatcher.main(["check", "--only", "damping.factored_solve", "--device",
                            device]) == 0
    assert "damping.factored_solve" in capsys.readouterr().out


@pytest.mark.host_only("registry bookkeeping, no arrays")
def test_registering_a_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        checks.register("damping.exact_solve", "dup")(lambda rng, dtype, xp: None)


@pytest.mark.host_only("argument validation, no arrays")
def test_run_checks_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype='float16' is not allowed"):
        checks.run_checks(0, "float16")


@pytest.mark.host_only("check_rng is the host random generator of the cases")
def test_check_rng_depends_on_seed_and_name():
    a = checks.check_rng(0, "x").random()
    assert a == checks.check_rng(0, "x").random()
    assert a != checks.check_rng(0, "y").random() and a != checks.check_rng(1, "x").random()
    assert isinstance(checks.check_rng(0, "x"), np.random.Generator)


def test_every_check_runs_in_a_second_array_namespace(xp, xp_name):
    """The guarded NumPy namespace (tests/guarded_xp.py) refuses host NumPy behind its back,
    as CuPy would: every check, hence invariance.py and the curvature code it calls, must pass."""
    from guarded_xp import guarded
    ns = guarded if xp_name == "numpy" else xp           # under --xp cupy: CuPy itself
    for name, check in checks.REGISTRY.items():
        res = check.func(checks.check_rng(0, name), "float64", ns)
        assert res.passed, res


def test_all_checks_pass_on_the_device(capsys, device):
    """`check --device` on the --xp module's device (cpu, the guarded stand-in, or the GPU)."""
    for dtype in ("float64", "float32"):
        code, results = run_json(capsys, "--device", device, "--dtype", dtype)
        assert code == 0, [r for r in results if not r["passed"]]


@pytest.mark.host_only("CLI argument parsing")
def test_check_refuses_a_negative_seed(capsys):
    with pytest.raises(SystemExit) as exc:
        dispatcher.main(["check", "--seed", "-1"])
    assert exc.value.code == 2 and "--seed must be an integer >= 0" in capsys.readouterr().err
