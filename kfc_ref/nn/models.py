"""Model zoo: tiny nets for exact Fisher work, the paper's CIFAR-10 and SVHN nets, small nets.

``build_model(name, input_shape, num_classes)`` is the one entry point the CLI uses; each
builder is also public.
"""
from __future__ import annotations

from kfc_ref.nn.layers import Conv2d, Dense, Dropout, Flatten, Identity, ReLU, Tanh
from kfc_ref.nn.network import Sequential
from kfc_ref.nn.pooling import AvgPool2d, MaxPool2d
from kfc_ref.nn.response_norm import ResponseNorm

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
    pool_class = MaxPool2d if pool == "max" else AvgPool2d
    first_pool = pool_class(3, 2, ceil_mode=True)
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


#: Srivastava (2013)'s SVHN net: dropout *rates* (1 - retention probability) for the input,
#: the three conv blocks and the two hidden dense layers.
SVHN_DROPOUT = (0.1, 0.25, 0.25, 0.5, 0.5, 0.5)


#: Initial weight std of the SVHN net's output layer (a guess in the style of the Toronto
#: convnet configurations): with the default std sqrt(1/2048) the logits of
#: this deep ReLU/max-pool net start with a spread of ~20 (first loss ~18) and SGD at the
#: default learning rate explodes on the second step; 0.01 starts near log(10).
OUTPUT_INIT_STD = 0.01


def svhn_convnet(input_shape=(3, 32, 32), num_classes: int = 10, widths=(96, 128, 256),
                 hidden=(2048, 2048), dropout=SVHN_DROPOUT, pool: str = "max") -> Sequential:
    """The SVHN net the paper trains (Section 5: "the architecture of Srivastava (2013) ...
    three convolutional layers followed by three fully connected layers, and uses dropout"):

    dropout 0.1 -> [conv 5x5 pad 2 -> ReLU -> max-pool 3/2 -> dropout] x 3 (96, 128, 256 maps;
    dropout 0.25, 0.25, 0.5) -> dense 2048 -> ReLU -> dropout 0.5 -> dense 2048 -> ReLU ->
    dropout 0.5 -> dense 10 (softmax in the loss).  32 -> 16 -> 8 -> 4, so 256*4*4 = 4096
    inputs to the first dense layer; about 13.7M parameters.

    Source: N. Srivastava, "Improving neural networks with dropout", MSc thesis, Toronto 2013,
    whose SVHN appendix is reproduced in Srivastava, Hinton, Krizhevsky, Sutskever &
    Salakhutdinov, "Dropout: a simple way to prevent neural networks from overfitting", JMLR 15
    (2014), Appendix B.2: three conv layers of 96, 128 and 256 filters with 5x5 receptive fields
    at stride 1, each followed by 3x3 max pooling at stride 2; two fully connected hidden
    layers of 2048 units; ReLU everywhere; retention probabilities p = (0.9, 0.75, 0.75, 0.5,
    0.5, 0.5) from the input through the conv layers to the fully connected layers; max-norm
    constraint c = 4 on all weights; momentum 0.95.  Those papers were quoted from memory here
    (neither is in this repository), so treat the numbers as the best available reading.

    Guesses, not stated there: "same" zero padding 2 (so 32 -> 16 -> 8 -> 4 with cuda-convnet's
    overlapping pools with partial border windows, as in :func:`cifar10_convnet`); dropout
    after each pooling (not before it); the six retention probabilities assigned in order to
    input, conv1, conv2, conv3, dense1, dense2; no response normalisation and no local contrast
    normalisation of the input (the training code standardises each channel); He-normal
    conv and hidden weights, output weights with std :data:`OUTPUT_INIT_STD`.  Not built:
    the max-norm constraint (an optimizer feature).  ``widths``, ``hidden`` and ``dropout``
    are parameters so tests can build a narrow twin.  ``pool="avg"`` replaces every max-pool
    by a 3x3/2 average pool (Appendix D.1, Figure 3 c-d: "max-pooling is replaced by average
    pooling"; arch ``svhn-avg``).
    """
    if pool not in ("max", "avg"):
        raise ValueError(f"pool={pool!r} is not supported; use 'max' or 'avg'")
    if len(widths) != 3 or len(hidden) != 2 or len(dropout) != 6:
        raise ValueError("svhn_convnet: widths needs 3 entries, hidden 2 and dropout 6; got "
                         f"{len(widths)}, {len(hidden)}, {len(dropout)}")
    c = input_shape[0]
    layers = [Dropout(dropout[0])]
    for w, rate in zip(widths, dropout[1:4]):
        layers += [Conv2d(c, w, 5, padding=2), ReLU(),
                   (MaxPool2d if pool == "max" else AvgPool2d)(3, 2, ceil_mode=True),
                   Dropout(rate)]
        c = w
    layers.append(Flatten())
    flat = Sequential(layers, input_shape).shapes[-1][0]
    for h, rate in zip(hidden, dropout[4:]):
        layers += [Dense(flat, h), ReLU(), Dropout(rate)]
        flat = h
    return Sequential(layers + [Dense(flat, num_classes, init_std=OUTPUT_INIT_STD)], input_shape)


ARCHITECTURES = ("tiny", "small", "small-avg", "cifar10", "cifar10-avg", "svhn", "svhn-avg")


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
    if name in ("svhn", "svhn-avg"):
        return svhn_convnet(input_shape, num_classes, pool="avg" if name.endswith("avg") else "max")
    raise ValueError(f"arch={name!r} is not supported; use one of {ARCHITECTURES}")
