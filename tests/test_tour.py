"""``python -m kfc_ref tour --quick``: runs end to end on the built-in MNIST subset, passes its
theorem checks, and leaves the figures, the runs and a summary with every section's numbers."""
import os
import re

import pytest

from kfc_ref.experiments import tour
from kfc_ref.__main__ import main as cli_main

SECTIONS = ("## Theorem checks", "## The SUD assumption measured", "## KFC-pre vs SGD",
            "## Exact Fisher block vs KFC", "## Factored vs exact damping",
            "## Theorem 3", "## Time per step")


@pytest.fixture(scope="module")
def tour_run(tmp_path_factory, module_device):
    """The quick tour on the --xp device."""
    out = tmp_path_factory.mktemp("tour")
    rc = cli_main(["tour", "--quick", "--out", str(out), "--device", module_device])
    return rc, str(out)


@pytest.mark.slow
def test_tour_exits_zero(tour_run):
    rc, out = tour_run
    assert rc == 0


@pytest.mark.slow
def test_tour_writes_summary_with_every_section(tour_run):
    _, out = tour_run
    with open(os.path.join(out, "summary.md")) as fh:
        text = fh.read()
    for section in SECTIONS:
        assert section in text, f"summary.md lacks {section!r}"
    checks = re.search(r"Theorem checks: (\d+)/(\d+) passed", text)
    assert checks and checks.group(1) == checks.group(2)
    assert "nan" not in text.lower().replace("n/a", "")


@pytest.mark.slow
def test_tour_writes_figures_and_runs(tour_run):
    _, out = tour_run
    for name in ("sud_derivatives", "sud_activations", "sud_summary", "exact_vs_kfc",
                 "ladder", "training", "damping", "invariance"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 1000
    for run in ("sgd", "sgd-avgpool", "kfc-pre"):
        assert os.path.exists(os.path.join(out, "runs", run, "metrics.csv"))


@pytest.mark.host_only("CLI argument parsing")
def test_tour_rejects_an_unknown_option():
    with pytest.raises(SystemExit):
        tour.main(["--no-such-option"])


@pytest.mark.host_only("formats host metrics of stubbed runs")
def test_summary_reports_a_diverged_run():
    from types import SimpleNamespace
    from kfc_ref.experiments.studies import QUICK
    rows = [{"iteration": 2.0, "wall_seconds": 1.0, "train_loss": 1.0, "train_error": 0.5,
             "test_loss": 1.1, "test_error": 0.6}]
    res = SimpleNamespace(budget=QUICK, archs=("small", "small-avg"), runs={
        "sgd": SimpleNamespace(metrics=rows, status="finished"),
        "kfc-pre": SimpleNamespace(metrics=[], status="diverged: loss nan at iteration 1")})
    text = "\n".join(tour._training_section(res))
    assert "**KFC-pre diverged**" in text and "loss nan at iteration 1" in text
    assert "| KFC-pre | n/a |" in text
