"""The products of a conv layer with its expanded input [[A]]^T (Eqs. 26-28 and Omega's sums,
Eq. 23), computed without building [[A]]^T on NumPy.

* :func:`conv_product`: S^T = W [[A]]^T (+ b 1^T), the forward pass (and the input gradient of
  a stride-1 conv, a convolution with flipped kernels, :func:`col2im_of_product`);
* :func:`patch_gradient`: DS^T [[A]], the weight gradient;
* :func:`patch_moments`: the column sums and [[A]]^T [[A]] that Omega needs, blockwise or from
  products of input rows (:func:`row_lag_moments`);
* :func:`col2im_of_product`: col2im(W^T DS^T), the input gradient (Eq. 27), three ways.

On NumPy the N examples are cut into cache-sized blocks of [[A]]^T, gathered from the padded
channel-major input (:func:`~kfc_ref.nn.expand.padded_input`) and multiplied while in cache, on
two host threads with one BLAS thread each (docs/engine.md has the measurements).  On a
few-launch namespace (CuPy) each product is one gather and one GEMM
(:func:`kfc_ref.backend.few_launches`).  Both sum the same products, in different orders; the
loop twins in ``kfc_ref.nn.loops`` and the tests pin them to each other.
"""
from __future__ import annotations

from kfc_ref.backend import few_launches, get_xp, parallel_rows, strided_gather, strided_view
from kfc_ref.nn.expand import (
    ConvGeometry,
    col2im_matrix,
    offset_slices,
    padded_grid,
    padded_input,
    patch_matrix_of_padded,
    window_layout,
)
from kfc_ref.validate import check_choice


#: bytes of the per-thread block of [[A]]^T that :func:`conv_product` and
#: :func:`patch_gradient` gather and multiply at a time (about half a core's L2 cache: the
#: GEMM reads the block back from cache, not from memory)
CHUNK_BYTES = 1 << 20


def _patch_blocks(xpad, geom: ConvGeometry, use, min_columns: int = 1):
    """Call ``use(block, c0, c1)`` for consecutive runs c0:c1 of examples, ``block`` being
    columns c0|T| : c1|T| of [[A]]^T gathered into a C-contiguous (J|Delta|, (c1-c0)|T|)
    buffer of about :data:`CHUNK_BYTES` (and at least ``min_columns`` columns); the runs are
    split over :func:`~kfc_ref.backend.parallel_rows` threads, one BLAS thread each, with a
    buffer per thread.  ``use`` returns None or a tuple of fresh arrays (they are summed in
    place: per thread, then over threads in a fixed order) and the sum is returned (None when
    nothing was returned).
    [[A]]^T itself (25x the input for a 5x5 kernel) is never written to memory: each block is
    built from the cached input and consumed by its GEMM while it is in cache."""
    xp = get_xp(xpad)
    ho, wo = padded_grid(xpad, geom)
    j, n = xpad.shape[:2]
    shape, strides = window_layout(geom, xpad.shape, ho, wo)
    windows = strided_view(xpad, shape, strides)               # (J, kh, kw, N, Ho, Wo)
    k, t = j * geom.num_offsets, ho * wo
    step = max(1, CHUNK_BYTES // (k * t * xpad.itemsize), -(-min_columns // t))
    totals = {}

    def run(n0, n1):
        flat = xp.empty(k * min(step, n1 - n0) * t, dtype=xpad.dtype)
        total = None
        for c0 in range(n0, n1, step):
            c1 = min(c0 + step, n1)
            block = flat[:k * (c1 - c0) * t].reshape(shape[:3] + (c1 - c0, ho, wo))
            block[...] = windows[:, :, :, c0:c1]
            value = use(block.reshape(k, (c1 - c0) * t), c0, c1)
            if value is not None:
                total = value if total is None else _add_tuples(total, value)
        totals[n0] = total
    parallel_rows(run, n, k * n * t, gemm=True)
    result = None
    for n0 in sorted(totals):                   # a fixed order: the same sum on every run
        if totals[n0] is not None:
            result = totals[n0] if result is None else _add_tuples(result, totals[n0])
    return result


def _add_tuples(a: tuple, b: tuple) -> tuple:
    for x, y in zip(a, b):
        x += y
    return a


def conv_product(xpad, weights, geom: ConvGeometry, bias=None):
    """S^T = W [[A]]^T (+ b 1^T) (Eq. 26, 29) of a padded channel-major input (J, N, Hp, Wp)
    (:func:`padded_input`), as an (I, N, Ho, Wo) array.  ``weights`` is W (I, J|Delta|),
    ``bias`` b (I,) or None.

    NumPy: blockwise (:func:`_patch_blocks`; about 1.6x faster on 2 cores than writing
    [[A]]^T and one two-threaded GEMM for the CIFAR-10 net's second conv).  Elsewhere: one
    gather and one GEMM.  Every column is the same dot product either way."""
    xp = get_xp(xpad, weights)
    ho, wo = padded_grid(xpad, geom)
    i, n, t = weights.shape[0], xpad.shape[1], ho * wo
    if few_launches(xp):
        s = weights @ patch_matrix_of_padded(xpad, geom)
        if bias is not None:
            s += bias[:, None]
        return s.reshape(i, n, ho, wo)
    s = xp.empty((i, n * t), dtype=xp.result_type(weights, xpad))

    def product(block, c0, c1):
        part = s[:, c0 * t:c1 * t]
        xp.matmul(weights, block, out=part)
        if bias is not None:
            part += bias[:, None]                  # while the block's output is in cache
    _patch_blocks(xpad, geom, product)
    return s.reshape(i, n, ho, wo)


def patch_gradient(xpad, geom: ConvGeometry, ds, matrix=None):
    """DS^T [[A]] (Eq. 28 without the bias column): the (I, N|T|) derivatives DS^T times the
    patches of a padded channel-major input, summed over all N|T| columns -> (I, J|Delta|).

    With ``matrix`` ([[A]]^T, already built) or on a few-launch namespace: one GEMM,
    [[A]]^T DS (K x I) transposed (OpenBLAS is several times faster with the long N|T| axis as
    the contraction in this order).  NumPy: blockwise from the input (:func:`_patch_blocks`),
    the blocks' products added."""
    xp = get_xp(xpad, ds)
    if matrix is None and few_launches(xp):
        matrix = patch_matrix_of_padded(xpad, geom)
    if matrix is not None:
        return (matrix @ ds.T).T
    t = ds.shape[1] // xpad.shape[1]
    (total,) = _patch_blocks(xpad, geom, lambda block, c0, c1: (block @ ds[:, c0 * t:c1 * t].T,))
    return total.T


def patch_moments(xpad, geom: ConvGeometry, matrix=None):
    """The two sums over the N|T| rows of [[A]] that Omega needs (Eq. 23, App. A): the column
    sums (K,) and the Gram matrix [[A]]^T [[A]] (K, K), K = J|Delta|, of a padded
    channel-major input.  With ``matrix`` ([[A]]^T, already built) or on a few-launch
    namespace: from the whole matrix (a symmetric rank-k update).  NumPy: from row products
    (:func:`row_lag_moments`) when they are large enough, else blockwise
    (:func:`_patch_blocks`), blocks of at least 4K columns so that adding the K x K partial
    sums stays cheap next to their products; [[A]]^T is never built."""
    xp = get_xp(xpad)
    if matrix is None and few_launches(xp):
        matrix = patch_matrix_of_padded(xpad, geom)
    if matrix is not None:
        return xp.sum(matrix, axis=1), matrix @ matrix.T
    if geom.kh > 1 and xpad.shape[0] * geom.kw >= ROW_LAG_MIN_ROWS:
        return row_lag_moments(xpad, geom)
    k = xpad.shape[0] * geom.num_offsets
    return _patch_blocks(xpad, geom, lambda block, c0, c1: (xp.sum(block, axis=1),
                                                            block @ block.T),
                         min_columns=4 * k)


#: :func:`patch_moments` takes :func:`row_lag_moments` when its products have at least this
#: many rows, J kw (measured at batch 512: the CIFAR-10 net's second and third convs, J kw =
#: 160, 1.8x and 1.7x faster than the blockwise [[A]]^T [[A]]; its first, J kw = 15, 1.9x
#: slower: products that small run far below the BLAS peak)
ROW_LAG_MIN_ROWS = 32


def row_lag_moments(xpad, geom: ConvGeometry):
    """:func:`patch_moments` (Omega's sums, Eq. 23) from products of input *rows* (NumPy),
    ~kh/2 times fewer flops.

    Row j|Delta| + u kw + v of [[A]]^T reads input row r = s oh + d u, columns s ow + d v.  With
    the row patches R_r, the (J kw, N Wo) matrix of entries x[j, n, r, s ow + d v] (rows
    (j, v)), the Gram block of kernel rows (u, u') is

        sum_oh R_{s oh + d u} R_{s oh + d u'}^T,

    a sum of row products G(r, L) = R_r R_{r+L}^T at lag L = d (u' - u).  Each G(r, L) is
    computed once, for the rows r some block needs, and shared by every (u, u') at that lag:
    about kh Hp products of 2 (J kw)^2 N Wo flops (half for the symmetric lag-0 ones) instead
    of the (J kh kw)^2 N Ho Wo of the symmetric rank-k update [[A]]^T [[A]]: 0.40x the flops
    for the CIFAR-10 net's second conv (5x5 kernel, 16x16 maps; measured 1.8x faster).
    Blocks with u' < u are the transposes; the diagonal blocks are sums of symmetric products
    (``a @ a.T``), so the Gram matrix is exactly symmetric.  The same sums as [[A]]^T [[A]],
    in another order."""
    xp = get_xp(xpad)
    j, n, hp, wp = xpad.shape
    ho, wo = padded_grid(xpad, geom)
    kh, kw, s, d = geom.kh, geom.kw, geom.stride, geom.dilation
    # R[r] = the (J kw, N Wo) row patches of input row r: one threaded strided gather
    shape = (hp, j, kw, n, wo)
    strides = (wp, n * hp * wp, d, hp * wp, s)
    rows = strided_gather(xpad, shape, strides).reshape(hp, j * kw, n * wo)
    needed = {}                                   # lag L -> rows r whose G(r, L) is used
    for u in range(kh):
        for u2 in range(u, kh):
            lag = d * (u2 - u)
            needed.setdefault(lag, set()).update(s * oh + d * u for oh in range(ho))
    pairs = [(r, lag) for lag, rs in needed.items() for r in sorted(rs)]
    products = {}

    def multiply(p0, p1):
        for r, lag in pairs[p0:p1]:
            products[r, lag] = rows[r] @ rows[r + lag].T         # (J kw, J kw)
    parallel_rows(multiply, len(pairs), rows.size, gemm=True)
    gram = xp.empty((j, kh, kw, j, kh, kw), dtype=xpad.dtype)
    for u in range(kh):
        for u2 in range(u, kh):
            lag = d * (u2 - u)
            block = products[d * u, lag].copy()
            for oh in range(1, ho):
                block += products[s * oh + d * u, lag]
            block4 = block.reshape(j, kw, j, kw)
            gram[:, u, :, :, u2, :] = block4
            if u2 != u:
                gram[:, u2, :, :, u, :] = block4.transpose(2, 3, 0, 1)
    row_sums = xp.sum(rows, axis=2)                                # (Hp, J kw)
    sums = xp.stack([xp.sum(row_sums[d * u:d * u + s * (ho - 1) + 1:s], axis=0)
                     for u in range(kh)])                           # (kh, J kw)
    sums = sums.reshape(kh, j, kw).transpose(1, 0, 2).reshape(-1)
    k = j * kh * kw
    return sums, gram.reshape(k, k)


def transposed_padding(geom: ConvGeometry) -> int | None:
    """The padding p' = d(k-1) - p under which the input gradient of a stride-1 conv with a
    square k x k kernel is itself a convolution of DS with the flipped kernels (a "full"
    correlation), or None where that does not hold (stride > 1, kh != kw, p > d(k-1))."""
    if geom.stride != 1 or geom.kh != geom.kw:
        return None
    pad = geom.dilation * (geom.kh - 1) - geom.padding
    return pad if pad >= 0 else None


def flipped_kernels(weights, j: int, geom: ConvGeometry):
    """W' (J, I*|Delta|) with W'[j, i|Delta| + (kh-1-u)kw + (kw-1-v)] = W[i, j|Delta| + u kw + v]:
    the kernels of the transposed convolution (in and out channels swapped, offsets reversed)."""
    i = weights.shape[0]
    w6 = weights.reshape(i, j, geom.kh, geom.kw)[:, :, ::-1, ::-1]
    return w6.transpose(1, 0, 2, 3).reshape(j, i * geom.num_offsets)


def col2im_of_product(weights, ds, input_shape_cm: tuple, geom: ConvGeometry,
                      method: str | None = None):
    """col2im(W^T DS^T) (Eq. 27: the input gradient of a conv) for W (I, J*|Delta|) and DS^T
    (I, N*|T|), onto a (J, N, H, W) grid.

    ``method`` (None: chosen by namespace and geometry):

    * ``"product"``: one GEMM and col2im of the whole (J|Delta|, N|T|) product (few-launch
      namespaces: one GEMM and one scatter-add, :func:`col2im_matrix`);
    * ``"offsets"``: one (J x I)(I x N|T|) GEMM per kernel offset, added into its slice while
      the block is still in cache (NumPy, strided or non-square convs);
    * ``"transposed"``: for a stride-1 square kernel (:func:`transposed_padding`), the
      transposed convolution W' [[DS]]^T with the flipped kernels W' (:func:`flipped_kernels`)
      and [[DS]] the im2col of the (I, N, Ho, Wo) derivatives at padding d(k-1) - p: one
      blockwise gather and GEMM (:func:`conv_product`), no read-modify-write passes (NumPy;
      ~1.4x faster than the offsets on the CIFAR-10 net's second conv; chosen where I <= J).

    The sums are the same, in another order.
    """
    xp = get_xp(weights, ds)
    check_choice("method", method, (None, "product", "offsets", "transposed"))
    j, n, h, w = input_shape_cm
    ho, wo = geom.output_shape(h, w)
    if method is None:
        # the transposed gather has I|Delta| rows: it pays off while I <= J (measured on the
        # CIFAR-10 net, batch 128, blockwise: 20 vs 28 ms at I = J = 32; 13.9 vs 13.6 ms at
        # I = 64, J = 32, where the offsets keep the smaller gather)
        transposed = transposed_padding(geom) is not None and weights.shape[0] <= j
        method = "product" if few_launches(xp) else ("transposed" if transposed else "offsets")
    if method == "product":
        return col2im_matrix(weights.T @ ds, input_shape_cm, geom)
    if method == "transposed":
        pad = transposed_padding(geom)
        if pad is None:
            raise ValueError(f"method='transposed' needs stride 1, a square kernel and "
                             f"padding <= dilation*(k-1); got {geom}")
        flipped = ConvGeometry(geom.kh, geom.kw, 1, pad, geom.dilation)
        dpad = padded_input(ds.reshape(-1, n, ho, wo), flipped, channel_major=True)
        return conv_product(dpad, flipped_kernels(weights, j, geom), flipped)
    p = geom.padding
    out = xp.zeros((j, n, h + 2 * p, w + 2 * p), dtype=ds.dtype)
    per_offset = weights.reshape(weights.shape[0], j, geom.num_offsets)
    t = ho * wo

    def examples(n0, n1):
        d = ds[:, n0 * t:n1 * t]
        for u in range(geom.kh):
            for v in range(geom.kw):
                rows, cs = offset_slices(geom, u, v, ho, wo)
                block = per_offset[:, :, u * geom.kw + v].T @ d            # (J, N|T|)
                out[:, n0:n1, rows, cs] += block.reshape(j, n1 - n0, ho, wo)
    if few_launches(xp):
        examples(0, n)
    else:
        parallel_rows(examples, n, out.size * geom.num_offsets, gemm=True)
    return out[:, :, p:p + h, p:p + w] if p else out
