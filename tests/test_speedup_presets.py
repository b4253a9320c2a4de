"""`bench speedup` presets: the paper-setting runs as single commands with stated times, and
the SUD training preset end to end on a tiny dataset."""
import json
import os

import pytest


@pytest.mark.host_only("CLI presets and help text")
def test_speedup_presets_set_the_paper_settings_and_state_times():
    from kfc_ref.experiments.bench.speedup import PRESETS, build_parser, parse_args
    args = parse_args(["--preset", "fig1-wallclock", "--data-dir", "D", "--device", "gpu",
                       "--out", "o"])
    assert args.what == "wallclock" and args.seconds == 3600 and args.max_train is None
    assert args.lr_sgd is None and args.lr_kfc is None and args.device == "gpu"
    args = parse_args(["--preset", "fig2-updates", "--max-iters", "20", "--out", "o"])
    assert args.what == "iterations" and args.batch_size == 4096 and args.max_iters == 20
    args = parse_args(["--preset", "sud-cifar10", "--out", "o"])
    assert args.what == "sud" and args.archs == ("cifar10", "cifar10-avg") and args.epochs == 50
    with pytest.raises(SystemExit):
        parse_args(["iterations", "--preset", "sud-cifar10", "--out", "o"])
    with pytest.raises(SystemExit):
        parse_args(["--out", "o"])
    text = build_parser().format_help()
    for name, preset in PRESETS.items():
        assert name in text
        cpu, gpu = preset.expected_seconds("cpu"), preset.expected_seconds("gpu")
        assert 0 < gpu < cpu
    assert "expected time: CPU ~" in text and "GPU ~" in text


@pytest.mark.slow
def test_speedup_sud_runs_both_pooling_variants_then_the_report(tmp_path, capsys, device):
    from kfc_ref.experiments.bench.speedup import main
    out = str(tmp_path / "sud")
    assert main(["sud", "--data", "digits", "--arch", "small", "--epochs", "0.1", "--lr",
                 "0.03", "--examples", "30", "--max-test", "60", "--out", out,
                 "--device", device]) == 0
    capsys.readouterr()
    with open(os.path.join(out, "summary_sud.json")) as fh:
        summary = json.load(fh)
    assert set(summary["runs"]) == {"small", "small-avg"}
    for arch in ("small", "small-avg"):
        assert os.path.exists(os.path.join(out, arch, "sud", "sud_derivatives.png"))
        assert summary["runs"][arch]["sud_layers"][0]["layer"] == "conv1"
