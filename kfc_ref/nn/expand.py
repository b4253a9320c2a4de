"""The expansion operator [[A]] (im2col, paper Eq. 25 and 29, Appendix A) and its adjoint.

Layout (kfc_ref convention, see ``kfc_ref/__init__.py``):

* input ``x``: (N, J, H, W);
* ``im2col(x, ...)`` -> patches P of shape (N, |T|, J*|Delta|): row t = (oh, ow) of the output
  grid in row-major order, column ``j*|Delta| + u*kw + v`` holds x[n, j, s*oh + d*u - p,
  s*ow + d*v - p] or 0 when that index leaves the input (zero padding);
* ``expand_homogeneous(P)`` -> [[A]]_H of shape (N, |T|, 1 + J*|Delta|): a column of ones in
  front (column 0, also at border rows: the bias is never padded).

Inside a network the layout is channel-major, (J, N, H, W) (:func:`im2col_matrix` with
``channel_major=True``), and [[A]]^T is a C-contiguous (J|Delta|, N|T|) matrix: a conv's output
W_bar [[A]]_H^T is then already (I, N|T|) = (I, N, Ho, Wo), with no transposes.  im2col is one
strided gather; col2im is its adjoint, one scatter-add on a GPU or |Delta| slice-adds on NumPy
(chosen by :func:`kfc_ref.backend.few_launches`): <im2col(x), Y> = <x, col2im(Y)>.  The slice
loops are kept as readable twins; slow, obviously-correct loop twins live in
``kfc_ref.nn.loops``.  The products of a conv with [[A]]^T (its forward pass, its gradients and
Omega's sums) are in :mod:`kfc_ref.nn.conv_products`.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import (
    few_launches,
    flat_index,
    get_xp,
    scatter_add,
    strided_gather,
)
from kfc_ref.validate import check_choice, check_int


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                dilation: int = 1) -> int:
    """Number of output positions along one axis: floor((size + 2p - d(k-1) - 1)/s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


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
        check_int("kernel height", self.kh, minimum=1)
        check_int("kernel width", self.kw, minimum=1)
        check_int("stride", self.stride, minimum=1)
        check_int("padding", self.padding, minimum=0)
        check_int("dilation", self.dilation, minimum=1)

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


def offset_slices(geom: ConvGeometry, u: int, v: int, ho: int, wo: int):
    """Slices of the padded input read by kernel offset (u, v) for every output location."""
    s, d = geom.stride, geom.dilation
    rows = slice(d * u, d * u + s * (ho - 1) + 1, s)
    cols = slice(d * v, d * v + s * (wo - 1) + 1, s)
    return rows, cols


def pad_spatial(x, padding: int, value: float = 0.0):
    """Pad the two trailing axes of a 4-D array with ``value`` (same namespace); the two leading
    axes may be (N, C) or (C, N)."""
    if padding == 0:
        return x
    xp = get_xp(x)
    a, b, h, w = x.shape
    out = xp.full((a, b, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def padded_input(x, geom: ConvGeometry, channel_major: bool = False):
    """The input as a C-contiguous, zero-padded (J, N, H + 2p, W + 2p) array: the one copy
    that also converts an (N, J, H, W) input to the channel-major layout (``x`` itself when it
    is channel-major, C-contiguous and unpadded)."""
    xp = get_xp(x)
    x_cm = x if channel_major else x.transpose(1, 0, 2, 3)
    if geom.padding:
        return pad_spatial(x_cm, geom.padding)
    if getattr(x_cm, "flags", None) is not None and x_cm.flags.c_contiguous:
        return x_cm
    return xp.ascontiguousarray(x_cm)


def window_layout(geom: ConvGeometry, padded_shape, ho: int, wo: int):
    """(shape, element strides) of the view (J, kh, kw, N, Ho, Wo) of a C-contiguous padded
    (J, N, Hp, Wp) input whose entry (j, u, v, n, oh, ow) is xpad[j, n, s*oh + d*u, s*ow + d*v]."""
    j, n, hp, wp = padded_shape
    s, d = geom.stride, geom.dilation
    shape = (j, geom.kh, geom.kw, n, ho, wo)
    strides = (n * hp * wp, d * wp, d, hp * wp, s * wp, s)
    return shape, strides


def padded_grid(xpad, geom: ConvGeometry) -> tuple[int, int]:
    """(Ho, Wo) of a padded input (the padding is already in it)."""
    unpadded = ConvGeometry(geom.kh, geom.kw, geom.stride, 0, geom.dilation)
    return unpadded.output_shape(xpad.shape[2], xpad.shape[3])


def patch_matrix_of_padded(xpad, geom: ConvGeometry):
    """[[A]]^T (J|Delta|, N|T|) of a padded channel-major input (:func:`padded_input`): one
    strided gather (:func:`kfc_ref.backend.strided_gather`)."""
    ho, wo = padded_grid(xpad, geom)
    j, n = xpad.shape[:2]
    shape, strides = window_layout(geom, xpad.shape, ho, wo)
    return strided_gather(xpad, shape, strides).reshape(j * geom.num_offsets, n * ho * wo)


def im2col_matrix(x, geom: ConvGeometry, channel_major: bool = False):
    """[[A]]^T as a C-contiguous (J*|Delta|, N*|T|) matrix (Eq. 25), built by one strided gather
    from the padded input (:func:`kfc_ref.backend.strided_gather`).

    ``x`` is (N, J, H, W), or (J, N, H, W) with ``channel_major=True`` (the network's internal
    layout, that of the paper's GPU code: App. A stores every column of the expanded matrix
    contiguous over examples and locations).  Row ``j*|Delta| + u*kw + v``, column
    ``n*|T| + oh*Wo + ow``.
    """
    return patch_matrix_of_padded(padded_input(x, geom, channel_major), geom)


def im2col_matrix_slices(x, geom: ConvGeometry, channel_major: bool = False):
    """The readable twin of :func:`im2col_matrix`: one strided slice copy per kernel offset
    (|Delta| copies; the formulation before the single gather, kept for the equality test)."""
    xp = get_xp(x)
    xpad = padded_input(x, geom, channel_major)
    j, n = xpad.shape[:2]
    h, w = (x.shape[2], x.shape[3])
    ho, wo = geom.output_shape(h, w)
    buf = xp.empty((j, geom.kh, geom.kw, n, ho, wo), dtype=x.dtype)
    for u in range(geom.kh):
        for v in range(geom.kw):
            rows, cs = offset_slices(geom, u, v, ho, wo)
            buf[:, u, v] = xpad[:, :, rows, cs]
    return buf.reshape(j * geom.num_offsets, n * ho * wo)


def im2col(x, geom: ConvGeometry):
    """Patches P = [[A]] of an (N, J, H, W) input: shape (N, |T|, J*|Delta|) (Eq. 25).

    Column ``j*|Delta| + u*kw + v`` (offset fastest), row ``oh*Wo + ow``.  The result is a
    transposed *view* of the (J*|Delta|, N*|T|) matrix of :func:`im2col_matrix`, in which the
    convolution, its weight gradient and Omega are single large GEMMs.
    """
    n = x.shape[0]
    return patches_view(im2col_matrix(x, geom), n)


def patches_view(matrix, n: int):
    """(N, |T|, K) patches as a view of a (K, N*|T|) matrix [[A]]^T."""
    k, nt = matrix.shape
    return matrix.reshape(k, n, nt // n).transpose(1, 2, 0)


def patch_matrix(patches):
    """[[A]]^T as a (J*|Delta|, N*|T|) matrix: a view for :func:`im2col`'s output, a copy
    otherwise."""
    n, t, k = patches.shape
    return patches.transpose(2, 0, 1).reshape(k, n * t)


def col2im_matrix(matrix, input_shape_cm: tuple, geom: ConvGeometry, method: str | None = None):
    """Adjoint of :func:`im2col_matrix` in the channel-major layout: a (J*|Delta|, N*|T|)
    matrix summed back onto a (J, N, H, W) grid (entries read from the zero padding dropped).

    ``method``: ``"scatter"`` (one scatter-add of the whole matrix at the gather's flat index:
    two launches on a GPU) or ``"slices"`` (one strided slice-add per kernel offset: fastest on
    NumPy); None lets :func:`kfc_ref.backend.few_launches` choose by namespace.
    """
    xp = get_xp(matrix)
    check_choice("method", method, (None, "scatter", "slices"))
    j, n, h, w = input_shape_cm
    ho, wo = geom.output_shape(h, w)
    p = geom.padding
    out = xp.zeros((j, n, h + 2 * p, w + 2 * p), dtype=matrix.dtype)
    if method is None:
        method = "scatter" if few_launches(xp) else "slices"
    if method == "scatter":
        shape, strides = window_layout(geom, out.shape, ho, wo)
        matrix = matrix if getattr(matrix, "flags", None) is None or \
            matrix.flags.c_contiguous else xp.ascontiguousarray(matrix)
        scatter_add(out, flat_index(xp, shape, strides), matrix)
    else:
        c6 = matrix.reshape(j, geom.kh, geom.kw, n, ho, wo)
        for u in range(geom.kh):
            for v in range(geom.kw):
                rows, cs = offset_slices(geom, u, v, ho, wo)
                out[:, :, rows, cs] += c6[:, u, v]
    return out[:, :, p:p + h, p:p + w] if p else out


def col2im(cols, input_shape: tuple[int, int, int, int], geom: ConvGeometry,
           method: str | None = None):
    """Adjoint of :func:`im2col`: sum (N, |T|, J*|Delta|) patch entries (any memory layout) back
    onto an (N, J, H, W) grid; <im2col(x), Y> = <x, col2im(Y)>.  Returns an (N, J, H, W) view
    of the channel-major result of :func:`col2im_matrix`."""
    n, j, h, w = input_shape
    out = col2im_matrix(patch_matrix(cols), (j, n, h, w), geom, method)
    return out.transpose(1, 0, 2, 3)


def expand_homogeneous(patches):
    """[[A]]_H (Eq. 29): prepend a column of ones to (N, |T|, K) patches -> (N, |T|, 1 + K)."""
    xp = get_xp(patches)
    n, t, _ = patches.shape
    ones = xp.ones((n, t, 1), dtype=patches.dtype)
    return xp.concatenate([ones, patches], axis=2)
