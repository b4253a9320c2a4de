"""Passes over the maps of (A, B, H, W) arrays, shared by the window layers (pools, rnorm).

Both leading axes index maps: (N, C) in the public layout, (C, N) in the network's
channel-major one; the window layers act on the two trailing axes only, so any block of the
leading axis can be computed on its own.
"""
from __future__ import annotations

from kfc_ref.backend import get_xp, parallel_rows


def sum_views(views, op=None):
    """Sum (or ``op``, e.g. maximum) of equally shaped views into a new array: len(views) - 1
    launches (one copy for a single view)."""
    op = get_xp(views[0]).add if op is None else op
    if len(views) == 1:
        return views[0].copy()
    out = op(views[0], views[1])
    for v in views[2:]:
        op(out, v, out=out)
    return out


def row_blocks(fn, arrays, n_out: int):
    """``fn(*arrays)`` (a tuple of ``n_out`` arrays, each with the inputs' leading axis)
    computed on blocks of the leading axis on :func:`~kfc_ref.backend.parallel_rows` threads
    and concatenated: for NumPy passes that act per map."""
    results = {}

    def block(r0, r1):
        results[r0] = fn(*(a[r0:r1] for a in arrays))
    parallel_rows(block, arrays[0].shape[0], arrays[0].size)
    if len(results) == 1:
        return results[0]
    xp = get_xp(*arrays)
    keys = sorted(results)
    return tuple(xp.concatenate([results[k][i] for k in keys]) for i in range(n_out))
