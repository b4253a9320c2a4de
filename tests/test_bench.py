"""Benchmarks run in quick mode and print their ratios (no timing is asserted)."""
import json

import pytest

from kfc_ref.experiments.bench import main
from kfc_ref.experiments.bench.conv import network_flops
from kfc_ref.nn.models import cifar10_convnet


def test_conv_benchmark_quick(capsys, device):
    assert main(["conv", "--quick", "--json", "--device", device]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fraction_of_matmul"] > 0 and result["batch"] == 8


def test_curvature_benchmark_quick(capsys, device):
    assert main(["curvature", "--quick", "--json", "--device", device]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["statistics_over_gradient"] > 0


@pytest.mark.host_only("FLOP arithmetic from layer shapes, no arrays")
def test_flop_count_of_the_cifar_net():
    """6 N |T| K I per layer: conv1 32x32x(1+75)x32, conv2 16x16x(1+800)x32,
    conv3 8x8x(1+800)x64, dense 1x(1+1024)x10."""
    expected = 6 * (1024 * 76 * 32 + 256 * 801 * 32 + 64 * 801 * 64 + 1025 * 10)
    assert network_flops(cifar10_convnet(), 1) == expected


@pytest.mark.host_only("CLI device check against the real machine")
def test_bad_device_is_reported(capsys):
    from kfc_ref.backend import gpu_unavailable_reason
    if gpu_unavailable_reason() is None:
        return
    assert main(["conv", "--device", "gpu", "--quick"]) == 2
    assert "device='gpu' was requested" in capsys.readouterr().err


@pytest.mark.slow
def test_speedup_iterations_counts_updates_to_a_target(tmp_path, device):
    from kfc_ref.experiments.bench.speedup import first_iteration_below, iterations_to_target
    from kfc_ref.experiments.train import TrainConfig
    assert first_iteration_below([{"iteration": 5.0, "train_error": 0.3},
                                  {"iteration": 10.0, "train_error": 0.05}], 0.1) == 10
    base = TrainConfig(data="digits", max_train=256, max_test=64, batch_size=64, eval_every=4,
                       quiet=True, out=str(tmp_path), device=device)
    out = iterations_to_target(base, rates=(0.1, 0.01), sweep_iters=4, max_iters=12,
                               target=0.5)
    for method in ("sgd", "kfc-pre"):
        m = out["methods"][method]
        assert m["best_lr"] in (0.1, 0.01) and m["iterations_run"] == 12
    assert out["lowest_error_both_reach"] >= min(
        m["lowest_train_error"] for m in out["methods"].values())
