"""The learning-rate sweep picks the rate with the lowest training error; diverged runs lose."""
import os

import pytest

from kfc_ref.experiments.sweep import lr_sweep, main
from kfc_ref.experiments.train import TrainConfig


def test_sweep_picks_the_best_rate_and_scores_divergence(tmp_path, device):
    base = TrainConfig(optimizer="sgd", data="digits", max_train=256, max_test=64,
                       batch_size=32, iters=16, quiet=True, out=str(tmp_path), device=device)
    best, rows = lr_sweep(base, (100.0, 0.1, 1e-5))
    by_lr = {r.lr: r for r in rows}
    assert by_lr[100.0].status == "diverged"
    assert best == 0.1 and by_lr[0.1].train_error < by_lr[1e-5].train_error
    assert os.path.exists(tmp_path / "sweep.csv")


@pytest.mark.host_only("CLI argument parsing")
def test_sweep_cli_rejects_bad_rates(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--rates", "a,b", "--out", str(tmp_path)])
    assert "--rates must be comma-separated numbers" in capsys.readouterr().err
