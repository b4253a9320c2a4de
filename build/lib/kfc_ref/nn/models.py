"""Model zoo: tiny nets for exact Fisher work, the paper's CIFAR-10 net, small image nets.

``build_model(name, input_shape, num_classes)`` is the one entry point the CLI uses; each
builder is also public.
"""
from __future__ import annotations

from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, Identity, ReLU, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d, ResponseNorm

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "identity": Identity}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; use one of "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def tiny_convnet(input_shape=(1, 6, 6), channels=(3, 3), num_classes: int = 3,
                 activation: str = "tanh", padding: int = 1) -> Sequential:
    """Two 3x3 convs (same padding by default) and a dense softmax output: a few hundred
    parameters, small enough for the exact P x P Fisher (e.g. 1x6x6 input, 3 and 3 maps)."""
    c_in, h, w = input_shape
    layers, c = [], c_in
    for c_out in channels:
        layers += [Conv2d(c, c_out, 3, padding=padding), _activation(activation)]
        c = c_out
        h, w = h + 2 * padding - 2, w + 2 * padding - 2
    layers += [Flatten(), Dense(c * h * w, num_classes)]
    return Sequential(layers, input_shape)


def cifar10_convnet(pool: str = "max", input_shape=(3, 32, 32), num_classes: int = 10,
                    width: tuple = (32, 32, 64)) -> Sequential:
    """cuda-convnet's CIFAR-10 "18% in 20 minutes" net (layers-18pct), the paper's Section 5:

    conv 5x5x32 pad 2 -> max-pool 3/2 -> ReLU -> rnorm(3, 5e-5, 0.75) ->
    conv 5x5x32 pad 2 -> ReLU -> avg-pool 3/2 -> rnorm ->
    conv 5x5x64 pad 2 -> ReLU -> avg-pool 3/2 -> dense 10 (-> softmax in the loss).

    Pools are cuda-convnet's overlapping 3x3 stride-2 pools with partial border windows
    (32 -> 16 -> 8 -> 4).  ``pool="avg"`` replaces the first max-pool by average pooling
    (Appendix D.1, Figure 3 c-d).
    """
    if pool not in ("max", "avg"):
        raise ValueError(f"pool={pool!r} is not supported; use 'max' or 'avg'")
    c, h, w = input_shape
    first_pool = MaxPool2d(3, 2, ceil_mode=True) if pool == "max" else AvgPool2d(3, 2, ceil_mode=True)
    w1, w2, w3 = width
    layers = [
        Conv2d(c, w1, 5, padding=2),
        first_pool, ReLU(), ResponseNorm(3, 5e-5, 0.75),
        Conv2d(w1, w2, 5, padding=2), ReLU(), AvgPool2d(3, 2, ceil_mode=True),
        ResponseNorm(3, 5e-5, 0.75),
        Conv2d(w2, w3, 5, padding=2), ReLU(), AvgPool2d(3, 2, ceil_mode=True),
        Flatten(),
    ]
    net = Sequential(layers, input_shape)
    flat = net.shapes[-1][0]
    return Sequential(layers + [Dense(flat, num_classes)], input_shape)


def small_convnet(input_shape=(1, 8, 8), num_classes: int = 10, channels=(16, 32),
                  pool: str = "max", dropout: float = 0.0) -> Sequential:
    """A small net for the built-in datasets (8x8 digits, 28x28 MNIST, 32x32 images):
    [conv 3x3 same -> ReLU -> pool 2/2] per entry of ``channels``, then dense softmax.
    Pools are skipped once the map is smaller than 4x4."""
    if pool not in ("max", "avg"):
        raise ValueError(f"pool={pool!r} is not supported; use 'max' or 'avg'")
    c, h, w = input_shape
    layers = []
    for c_out in channels:
        layers += [Conv2d(c, c_out, 3, padding=1), ReLU()]
        if min(h, w) >= 4:
            layers.append(MaxPool2d(2, 2) if pool == "max" else AvgPool2d(2, 2))
            h, w = h // 2, w // 2
        c = c_out
    layers.append(Flatten())
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(Dense(c * h * w, num_classes))
    return Sequential(layers, input_shape)


ARCHITECTURES = ("tiny", "small", "small-avg", "cifar10", "cifar10-avg")


def build_model(name: str, input_shape, num_classes: int) -> Sequential:
    """Build a named architecture for the given per-example input shape (C, H, W)."""
    input_shape = tuple(input_shape)
    if name == "tiny":
        return tiny_convnet(input_shape, num_classes=num_classes)
    if name in ("small", "small-avg"):
        return small_convnet(input_shape, num_classes,
                             pool="avg" if name.endswith("avg") else "max")
    if name in ("cifar10", "cifar10-avg"):
        return cifar10_convnet("avg" if name.endswith("avg") else "max", input_shape,
                               num_classes)
    raise ValueError(f"arch={name!r} is not supported; use one of {ARCHITECTURES}")
