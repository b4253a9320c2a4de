"""Random numbers keyed by example: the same draws for an example however the batch is split.

Dropout masks and targets sampled from the model (Section 3.1) are random.  Drawn from one
generator in batch order, they depend on where an example sits in the arrays that a process
holds; split a mini-batch over P data-parallel ranks and every rank would draw different
numbers.  :class:`ExampleRandom` makes the draws a function of

    (key, stream, draw, example index, position inside the example)

only: ``key`` is drawn once per step from the run's generator (the same on every rank, so it
stands for (seed, iteration)); ``stream`` names the pass (the gradient's forward pass, the
statistics pass, ...); ``draw`` counts the calls within that pass (one per dropout layer, then
the targets); the example index is the example's row in the *global* mini-batch.  One process
and P ranks then draw the same numbers for every example, which is what makes data-parallel
training agree with a single process to round-off (``kfc_ref.optim.data_parallel``).

The generator is SplitMix64 (Steele, Lea & Flood 2014; the seeding generator of Java's
``SplittableRandom`` and of xoshiro): element ``c`` of a draw with seed ``s`` is
``mix64(s + (c + 1) * 0x9E3779B97F4A7C15)`` in wrapping 64-bit arithmetic, and a uniform in
[0, 1) is its top 53 bits times 2^-53.  It is counter based, so the draws are computed
elementwise in the namespace of the array they will multiply (on the GPU with CuPy, no host
transfer), with integer arithmetic that gives the same bits on every device.
"""
from __future__ import annotations

import numpy as _host_np    # the host-side seed arithmetic and Generator checks only

from kfc_ref.backend import get_xp

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix64(z):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic), in its namespace."""
    xp = get_xp(z)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(_MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(_MIX2)
    return z ^ (z >> xp.uint64(31))


def mix64_int(z: int) -> int:
    """:func:`mix64` of one Python int (taken mod 2^64), on the host."""
    return int(mix64(_host_np.array([z & _MASK], dtype=_host_np.uint64))[0])


class ExampleRandom:
    """Uniforms keyed by (key, stream, draw, example index); see the module doc.

    ``example_ids``: the global mini-batch rows of the examples this process holds, in the
    order of its arrays (host integers).  Each :meth:`uniform` call is the next ``draw``.
    """

    def __init__(self, key: int, stream: int, example_ids):
        self.key = int(key) & _MASK
        self.stream = int(stream)
        self.example_ids = _host_np.asarray(example_ids, dtype=_host_np.uint64).reshape(-1)
        self.draws = 0

    def _seed(self, draw: int) -> int:
        return mix64_int(mix64_int(self.key ^ mix64_int(self.stream + 1)) + draw * _GOLDEN)

    def uniform(self, shape, like):
        """Uniforms in [0, 1) of ``shape`` = (n, ...) with n = len(example_ids), row i keyed
        by example_ids[i], as float64 in the namespace of ``like`` (computed there)."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != self.example_ids.size:
            raise ValueError(f"ExampleRandom holds {self.example_ids.size} examples; a draw "
                             f"of shape {shape} must have that many rows")
        seed = self._seed(self.draws)
        self.draws += 1
        xp = get_xp(like)
        per_example = 1
        for s in shape[1:]:
            per_example *= s
        ids = xp.asarray(self.example_ids)
        counter = (ids[:, None] * xp.uint64(per_example)
                   + xp.arange(per_example, dtype=xp.uint64)[None, :] + xp.uint64(1))
        bits = mix64(counter * xp.uint64(_GOLDEN) + xp.uint64(seed))
        return ((bits >> xp.uint64(11)).astype(xp.float64) * (2.0 ** -53)).reshape(shape)


def draw_uniform(rng, shape, like):
    """Uniforms in [0, 1) (float64) of ``shape`` in the namespace of ``like`` from ``rng``: a NumPy
    Generator (drawn on the host in C order, then moved) or an :class:`ExampleRandom` (keyed
    by example, computed in place).  The one place where layers and losses draw."""
    if isinstance(rng, ExampleRandom):
        return rng.uniform(shape, like)
    if isinstance(rng, _host_np.random.Generator):
        return get_xp(like).asarray(rng.random(shape))
    raise TypeError(f"rng must be a numpy.random.Generator or an ExampleRandom, got "
                    f"{type(rng).__name__}")
