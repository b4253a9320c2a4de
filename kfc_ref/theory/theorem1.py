"""Theorem 1 (Eqs. 16-19, 47-48): the Kronecker factor Omega built from an autocovariance
function with the beta weights, the plug-in estimator the paper warns about (Section 3.1), and
Gaussian fields on which IAD, SH and SUD hold by construction, with their *exact* moments.

Under IAD + SH + SUD (Section 3), for one conv layer with input grid (H, W) and output grid
T_out,

    E[vec(DW_bar) vec(DW_bar)^T] = Omega kron Gamma(., ., 0)                         (18)
    [Omega]_{1+j|Delta|+delta, 1+j'|Delta|+delta'} = beta(delta, delta') Omega(j, j', delta'-delta)
    [Omega]_{0, 1+j|Delta|+delta} = beta(delta) M(j),   [Omega]_{0, 0} = |T_out|        (19, 47)

beta counts the output locations at which both offsets read inside the grid (activations are
zero in the padding, which is why beta appears).  The paper states beta for stride 1 and padding
R (Eq. 17/48); counting the same locations per axis extends it to any stride s and padding p:
beta_axis(u, u') = #{t < T_out : 0 <= s t + u - p < T_in and 0 <= s t + u' - p < T_in}, and
the bias weight beta(delta) is beta(delta, delta) (equal to Eq. 48's beta(delta, 0) for "same"
padding).  Dilation d reads the input at d u instead of u.

Kernel offsets are indexed delta_idx = u*kw + v (u, v in 0..k-1), as in ``kfc_ref.nn.expand``.
An autocovariance ``Omega_fn`` is an array (J, J, 2kh-1, 2kw-1) with
Omega_fn[j, j', du + kh - 1, dv + kw - 1] = E[a_{j,t} a_{j',t+(d du, d dv)}] (uncentred).
"""
from __future__ import annotations

from dataclasses import dataclass

from kfc_ref.backend import asarray_like, get_xp
from kfc_ref.nn.expand import ConvGeometry, expand_homogeneous, im2col, output_size
from kfc_ref.curvature.fisher import layer_gradient_vectors
from kfc_ref.nn.layers import Conv2d


# --------------------------------------------------------------------------- beta
def beta(delta, delta_prime, T1: int, T2: int) -> int:
    """Eq. 17/48 (stride 1, "same" padding): for offsets delta, delta' in {-R..R}^2,
    (T1 - max(d1, d1', 0) + min(d1, d1', 0)) (T2 - max(d2, d2', 0) + min(d2, d2', 0)),
    with each axis factor clipped at 0.  The clip is not in the paper: as printed, the factor
    of delta = -R, delta' = R is T - 2R, which goes negative when the offsets span more than
    the grid (2R > T; at 2R = T it is 0, the right count), e.g. T = 1, delta = -1, delta' = 1
    gives -1, while the number of locations it counts is 0."""
    (a1, a2), (b1, b2) = delta, delta_prime
    return (max(0, T1 - max(a1, b1, 0) + min(a1, b1, 0))
            * max(0, T2 - max(a2, b2, 0) + min(a2, b2, 0)))


def beta_axis(u: int, u_prime: int, T_in: int, T_out: int, stride: int = 1, padding: int = 0,
              kernel: int | None = None, dilation: int = 1) -> int:
    """One axis of beta for any stride and padding (Eq. 17/48's count, generalised):
    #{t in 0..T_out-1 : 0 <= s t + d u - p < T_in and 0 <= s t + d u' - p < T_in}."""
    if kernel is not None and not (0 <= u < kernel and 0 <= u_prime < kernel):
        raise ValueError(f"kernel offsets u={u}, u'={u_prime} must lie in 0..{kernel - 1}")
    return sum(1 for t in range(T_out)
               if 0 <= stride * t + dilation * u - padding < T_in
               and 0 <= stride * t + dilation * u_prime - padding < T_in)


def _axis_counts(size: int, kernel: int, geom: ConvGeometry):
    t_out = output_size(size, kernel, geom.stride, geom.padding, geom.dilation)
    return [[beta_axis(u, v, size, t_out, geom.stride, geom.padding, kernel, geom.dilation)
             for v in range(kernel)] for u in range(kernel)]


def beta_matrix(geom: ConvGeometry, H: int, W: int, like=None):
    """The |Delta| x |Delta| matrix beta(delta, delta') over offset indices u*kw + v for an
    (H, W) input: the Kronecker product of the two axes' counts.  Namespace and dtype of
    ``like`` (NumPy float64 when None)."""
    geom.output_shape(H, W)                                  # validates the geometry
    xp = get_xp(like)
    dtype = like.dtype if like is not None else xp.float64
    rows = xp.asarray(_axis_counts(H, geom.kh, geom), dtype=dtype)
    cols = xp.asarray(_axis_counts(W, geom.kw, geom), dtype=dtype)
    return xp.kron(rows, cols)


def beta_vector(geom: ConvGeometry, H: int, W: int, like=None):
    """beta(delta) of the bias entries (Eq. 47): the number of output locations whose offset
    delta reads inside the grid, i.e. the diagonal of :func:`beta_matrix`."""
    B = beta_matrix(geom, H, W, like)
    return get_xp(B).diagonal(B).copy()


# --------------------------------------------------------------------------- Omega from Omega_fn
def omega_from_autocovariance(Omega_fn, M, geom: ConvGeometry, H: int, W: int):
    """Eq. 19 with the bias row/column of Eq. 47: the (1 + J|Delta|) square factor.

    Omega_fn: (J, J, 2kh-1, 2kw-1) uncentred autocovariance (module doc); M: (J,) means.
    Entry (1 + j|Delta| + delta, 1 + j'|Delta| + delta') = beta(delta, delta') Omega(j, j',
    delta' - delta); entry (0, 1 + j|Delta| + delta) = beta(delta) M(j); entry (0, 0) = |T_out|.
    """
    xp = get_xp(Omega_fn, M)
    kh, kw = geom.kh, geom.kw
    J = M.shape[0]
    if Omega_fn.shape != (J, J, 2 * kh - 1, 2 * kw - 1):
        raise ValueError(f"Omega_fn must have shape (J, J, 2kh-1, 2kw-1) = "
                         f"({J}, {J}, {2 * kh - 1}, {2 * kw - 1}), got {Omega_fn.shape}")
    offsets = [(u, v) for u in range(kh) for v in range(kw)]           # delta_idx = u*kw + v
    du = [[b[0] - a[0] + kh - 1 for b in offsets] for a in offsets]     # delta' - delta, shifted
    dv = [[b[1] - a[1] + kw - 1 for b in offsets] for a in offsets]
    gathered = Omega_fn[:, :, xp.asarray(du), xp.asarray(dv)]        # (J, J, |D|, |D|)
    B = beta_matrix(geom, H, W, like=Omega_fn)
    weights = xp.transpose(gathered * B, (0, 2, 1, 3)).reshape(J * kh * kw, J * kh * kw)
    bias = (M[:, None] * beta_vector(geom, H, W, like=Omega_fn)[None, :]).reshape(-1)
    ho, wo = geom.output_shape(H, W)
    out = xp.empty((1 + J * kh * kw, 1 + J * kh * kw), dtype=Omega_fn.dtype)
    out[0, 0] = ho * wo
    out[0, 1:], out[1:, 0], out[1:, 1:] = bias, bias, weights
    return out


# --------------------------------------------------------------------------- plug-in estimator
def empirical_autocovariance(x):
    """Plug-in estimates from activations x (N, J, H, W) (Section 3.1, the road not taken):

    Omega_hat(j, j', delta) = mean over examples and over the locations t with t and t + delta
    both in the grid of a_{j,t} a_{j',t+delta}, for every delta in
    {-(H-1)..H-1} x {-(W-1)..W-1}: shape (J, J, 2H-1, 2W-1), centre index (H-1, W-1);
    M_hat(j) = mean of a_{j,t} over examples and locations, shape (J,).
    """
    xp = get_xp(x)
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have shape (N, J, H, W), got {getattr(x, 'shape', None)}")
    n, J, H, W = x.shape
    out = xp.zeros((J, J, 2 * H - 1, 2 * W - 1), dtype=x.dtype)
    for d1 in range(-(H - 1), H):
        for d2 in range(-(W - 1), W):
            r0, r1 = max(0, -d1), min(H, H - d1)
            c0, c1 = max(0, -d2), min(W, W - d2)
            a = x[:, :, r0:r1, c0:c1].reshape(n, J, -1)
            b = x[:, :, r0 + d1:r1 + d1, c0 + d2:c1 + d2].reshape(n, J, -1)
            pairs = a @ xp.transpose(b, (0, 2, 1))                   # (N, J, J)
            out[:, :, d1 + H - 1, d2 + W - 1] = xp.sum(pairs, axis=0) / (n * a.shape[2])
    return out, xp.mean(x, axis=(0, 2, 3))


def crop_autocovariance(full, geom: ConvGeometry):
    """The (J, J, 2kh-1, 2kw-1) window of a full (J, J, 2H-1, 2W-1) autocovariance that
    ``omega_from_autocovariance`` reads (offset differences d*du); offsets beyond the grid,
    where beta is 0, are filled with 0."""
    xp = get_xp(full)
    J, _, h2, w2 = full.shape
    H, W, d = (h2 + 1) // 2, (w2 + 1) // 2, geom.dilation
    out = xp.zeros((J, J, 2 * geom.kh - 1, 2 * geom.kw - 1), dtype=full.dtype)
    for a in range(-(geom.kh - 1), geom.kh):
        for b in range(-(geom.kw - 1), geom.kw):
            if abs(d * a) < H and abs(d * b) < W:
                out[:, :, a + geom.kh - 1, b + geom.kw - 1] = \
                    full[:, :, d * a + H - 1, d * b + W - 1]
    return out


def plugin_omega(x, geom: ConvGeometry):
    """Omega from the plug-in autocovariance of x (N, J, H, W) through Eq. 19.  The paper warns
    it can fail to be PSD (Section 3.1); compare ``factors.omega_from_patches`` (Theorem 2)."""
    full, M = empirical_autocovariance(x)
    return omega_from_autocovariance(crop_autocovariance(full, geom), M, geom, x.shape[2],
                                     x.shape[3])


# --------------------------------------------------------------------------- synthetic fields
@dataclass
class StationaryGaussianField:
    """a = mean + circular filter * white noise on an (H, W) torus: J maps, C noise channels.

    a_j(t) = mean_j + sum_{c, s} filt[j, c, s] z_c((t - s) mod (H, W)), z iid N(0, 1).
    Its covariance depends only on t' - t (mod the torus), so spatial homogeneity (SH) holds
    exactly on the grid; outside the grid the conv layer pads with zeros.  A 1x1 filter makes
    the field white across locations with covariance filt filt^T across maps (SUD, for
    derivatives).  filt: (J, C, fh, fw); mean: (J,).
    """

    filt: object
    mean: object
    grid: tuple

    @classmethod
    def random(cls, rng, channels: int, grid, noise_channels: int = 1, filter_size=(1, 1),
               mean_scale: float = 1.0):
        """Seeded random filter (standard normal) and mean (mean_scale * standard normal)."""
        filt = rng.normal(size=(channels, noise_channels) + tuple(filter_size))
        return cls(filt, mean_scale * rng.normal(size=channels), tuple(grid))

    def basis(self):
        """Columns of the square root L of the covariance as fields: (C*H*W, J, H, W), the
        field of unit noise z = e_k; a = mean + sum_k z_k basis[k]."""
        xp = get_xp(self.filt)
        J, C, fh, fw = self.filt.shape
        H, W = self.grid
        unit = xp.eye(C * H * W, dtype=self.filt.dtype).reshape(C * H * W, C, H, W)
        out = xp.zeros((C * H * W, J, H, W), dtype=self.filt.dtype)
        for s1 in range(fh):
            for s2 in range(fw):
                shifted = xp.roll(unit, (s1, s2), axis=(2, 3))      # z((t - s) mod grid)
                out += xp.einsum("jc,kchw->kjhw", self.filt[:, :, s1, s2], shifted)
        return out

    def components(self):
        """Mean field followed by the basis: (1 + C*H*W, J, H, W); a = sum_k c_k comp[k] with
        c_0 = 1 and c_k = z_k, so E[c_k c_l] = 1[k = l]."""
        xp = get_xp(self.filt)
        H, W = self.grid
        mean = xp.broadcast_to(self.mean[None, :, None, None], (1, self.mean.shape[0], H, W))
        return xp.concatenate([mean.astype(self.filt.dtype), self.basis()], axis=0)

    def second_moment(self, delta):
        """E[a_{j,t} a_{j',t+delta}] (J, J) for any t (uncentred; stationary on the torus)."""
        b = self.basis()
        H, W = self.grid
        x0 = b[:, :, 0, 0]
        x1 = b[:, :, delta[0] % H, delta[1] % W]
        return get_xp(b).transpose(x0) @ x1 + self.mean[:, None] * self.mean[None, :]

    def autocovariance(self, geom: ConvGeometry):
        """Omega_fn (J, J, 2kh-1, 2kw-1) of the module doc, exactly."""
        xp = get_xp(self.filt)
        J = self.filt.shape[0]
        out = xp.empty((J, J, 2 * geom.kh - 1, 2 * geom.kw - 1), dtype=self.filt.dtype)
        for a in range(-(geom.kh - 1), geom.kh):
            for b in range(-(geom.kw - 1), geom.kw):
                out[:, :, a + geom.kh - 1, b + geom.kw - 1] = \
                    self.second_moment((geom.dilation * a, geom.dilation * b))
        return out

    def sample(self, n: int, rng):
        """n independent draws (n, J, H, W) with host noise from ``rng``."""
        J, C = self.filt.shape[:2]
        H, W = self.grid
        z = asarray_like(rng.normal(size=(n, C * H * W)), like=self.filt)
        b = self.basis().reshape(C * H * W, -1)
        return (z @ b).reshape(n, J, H, W) + self.mean[None, :, None, None]


def _homogeneous_components(field: StationaryGaussianField, geom: ConvGeometry):
    """[[.]]_H of every component: the ones column belongs to the deterministic mean component
    only (the random components get a 0 there).  (1 + C*H*W, |T|, 1 + J|Delta|)."""
    xp = get_xp(field.filt)
    comps = expand_homogeneous(im2col(field.components(), geom))
    mask = xp.ones(comps.shape[:1] + (1, 1), dtype=comps.dtype)
    mask[1:] = 0
    return xp.concatenate([comps[:, :, :1] * mask, comps[:, :, 1:]], axis=2)


def exact_omega(field: StationaryGaussianField, geom: ConvGeometry):
    """E[[[A]]_H^T [[A]]_H] for A drawn from ``field`` (Theorem 2's expectation), exactly:
    sum over the components of [[comp]]_H^T [[comp]]_H."""
    xp = get_xp(field.filt)
    comps = _homogeneous_components(field, geom)
    flat = comps.reshape(-1, comps.shape[2])
    return xp.transpose(flat) @ flat


def exact_gradient_second_moment(activations: StationaryGaussianField,
                                 derivatives: StationaryGaussianField, geom: ConvGeometry):
    """E[vec(DW_bar) vec(DW_bar)^T] exactly when A ~ ``activations`` (on the input grid) and
    DS ~ ``derivatives`` (I maps on the output grid) are independent (IAD).

    vec(DW_bar) = g(A_H, DS) is bilinear; with A_H = sum_k c_k A_k and DS = sum_l e_l D_l
    (components, c and e independent with E[c_k c_k'] = 1[k=k'], E[e_l e_l'] = 1[l=l']) the
    fourth moments factor and E[g g^T] = sum_{k,l} g(A_k, D_l) g(A_k, D_l)^T.  g is the
    per-example weight gradient of ``fisher.layer_gradient_vectors`` (Eq. 28).
    """
    xp = get_xp(activations.filt)
    ho, wo = geom.output_shape(*activations.grid)
    if tuple(derivatives.grid) != (ho, wo):
        raise ValueError(f"derivatives live on the output grid {(ho, wo)}, got "
                         f"{tuple(derivatives.grid)}")
    A = _homogeneous_components(activations, geom)                     # (Ka, |T|, K)
    D = Conv2d.derivatives(derivatives.components())                    # (Kd, |T|, I)
    G = layer_gradient_vectors(A[:, None], D[None])                     # (Ka, Kd, K*I)
    G = G.reshape(-1, G.shape[-1])
    return xp.transpose(G) @ G


def theorem1_prediction(activations: StationaryGaussianField,
                        derivatives: StationaryGaussianField, geom: ConvGeometry):
    """Omega kron Gamma(., ., 0) of Eqs. 18-19 and 47 from the fields' exact statistics."""
    xp = get_xp(activations.filt)
    Omega = omega_from_autocovariance(activations.autocovariance(geom), activations.mean, geom,
                                      *activations.grid)
    return xp.kron(Omega, derivatives.second_moment((0, 0)))
