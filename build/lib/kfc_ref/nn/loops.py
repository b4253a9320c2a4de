"""Slow, obviously-correct twins of the fast kernels, for tests only.

Each function is a direct transcription of a definition with explicit Python loops over
examples, locations and offsets (NumPy, float64 in tests).  They share no code with the fast
path they check.
"""
from __future__ import annotations

import numpy as np


def _taps(h, w, kh, kw, stride, padding, dilation):
    """Every (oh, ow, u, v, r, q): output location, kernel offset and the input cell it reads
    (r, q inside the input only; padded cells are skipped, i.e. read as 0).  Also (Ho, Wo)."""
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    taps = []
    for oh in range(ho):
        for ow in range(wo):
            for u in range(kh):
                for v in range(kw):
                    r = stride * oh + dilation * u - padding
                    q = stride * ow + dilation * v - padding
                    if 0 <= r < h and 0 <= q < w:
                        taps.append((oh, ow, u, v, r, q))
    return taps, ho, wo


def im2col_loops(x, kh, kw, stride=1, padding=0, dilation=1):
    """[[A]] by Eq. 25: entry (n, t, j*|Delta| + u*kw + v) = x[n, j, s*oh+d*u-p, s*ow+d*v-p]
    (0 outside the input)."""
    n, c, h, w = x.shape
    taps, ho, wo = _taps(h, w, kh, kw, stride, padding, dilation)
    out = np.zeros((n, ho * wo, c * kh * kw), dtype=x.dtype)
    for b in range(n):
        for j in range(c):
            for oh, ow, u, v, r, q in taps:
                out[b, oh * wo + ow, j * kh * kw + u * kw + v] = x[b, j, r, q]
    return out


def conv2d_loops(x, W, b, stride=1, padding=0, dilation=1):
    """s[n, i, oh, ow] = b_i + sum_{j,u,v} W[i, j, u, v] x[n, j, s*oh+d*u-p, s*ow+d*v-p]."""
    n, c, h, w = x.shape
    i_out, _, kh, kw = W.shape
    taps, ho, wo = _taps(h, w, kh, kw, stride, padding, dilation)
    out = np.zeros((n, i_out, ho, wo), dtype=x.dtype)
    out += np.asarray(b)[None, :, None, None]
    for bb in range(n):
        for i in range(i_out):
            for j in range(c):
                for oh, ow, u, v, r, q in taps:
                    out[bb, i, oh, ow] += W[i, j, u, v] * x[bb, j, r, q]
    return out


def _pool_windows(h, w, size, stride, ceil_mode):
    import math
    rnd = math.ceil if ceil_mode else math.floor
    ho = rnd((h - size) / stride) + 1
    wo = rnd((w - size) / stride) + 1
    ho -= (ho - 1) * stride >= h          # no window may start outside the input
    wo -= (wo - 1) * stride >= w
    for oh in range(ho):
        for ow in range(wo):
            rows = range(oh * stride, min(oh * stride + size, h))
            cols = range(ow * stride, min(ow * stride + size, w))
            yield oh, ow, rows, cols, ho, wo


def pool_loops(x, size, stride, ceil_mode, kind):
    """Max or mean over the in-bounds cells of each window."""
    n, c, h, w = x.shape
    windows = list(_pool_windows(h, w, size, stride, ceil_mode))
    ho, wo = windows[0][4], windows[0][5]
    out = np.zeros((n, c, ho, wo), dtype=x.dtype)
    for oh, ow, rows, cols, _, _ in windows:
        block = x[:, :, rows.start:rows.stop, cols.start:cols.stop].reshape(n, c, -1)
        out[:, :, oh, ow] = block.max(axis=2) if kind == "max" else block.mean(axis=2)
    return out


def response_norm_loops(x, size, scale, power):
    """y = x / (1 + scale/size^2 * sum over the centred size x size window of x^2)^power."""
    n, c, h, w = x.shape
    lo = -(size // 2)
    out = np.zeros_like(x)
    for r in range(h):
        for q in range(w):
            acc = np.zeros((n, c), dtype=x.dtype)
            for du in range(lo, lo + size):
                for dv in range(lo, lo + size):
                    if 0 <= r + du < h and 0 <= q + dv < w:
                        acc += x[:, :, r + du, q + dv] ** 2
            out[:, :, r, q] = x[:, :, r, q] / (1 + scale / size ** 2 * acc) ** power
    return out
