"""Benchmarks run in quick mode and print their ratios (no timing is asserted)."""
import json

from kfc_ref.bench import main, network_flops
from kfc_ref.models import cifar10_convnet


def test_conv_benchmark_quick(capsys):
    assert main(["conv", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fraction_of_matmul"] > 0 and result["batch"] == 8


def test_curvature_benchmark_quick(capsys):
    assert main(["curvature", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["statistics_over_gradient"] > 0


def test_flop_count_of_the_cifar_net():
    """6 N |T| K I per layer: conv1 32x32x(1+75)x32, conv2 16x16x(1+800)x32,
    conv3 8x8x(1+800)x64, dense 1x(1+1024)x10."""
    expected = 6 * (1024 * 76 * 32 + 256 * 801 * 32 + 64 * 801 * 64 + 1025 * 10)
    assert network_flops(cifar10_convnet(), 1) == expected


def test_bad_device_is_reported(capsys):
    from kfc_ref.backend import gpu_unavailable_reason
    if gpu_unavailable_reason() is None:
        return
    assert main(["conv", "--device", "gpu", "--quick"]) == 2
    assert "device='gpu' was requested" in capsys.readouterr().err
