"""The figures command in quick mode: every figure function writes non-empty PNG and PDF files,
and the numbers drawn are the ones the paper's statements predict (Theorem 3 over a trajectory,
the ladder and the damping sweep agreeing, pooling's effect on derivative correlations).

One quick computation on the 8x8 digits (module fixture, a few seconds) feeds every test.
"""
import os

import numpy as np
import pytest

from conftest import _import_device_users, _pretend_gpu
from kfc_ref.backend import to_numpy
from kfc_ref.experiments import studies as ex
from kfc_ref.experiments import figures
from kfc_ref.experiments import plotting
from kfc_ref.curvature.fisher import exact_layer_factors
from kfc_ref.theory.invariance import dagger_network, dagger_params, function_discrepancy

#: Undamped KFC on N and on its whitened twin stay together to round-off amplified by the
#: factors' condition numbers over a few steps (measured <= 2e-13 in float64).
INVARIANCE_GAP_TOL = 1e-8
#: SGD on the whitened twin must visibly leave the original trajectory (measured >= 1).
SGD_GAP_MIN = 1e-2
#: The ladder's dense solve and the sweep's eigen solve of the same damped KFC block agree to
#: round-off in the angle (both float64, 84 x 84).
ANGLE_AGREEMENT_DEG = 1e-6
#: Lemma 2 / whitening: the reparameterised net computes the same function (float64 solves).
SAME_FUNCTION_TOL = 1e-10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("sud_derivatives", "sud_activations", "sud_summary", "exact_vs_kfc", "ladder",
         "training", "damping", "invariance")


@pytest.fixture(scope="module")
def module_device(xp_name, xp):
    """conftest's ``device`` for module-scoped fixtures (that one is per test): 'cpu' under
    --xp numpy, else 'gpu' (the guarded stand-in under --xp guarded, patched for the module)."""
    if xp_name == "numpy":
        yield "cpu"
        return
    with pytest.MonkeyPatch.context() as patch:
        if xp_name == "guarded":
            _import_device_users()
            _pretend_gpu(patch)
        yield "gpu"


@pytest.fixture(scope="module")
def results(tmp_path_factory, module_device):
    """compute_all on the --xp device (its training runs and SUD analysis run there)."""
    runs = tmp_path_factory.mktemp("runs")
    return figures.compute_all("digits", quick=True, runs_dir=str(runs), quiet=True,
                               device=module_device)


def _assert_images(paths):
    assert paths, "the figure function wrote nothing"
    for path in paths:
        assert os.path.getsize(path) > 1000, f"{path} is (nearly) empty"
        if path.endswith(".png"):
            with open(path, "rb") as fh:
                assert fh.read(8) == PNG_MAGIC, f"{path} is not a PNG"
        else:
            with open(path, "rb") as fh:
                assert fh.read(5) == b"%PDF-", f"{path} is not a PDF"


@pytest.fixture(scope="module")
def drawn(results, tmp_path_factory):
    """{figure function name: paths it wrote}, all into one folder (as ``draw_all`` does)."""
    out = str(tmp_path_factory.mktemp("figures"))
    return {fig.__name__: fig(results, out) for fig in figures.FIGURES}


@pytest.mark.slow
@pytest.mark.parametrize("figure", figures.FIGURES, ids=lambda f: f.__name__)
def test_every_figure_function_writes_png_and_pdf(drawn, figure):
    paths = drawn[figure.__name__]
    _assert_images(paths)
    assert {os.path.splitext(p)[1] for p in paths} == {".png", ".pdf"}


@pytest.mark.slow
def test_the_figures_have_the_documented_names(drawn):
    written = {os.path.basename(p) for paths in drawn.values() for p in paths}
    assert written == {f"{n}.{ext}" for n in NAMES for ext in ("png", "pdf")}


def test_kfc_trajectories_coincide_and_sgd_ones_do_not(results):
    gaps = results.invariance.gaps
    assert max(gaps["KFC (undamped)"]) < INVARIANCE_GAP_TOL
    assert gaps["SGD"][-1] > SGD_GAP_MIN                       # negative control
    losses = results.invariance.losses
    assert losses["KFC (undamped)"][-1] < losses["KFC (undamped)"][0]   # it does train


def test_whitening_reparameterisation_whitens_and_keeps_the_function(to_xp):
    rng = np.random.default_rng(0)
    x = to_xp(rng.normal(1.0, 2.0, size=(40, 1, 8, 8)))
    net = ex.invariance_net((1, 8, 8), 4)
    params = [None if p is None else to_xp(p) for p in net.init(0, "float64")]
    reparam = ex.whitening_reparameterization(net, params, x)
    net_d, params_d = dagger_network(net, reparam), dagger_params(net, params, reparam)
    assert function_discrepancy(net, params, net_d, params_d, x) < SAME_FUNCTION_TOL
    # inside N-dagger the first tanh output (after its affine map) is centred and white
    a = to_numpy(net_d.layer_inputs(params_d, x)[3])            # after AffineWrapped(tanh)
    flat = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(flat.T, bias=True), np.eye(a.shape[1]), atol=1e-8)


def test_ladder_and_damping_sweep_agree_at_the_ladder_damping(results):
    sweep, ladder = results.damping, results.ladder
    k = int(np.argmin(np.abs(np.log(sweep.dampings / ladder.damping))))
    assert np.isclose(sweep.dampings[k], ladder.damping)
    kfc = next(r for r in ladder.rows if r.name == "KFC")
    assert abs(sweep.exact_vs_fisher_angle[k] - kfc.angle_deg) < ANGLE_AGREEMENT_DEG


def test_ladder_kfc_rung_is_the_exact_layer_factors(results, to_xp):
    """The quick tiny problem (trained on the host), its ladder on the --xp module."""
    host = ex.tiny_problem(results.runs["sgd"].dataset, ex.QUICK, seed=0)
    problem = ex.TinyProblem(host.net, [to_xp(p) for p in host.params], to_xp(host.x),
                             to_xp(host.y), host.layer_index)
    ladder = ex.exact_vs_kfc(problem, ex.QUICK.ladder_examples)
    fac = exact_layer_factors(problem.net, problem.params, problem.x[:ex.QUICK.ladder_examples],
                              problem.layer_index)
    np.testing.assert_allclose(to_numpy(ladder.matrices["KFC"]),
                               np.kron(to_numpy(fac.Omega), to_numpy(fac.Gamma)),
                               rtol=1e-10, atol=1e-14)


def test_average_pooling_correlates_derivatives_more_than_max_pooling(results):
    """App. D.1's finding, on our quick runs: per conv layer the mean off-centre |correlation|
    of the derivatives is larger with average pooling (measured 3x or more on digits)."""
    for mx, av in zip(results.sud["max"], results.sud["avg"]):
        assert av.derivative_summary > mx.derivative_summary


def test_damping_sweep_factored_and_exact_agree_for_large_damping(results):
    """For gamma >> the factors' eigenvalues both damped solves approach g / gamma, so the
    angle between them shrinks (here from the middle of the sweep to its largest gamma)."""
    d = results.damping
    assert d.factored_vs_exact_angle[-1] < d.factored_vs_exact_angle[len(d.dampings) // 2]
    assert np.all(np.isfinite(d.factored_vs_exact_error))


@pytest.mark.host_only("plots host values")
def test_plotting_skips_missing_values(tmp_path):
    rows = [{"iteration": 1, "wall_seconds": 0.5, "train_loss": 2.0, "train_error": 0.8,
             "test_loss": None, "test_error": None},
            {"iteration": 2, "wall_seconds": 1.0, "train_loss": 1.0, "train_error": 0.5,
             "test_loss": 1.2, "test_error": 0.6}]
    _assert_images(plotting.plot_training_curves({"sgd": rows}, "t", str(tmp_path), "curves"))


@pytest.mark.host_only("plots host panels")
def test_correlation_panels_pick_defined_maps(tmp_path):
    auto = np.zeros((4, 5, 5))
    auto[:, 2, 2] = 1.0
    auto[1] = np.nan                                            # a dead map
    _assert_images(plotting.plot_correlation_panels([("l", auto, np.eye(4))], "t",
                                                    str(tmp_path), "panels", maps=3))


@pytest.mark.host_only("CLI argument check")
def test_cli_rejects_a_file_dataset_without_data_dir(tmp_path, capsys):
    assert figures.main(["--quick", "--data", "cifar10", "--out", str(tmp_path)]) == 2
    assert "data_dir" in capsys.readouterr().err


@pytest.mark.host_only("shrink_images resizes host dataset images")
def test_shrink_images_sizes():
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    assert ex.shrink_images(x).shape == (2, 1, 7, 7)
    assert ex.shrink_images(np.zeros((2, 3, 32, 32))).shape == (2, 3, 8, 8)
    assert ex.shrink_images(np.zeros((2, 1, 8, 8))).shape == (2, 1, 8, 8)


@pytest.mark.host_only("bookkeeping of a stubbed training run, no arrays")
def test_training_run_keeps_the_log_of_a_diverged_run(tmp_path, monkeypatch):
    import kfc_ref.experiments.train as train_module

    def exploding(cfg):
        os.makedirs(cfg.out, exist_ok=True)
        train_module.write_metrics(os.path.join(cfg.out, "metrics.csv"),
                                   [{"iteration": 3, "wall_seconds": 1.0, "train_loss": 0.5}])
        raise train_module.TrainingStopped("loss 1e9 at iteration 4 is exploding")

    monkeypatch.setattr(train_module, "train", exploding)
    run = ex.training_run("kfc-pre", "small", ex.QUICK, str(tmp_path / "run"), data="digits")
    assert run.status.startswith("diverged: loss 1e9")
    assert run.net is None and [int(m["iteration"]) for m in run.metrics] == [3]
