"""Bad input raises a clear error at the boundary, naming the argument, value and what is
allowed."""
import numpy as np
import pytest

from kfc_ref.nn.layers import Conv2d, Dense, Dropout
from kfc_ref.nn.models import cifar10_convnet, small_convnet, tiny_convnet
from kfc_ref.nn.pooling import MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm


@pytest.mark.parametrize("make, match", [
    (lambda: Conv2d(0, 3, 3), "in_channels=0 is not allowed; expected an integer >= 1"),
    (lambda: Conv2d(1, 3, 3, stride=0), "stride=0 is not allowed"),
    (lambda: Conv2d(1, 3, 3, stride=-2), "stride=-2 is not allowed"),
    (lambda: Conv2d(1, 3, 3, padding=-1), "padding=-1 is not allowed"),
    (lambda: Dense(4, 0), "out_features=0"),
    (lambda: Dropout(1.0), "rate=1.0 is not allowed; expected a finite number >= 0 and < 1"),
    (lambda: MaxPool2d(0), "size=0 is not allowed; expected an integer >= 1"),
    (lambda: ResponseNorm(3, scale=-1.0), "scale=-1.0"),
    (lambda: small_convnet(pool="median"), "pool='median' is not supported"),
    (lambda: tiny_convnet(activation="sigmoid"), "activation='sigmoid' is not supported"),
    (lambda: cifar10_convnet().init(0, dtype="float16"), "dtype='float16' is not supported"),
    (lambda: cifar10_convnet().init(0, device="tpu"), "device='tpu' is not supported"),
])
@pytest.mark.host_only("constructor argument validation, no arrays")
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_kernel_larger_than_padded_input(to_xp):
    with pytest.raises(ValueError, match="larger than the padded input"):
        Conv2d(1, 2, 5).output_shape((1, 3, 3))
    with pytest.raises(ValueError, match="larger than the padded input"):
        Conv2d(1, 2, 5).forward(to_xp(np.zeros((1, 1, 3, 3))), to_xp(np.zeros((2, 26))))


def test_layer_input_checks(to_xp):
    conv = Conv2d(3, 2, 3)
    W = to_xp(np.zeros(conv.param_shape))
    with pytest.raises(ValueError, match="rank 4"):
        conv.forward(to_xp(np.zeros((3, 5, 5))), W)
    with pytest.raises(ValueError, match="input has 2 channels but the layer's weights expect J=3"):
        conv.forward(to_xp(np.zeros((1, 2, 5, 5))), W)
    with pytest.raises(ValueError, match=r"W_bar has shape \(2, 5\), expected \(2, 28\)"):
        conv.forward(to_xp(np.zeros((1, 3, 5, 5))), to_xp(np.zeros((2, 5))))


def test_network_input_checks(to_xp):
    net = tiny_convnet()
    params = [to_xp(p) for p in net.init(0, "float64")]
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 6, 6\), got \(2, 6, 6\)"):
        net.forward(params, to_xp(np.zeros((2, 6, 6))))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 6, 6\)"):
        net.forward(params, to_xp(np.zeros((2, 2, 6, 6))))
    bad = np.zeros((2, 1, 6, 6))
    bad[0, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        net.forward(params, to_xp(bad))
    bad[0, 0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        net.forward(params, to_xp(bad))
    with pytest.raises(ValueError, match="params has 1 entries"):
        net.forward(params[:1], to_xp(np.zeros((1, 1, 6, 6))))
