"""``bench speedup --plot-only``: Figures 1-2 drawn from the runs a measurement left in OUT."""
from __future__ import annotations

import pytest

from kfc_ref.experiments.bench import speedup
from kfc_ref.experiments.metrics import write_metrics

pytestmark = pytest.mark.host_only("plots host-side metrics logs")


def fake_run(folder, seconds_per_iteration):
    rows = [{"iteration": k, "examples_seen": 128 * k, "wall_seconds": k * seconds_per_iteration,
             "train_loss": 2.0 / k, "train_error": 0.5 / k, "test_loss": 2.1 / k,
             "test_error": 0.6 / k} for k in (1, 2, 4)]
    folder.mkdir(parents=True)
    write_metrics(str(folder / "metrics.csv"), rows)


def test_plot_only_draws_the_wallclock_figure(tmp_path, capsys):
    fake_run(tmp_path / "wallclock_sgd", 0.4)
    fake_run(tmp_path / "wallclock_kfc-pre", 3.0)
    assert speedup.main(["wallclock", "--plot-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "wallclock.png").stat().st_size > 10_000
    assert "wallclock.pdf" in capsys.readouterr().out


def test_plot_only_without_runs_says_so(tmp_path, capsys):
    assert speedup.main(["iterations", "--plot-only", "--out", str(tmp_path)]) == 2
    assert "no runs of 'iterations'" in capsys.readouterr().err
    assert speedup.main(["sud", "--plot-only", "--out", str(tmp_path)]) == 2
