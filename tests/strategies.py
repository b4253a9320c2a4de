"""Hypothesis strategies shared by the tests: bounded conv geometries, shapes and arrays.

Sizes are kept tiny so that finite differences and dense matrices stay cheap; every strategy
returns plain Python values or float64 NumPy arrays drawn from a seeded generator.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def conv_cases(draw, max_batch=3, max_channels=3, max_size=7, max_kernel=3,
               allow_dilation=True):
    """A valid (N, J, H, W, I, kh, kw, stride, padding, dilation) convolution case."""
    n = draw(st.integers(1, max_batch))
    j = draw(st.integers(1, max_channels))
    i = draw(st.integers(1, max_channels))
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2)) if allow_dilation else 1
    min_h = max(1, dilation * (kh - 1) + 1 - 2 * padding)
    min_w = max(1, dilation * (kw - 1) + 1 - 2 * padding)
    h = draw(st.integers(min_h, max(min_h, max_size)))
    w = draw(st.integers(min_w, max(min_w, max_size)))
    return dict(n=n, j=j, i=i, h=h, w=w, kh=kh, kw=kw, stride=stride, padding=padding,
                dilation=dilation)


@st.composite
def pool_cases(draw, max_size=8):
    """(N, C, H, W, size, stride, ceil_mode) with the window inside the input."""
    size = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    h = draw(st.integers(size, max_size))
    w = draw(st.integers(size, max_size))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=h, w=w, size=size,
                stride=stride, ceil_mode=draw(st.booleans()))


seeds = st.integers(0, 2**31 - 1)


def normal(seed: int, *shape):
    """float64 standard normal array from a seed."""
    return np.random.default_rng(seed).normal(size=shape)


def distinct(seed: int, *shape):
    """float64 array with well-separated distinct entries (no ties, no kinks near 0):
    a random permutation of 0.5 + k, centred; finite differences with eps << 0.5 never
    cross a max-pool tie or a ReLU kink."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    vals = rng.permutation(size).astype(np.float64) - (size - 1) / 2.0 + 0.25
    return (vals * 0.1).reshape(shape)
