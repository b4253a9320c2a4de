"""The expansion operator [[A]] (im2col, paper Eq. 25 and 29, Appendix A) and its adjoint.

Layout (kfc_ref convention, see ``kfc_ref/__init__.py``):

* input ``x``: (N, J, H, W);
* ``im2col(x, ...)`` -> patches P of shape (N, |T|, J*|Delta|): row t = (oh, ow) of the output
  grid in row-major order, column ``j*|Delta| + u*kw + v`` holds x[n, j, s*oh + d*u - p,
  s*ow + d*v - p] or 0 when that index leaves the input (zero padding);
* ``expand_homogeneous(P)`` -> [[A]]_H of shape (N, |T|, 1 + J*|Delta|): a column of ones in
  front (column 0, also at border rows: the bias is never padded).

Both directions are loops over the |Delta| kernel offsets with strided slicing, so the same code
runs on CuPy; no scatter-add (``np.add.at``) is used.  ``col2im`` is the exact adjoint of
``im2col``: <im2col(x), Y> = <x, col2im(Y)>.  Slow, obviously-correct twins live in
``kfc_ref.nn.loops``.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import get_xp


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                dilation: int = 1) -> int:
    """Number of output positions along one axis: floor((size + 2p - d(k-1) - 1)/s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a 2-D convolution: kernel (kh, kw), stride, zero padding, dilation.

    ``stride``, ``padding`` and ``dilation`` are the same on both axes.  ``for_input`` checks a
    (H, W) input and returns the output grid (Ho, Wo), raising a clear error when the dilated
    kernel is larger than the padded input.
    """

    kh: int
    kw: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def __post_init__(self):
        _check_positive_int("kernel height", self.kh)
        _check_positive_int("kernel width", self.kw)
        _check_positive_int("stride", self.stride)
        _check_positive_int("padding", self.padding, minimum=0)
        _check_positive_int("dilation", self.dilation)

    @property
    def num_offsets(self) -> int:
        """|Delta| = kh * kw."""
        return self.kh * self.kw

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(Ho, Wo) for an (H, W) input; raises ValueError when the kernel does not fit."""
        eff_h = self.dilation * (self.kh - 1) + 1
        eff_w = self.dilation * (self.kw - 1) + 1
        ph, pw = height + 2 * self.padding, width + 2 * self.padding
        if eff_h > ph or eff_w > pw:
            raise ValueError(
                f"kernel {self.kh}x{self.kw} (dilation {self.dilation}, effective "
                f"{eff_h}x{eff_w}) is larger than the padded input {ph}x{pw} "
                f"(input {height}x{width}, padding {self.padding})")
        return (output_size(height, self.kh, self.stride, self.padding, self.dilation),
                output_size(width, self.kw, self.stride, self.padding, self.dilation))


def _offset_slices(geom: ConvGeometry, u: int, v: int, ho: int, wo: int):
    """Slices of the padded input read by kernel offset (u, v) for every output location."""
    s, d = geom.stride, geom.dilation
    rows = slice(d * u, d * u + s * (ho - 1) + 1, s)
    cols = slice(d * v, d * v + s * (wo - 1) + 1, s)
    return rows, cols


def pad_spatial(x, padding: int, value: float = 0.0):
    """Pad the two trailing axes of an (N, C, H, W) array with ``value`` (same namespace)."""
    if padding == 0:
        return x
    xp = get_xp(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def im2col(x, geom: ConvGeometry):
    """Patches P = [[A]] of an (N, J, H, W) input: shape (N, |T|, J*|Delta|) (Eq. 25).

    Column ``j*|Delta| + u*kw + v`` (offset fastest), row ``oh*Wo + ow``.  The result is a
    transposed *view* of a (J*|Delta|, N*|T|) matrix (see :func:`patch_matrix`), the layout of
    the paper's GPU code (App. A: every column of the expanded matrix contiguous over examples
    and locations).  In it each offset's copy writes contiguous rows, and the convolution, its
    weight gradient and Omega are single large GEMMs.
    """
    xp = get_xp(x)
    n, j, h, w = x.shape
    ho, wo = geom.output_shape(h, w)
    xpad = pad_spatial(x, geom.padding)
    buf = xp.empty((j, geom.kh, geom.kw, n, ho, wo), dtype=x.dtype)
    for u in range(geom.kh):
        for v in range(geom.kw):
            rows, cs = _offset_slices(geom, u, v, ho, wo)
            buf[:, u, v] = xp.transpose(xpad[:, :, rows, cs], (1, 0, 2, 3))
    return xp.transpose(buf.reshape(j * geom.num_offsets, n, ho * wo), (1, 2, 0))


def patch_matrix(patches):
    """[[A]]^T as a (J*|Delta|, N*|T|) matrix: a view for :func:`im2col`'s output, a copy
    otherwise."""
    xp = get_xp(patches)
    n, t, k = patches.shape
    return xp.transpose(patches, (2, 0, 1)).reshape(k, n * t)


def col2im(cols, input_shape: tuple[int, int, int, int], geom: ConvGeometry):
    """Adjoint of :func:`im2col`: sum patch entries back onto an (N, J, H, W) grid.

    ``cols`` has shape (N, |T|, J*|Delta|) (any memory layout).  Entries that im2col read from
    the zero padding are dropped, which is what makes this the exact adjoint.
    """
    xp = get_xp(cols)
    n, j, h, w = input_shape
    ho, wo = geom.output_shape(h, w)
    p = geom.padding
    c6 = patch_matrix(cols).reshape(j, geom.kh, geom.kw, n, ho, wo)
    out = xp.zeros((n, j, h + 2 * p, w + 2 * p), dtype=cols.dtype)
    for u in range(geom.kh):
        for v in range(geom.kw):
            rows, cs = _offset_slices(geom, u, v, ho, wo)
            out[:, :, rows, cs] += xp.transpose(c6[:, u, v], (1, 0, 2, 3))
    return out[:, :, p:p + h, p:p + w] if p else out


def expand_homogeneous(patches):
    """[[A]]_H (Eq. 29): prepend a column of ones to (N, |T|, K) patches -> (N, |T|, 1 + K)."""
    xp = get_xp(patches)
    n, t, _ = patches.shape
    ones = xp.ones((n, t, 1), dtype=patches.dtype)
    return xp.concatenate([ones, patches], axis=2)
