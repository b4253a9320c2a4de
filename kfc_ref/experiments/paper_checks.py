"""The checks run by ``python -m kfc_ref check`` (registered in :mod:`kfc_ref.experiments.checks`).

Each ``check_xxx(rng, dtype, xp) -> CheckResult`` draws a small random case from ``rng`` (a
NumPy Generator), builds it in ``dtype`` on the array module ``xp``, and measures one error:

* damping: pi of Eq. 8 minimises Eq. 7's residual bound; factored (Eqs. 20-22) and exact
  (App. B.2) damped solves equal dense solves in both vec orders;
* conventions: the per-example gradient sum_t a_t kron d_t is in the flat parameter order;
* Theorem 3 (Sec. 4, App. E.2): N-dagger computes N's function; undamped KFC is invariant
  (valid convs with shifts, padded convs without d), damped KFC for orthogonal maps; negative
  controls SGD, diagonal Fisher and damped KFC with general maps;
* Theorem 1 exact under IAD+SH+SUD and its SUD negative control; Theorem 2's Gram estimator
  equals the beta construction and is PSD while the plug-in estimator is not; a 1x1 conv is
  K-FAC.  The estimator checks (Monte-Carlo Fisher, Omega and Gamma with stated power) are in
  :mod:`kfc_ref.experiments.estimator_checks`.

Tolerances are named per dtype with the reason for their size.
"""
from __future__ import annotations

import numpy as _host_np  # host-side random cases (seeded Generators) and dense references

from kfc_ref.backend import to_numpy
from kfc_ref.experiments.checks import check_rng, measured, register
from kfc_ref.curvature.damping import eigen_factors, factored_inverse, pi_trace
from kfc_ref.nn.expand import ConvGeometry, im2col
from kfc_ref.curvature.factors import network_factors, omega_from_patches
from kfc_ref.curvature.fisher import true_fisher
from kfc_ref.theory.invariance import (
    dagger_network, dagger_params, function_discrepancy, invariance_error,
    random_reparameterization,
)
from kfc_ref.nn.layers import Conv2d, Dense, Flatten, Tanh
from kfc_ref.nn.losses import softmax_cross_entropy
from kfc_ref.nn.network import Sequential
from kfc_ref.theory.theorem1 import (
    StationaryGaussianField, exact_gradient_second_moment, exact_omega,
    omega_from_autocovariance, plugin_omega, theorem1_prediction,
)


def _on(xp, a, dtype):
    return xp.asarray(_host_np.asarray(a, dtype=dtype))


def _rel_err(a, ref) -> float:
    a = to_numpy(a).astype(_host_np.float64)
    return float(_host_np.abs(a - ref).max() / max(_host_np.abs(ref).max(), 1e-300))


def _random_factors(rng):
    """PSD (Omega, Gamma) with sizes 2-6 / 2-4 and a gradient G (host float64)."""
    def gram(d):
        B = rng.normal(size=(d, d))
        return B @ B.T + 0.1 * _host_np.eye(d)
    om, ga = gram(int(rng.integers(2, 7))), gram(int(rng.integers(2, 5)))
    return om, ga, rng.normal(size=(ga.shape[0], om.shape[0]))


# --------------------------------------------------------------------------- damping
#: Dense vs Kronecker damped solves; condition numbers here are <= ~1e4 (see tests/test_damping).
SOLVE_TOL = {"float64": 1e-9, "float32": 5e-3}


@register("damping.pi_argmin", "Eq. 8 (trace norm) minimises the trace-norm bound on Eq. 7's "
          "residual: relative slope of the bound at pi, and excess over a 4001-point pi grid")
def check_pi_argmin(rng, dtype, xp):
    om, ga, _ = _random_factors(rng)
    pi = pi_trace(_on(xp, om, dtype), _on(xp, ga, dtype))
    nuc = lambda M: _host_np.linalg.norm(M, "nuc")
    left = nuc(_host_np.kron(_host_np.eye(om.shape[0]), ga))     # ||I kron Gamma||_tr
    right = nuc(_host_np.kron(om, _host_np.eye(ga.shape[0])))    # ||Omega kron I||_tr
    bound = lambda p: p * left + right / p                       # / sqrt(lambda + gamma)
    grid = bound(pi * _host_np.exp(_host_np.linspace(-4, 4, 4001)))
    slope = abs(1.0 - right / (pi * pi * left))                  # d bound / d pi at pi, / left
    excess = max(0.0, (bound(pi) - grid.min()) / bound(pi))
    return measured("damping.pi_argmin", max(slope, excess), {"float64": 1e-12, "float32": 1e-5},
                    dtype, f"pi={pi:.4g}, dim Omega={om.shape[0]}, dim Gamma={ga.shape[0]}")


@register("damping.factored_solve", "(Gamma_d^-1 G Omega_d^-1) equals the dense solve with "
          "(Omega+pi r I) kron (Gamma+r/pi I), both vec orders (Eqs. 20-22)")
def check_factored_solve(rng, dtype, xp):
    om, ga, G = _random_factors(rng)
    damping = float(rng.uniform(1e-2, 1.0))
    out = to_numpy(factored_inverse(_on(xp, om, dtype), _on(xp, ga, dtype), damping)
                   .apply(_on(xp, G, dtype)))
    r, pi = damping ** 0.5, pi_trace(om, ga)
    om_d, ga_d = om + pi * r * _host_np.eye(om.shape[0]), ga + r / pi * _host_np.eye(ga.shape[0])
    err = max(_rel_err(out.ravel(order="F"),
                       _host_np.linalg.solve(_host_np.kron(om_d, ga_d), G.ravel(order="F"))),
              _rel_err(out.ravel(), _host_np.linalg.solve(_host_np.kron(ga_d, om_d), G.ravel())))
    return measured("damping.factored_solve", err, SOLVE_TOL, dtype, f"damping={damping:.3g}")


@register("damping.exact_solve", "eigen solve (App. B.2, Eqs. 33-38) equals the dense solve "
          "with Omega kron Gamma + gamma I, both vec orders")
def check_exact_solve(rng, dtype, xp):
    om, ga, G = _random_factors(rng)
    damping = float(rng.uniform(1e-2, 1.0))
    out = to_numpy(eigen_factors(_on(xp, om, dtype), _on(xp, ga, dtype))
                   .apply(_on(xp, G, dtype), damping))
    eye = _host_np.eye(om.shape[0] * ga.shape[0])
    err = max(_rel_err(out.ravel(order="F"), _host_np.linalg.solve(
                  _host_np.kron(om, ga) + damping * eye, G.ravel(order="F"))),
              _rel_err(out.ravel(), _host_np.linalg.solve(
                  _host_np.kron(ga, om) + damping * eye, G.ravel())))
    return measured("damping.exact_solve", err, SOLVE_TOL, dtype, f"damping={damping:.3g}")


# --------------------------------------------------------------------------- conventions
@register("conventions.flat_gradient", "per-example vec(DW_bar) = sum_t a_t kron d_t is the "
          "flat gradient of that example's loss (column-stacking order)")
def check_flat_gradient(rng, dtype, xp):
    net = Sequential([Conv2d(2, 3, 3, stride=2, padding=1), Tanh(), Flatten(), Dense(27, 3)],
                     (2, 5, 5))
    params = [None if p is None else xp.asarray(p) for p in net.init(rng, dtype=dtype)]
    x = _on(xp, rng.normal(size=(3, 2, 5, 5)), dtype)
    y = xp.asarray(rng.integers(0, 3, 3))
    tape = net.forward(params, x)
    _, douts = net.backward(params, tape, softmax_cross_entropy(tape.output, y)[1])
    records, err = net.records(tape, douts), 0.0
    for n in range(3):
        flat = to_numpy(net.flatten(net.loss_and_grads(params, x[n:n + 1], y[n:n + 1])[1]))
        for rec, block in zip(records, net.param_slices()):
            a, d = to_numpy(rec.A_H[n]), to_numpy(rec.DS[n])
            ref = sum(_host_np.kron(a[t], d[t]) for t in range(a.shape[0]))
            err = max(err, _rel_err(flat[block], ref))
    return measured("conventions.flat_gradient", err, {"float64": 1e-10, "float32": 1e-4}, dtype)


# --------------------------------------------------------------------------- Theorem 3
#: Same function (Lemma 2): a few matmuls/solves with condition numbers <= 16.
SAME_FUNCTION_TOL = {"float64": 1e-12, "float32": 1e-5}
#: Undamped KFC on N vs N-dagger: round-off times the factors' condition numbers; measured
#: <= 2e-12 (float64, 60 seeds) and <= 1.2e-3 (float32, 400 seeds).
INVARIANCE_TOL = {"float64": 1e-8, "float32": 5e-3}
#: A non-invariant update must move the networks apart by at least this (measured >= 0.13).
CONTROL_MIN = {"float64": 1e-2, "float32": 1e-2}
THEOREM3_LR = 0.5


class PreconditionError(ValueError):
    """A check's case does not satisfy the precondition of the theorem it tests."""


def require_full_rank_omega(net, params, x) -> None:
    """Theorem 3 is about *undamped* KFC, which inverts every Omega: raise PreconditionError
    naming the layer unless each Omega (from the patches of x; no sampling) has full rank, with
    singular values below dim * eps(dtype) * largest counted as zero."""
    tape = net.forward(params, x)
    for rec in net.records(tape, {}):
        om = to_numpy(omega_from_patches(rec.patches)).astype(_host_np.float64)
        s = _host_np.linalg.svd(om, compute_uv=False)
        tol = om.shape[0] * _host_np.finfo(rec.patches.dtype).eps * s[0]
        rank = int((s > tol).sum())
        if rank < om.shape[0]:
            raise PreconditionError(
                f"Theorem 3 needs a full-rank Omega (undamped KFC inverts it); layer "
                f"{rec.layer_index} ({type(net.layers[rec.layer_index]).__name__}) has rank "
                f"{rank} < {om.shape[0]} on N={x.shape[0]} examples x |T|="
                f"{rec.num_locations} locations; use more examples")


def _theorem3_case(rng, dtype, xp, *, padded, orthogonal=False, shifts=True, n=None):
    """Two tanh convs, Flatten, softmax Dense; N so that every Omega is full rank (asserted by
    :func:`require_full_rank_omega`; ``n`` overrides N)."""
    if padded:   # zero padding: shifts d are drawn as 0 in front of the convs (Eq. 79 caveat)
        layers, shape, default_n = [Conv2d(2, 3, 3, padding=1), Tanh(),
                                    Conv2d(3, 2, 3, stride=2, padding=1)], (2, 4, 4), 24
    else:
        layers, shape, default_n = [Conv2d(2, 3, 3), Tanh(), Conv2d(3, 2, 2)], (2, 5, 5), 20
    n = n or default_n
    net = Sequential(layers + [Tanh(), Flatten(), Dense(8, 3)], shape)
    params = net.init(rng, dtype=dtype)
    for p in params:
        if p is not None:
            p[:, 0] = rng.normal(0.0, 0.3, p.shape[0])
    params = [None if p is None else xp.asarray(p) for p in params]
    x, x_test = (_on(xp, rng.normal(size=(m,) + shape), dtype) for m in (n, 16))
    require_full_rank_omega(net, params, x)
    y = xp.asarray(rng.integers(0, 3, n))
    reparam = random_reparameterization(net, rng, params[0], orthogonal=orthogonal,
                                        shifts=shifts)
    return net, params, x, y, x_test, reparam


@register("theorem3.same_function", "Lemma 2: N-dagger (Eq. 24) with W_bar-dagger of Eq. 84 "
          "computes the same logits as N (valid convs, shifts c and d)")
def check_same_function(rng, dtype, xp):
    net, params, _, _, x_test, reparam = _theorem3_case(rng, dtype, xp, padded=False)
    err = function_discrepancy(net, params, dagger_network(net, reparam),
                               dagger_params(net, params, reparam), x_test)
    return measured("theorem3.same_function", err, SAME_FUNCTION_TOL, dtype)


def _invariance(name, rng, dtype, xp, *, padded, method="kfc", damping=None, orthogonal=False,
                shifts=True, tol=INVARIANCE_TOL, expect="below"):
    net, params, x, y, x_test, reparam = _theorem3_case(rng, dtype, xp, padded=padded,
                                                        orthogonal=orthogonal, shifts=shifts)
    err = invariance_error(net, params, reparam, x, y, x_test, seed=int(rng.integers(2**31)),
                           lr=THEOREM3_LR, method=method, damping=damping)
    detail = (f"max |log p| gap after one step, method={method}"
              f"{'' if damping is None else f', damping={damping}'}, "
              f"{'padded' if padded else 'valid'} convs, "
              f"{'orthogonal' if orthogonal else 'general'} U,V, "
              f"shifts={'yes' if shifts else 'no'}")
    return measured(name, err, tol, dtype, detail, expect)


@register("theorem3.kfc_invariant", "Theorem 3: one undamped KFC step on N-dagger, mapped "
          "back, equals the step on N (valid convs, shifts c and d)")
def check_kfc_invariant(rng, dtype, xp):
    return _invariance("theorem3.kfc_invariant", rng, dtype, xp, padded=False)


@register("theorem3.kfc_invariant_padded", "Theorem 3 with zero-padded strided convs (d = 0 "
          "in front of them, shifts c kept)")
def check_kfc_invariant_padded(rng, dtype, xp):
    return _invariance("theorem3.kfc_invariant_padded", rng, dtype, xp, padded=True)


@register("theorem3.damped_orthogonal", "damped KFC (factored, pi) stays invariant for "
          "orthogonal U, V without shifts")
def check_damped_orthogonal(rng, dtype, xp):
    return _invariance("theorem3.damped_orthogonal", rng, dtype, xp, padded=False,
                       method="kfc-damped", damping=1e-2, orthogonal=True, shifts=False)


@register("control.sgd_not_invariant", "negative control: plain SGD is not invariant "
          "(discrepancy must reach the tolerance)")
def check_control_sgd(rng, dtype, xp):
    return _invariance("control.sgd_not_invariant", rng, dtype, xp, padded=False,
                       method="sgd", tol=CONTROL_MIN, expect="above")


@register("control.diagonal_fisher_not_invariant", "negative control: a diagonal-Fisher "
          "preconditioner is not invariant")
def check_control_diagonal(rng, dtype, xp):
    return _invariance("control.diagonal_fisher_not_invariant", rng, dtype, xp, padded=False,
                       method="diagonal-fisher", damping=1e-4, tol=CONTROL_MIN, expect="above")


@register("control.damped_kfc_not_invariant", "negative control: damped KFC with "
          "non-orthogonal U, V is not invariant")
def check_control_damped(rng, dtype, xp):
    return _invariance("control.damped_kfc_not_invariant", rng, dtype, xp, padded=False,
                       method="kfc-damped", damping=1e-2, tol=CONTROL_MIN, expect="above")


# --------------------------------------------------------------------------- Theorems 1, 2
#: Both sides of Theorems 1/2 are sums of <= ~1e4 O(1) products: ~1e-14 (float64), ~1e-6 (32).
IDENTITY_TOL = {"float64": 1e-10, "float32": 1e-4}
#: A broken assumption (SUD) or the plug-in estimator must miss by at least this (relative).
BROKEN_MIN = {"float64": 1e-2, "float32": 1e-2}


def _random_fields(rng, dtype, xp, der_filter=(1, 1), geom=None, grid=None):
    """A conv geometry (random unless given), SH activations on its input grid and SUD
    derivatives (white across locations when der_filter is 1x1) on its output grid."""
    h, w = grid or (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
    k = int(rng.integers(1, 4))
    geom = geom or ConvGeometry(k, k, int(rng.integers(1, 3)), int(rng.integers(0, 2)))
    while True:   # make the kernel fit the padded input
        try:
            grid = geom.output_shape(h, w)
            break
        except ValueError:
            h, w = h + 1, w + 1
    on = lambda f: StationaryGaussianField(_on(xp, f.filt, dtype), _on(xp, f.mean, dtype), f.grid)
    act = StationaryGaussianField.random(rng, int(rng.integers(1, 3)), (h, w), 2, (2, 3))
    der = StationaryGaussianField.random(rng, int(rng.integers(1, 3)), grid, 2, der_filter,
                                         mean_scale=0.0)
    return geom, on(act), on(der)


def _rel_fro(a, b) -> float:
    a, b = to_numpy(a).astype(_host_np.float64), to_numpy(b).astype(_host_np.float64)
    return float(_host_np.linalg.norm(a - b) / _host_np.linalg.norm(b))


@register("theorem1.exact", "Theorem 1 (Eqs. 16-19, 47): under IAD+SH+SUD (Gaussian fields), "
          "E[vec(DW_bar) vec(DW_bar)^T] = Omega kron Gamma(0) exactly (beta construction)")
def check_theorem1(rng, dtype, xp):
    geom, act, der = _random_fields(rng, dtype, xp)
    err = _rel_fro(theorem1_prediction(act, der, geom),
                   exact_gradient_second_moment(act, der, geom))
    return measured("theorem1.exact", err, IDENTITY_TOL, dtype, f"{geom}, grid {act.grid}")


@register("control.theorem1_without_sud", "negative control: derivatives correlated across "
          "locations (SUD broken, 3x3 filter; 3x3 conv, padding 1, 4x4 grid) make Theorem 1 miss")
def check_theorem1_without_sud(rng, dtype, xp):
    geom, act, der = _random_fields(rng, dtype, xp, der_filter=(3, 3),
                                    geom=ConvGeometry(3, 3, 1, 1), grid=(4, 4))
    der.filt = xp.abs(der.filt) + 0.5                   # strongly positive neighbours
    err = _rel_fro(theorem1_prediction(act, der, geom),
                   exact_gradient_second_moment(act, der, geom))
    return measured("control.theorem1_without_sud", err, BROKEN_MIN, dtype, expect="above")


@register("theorem2.beta_construction", "Theorem 2 (Eq. 23): E[[[A]]_H^T [[A]]_H] equals the "
          "beta-weighted construction of Eq. 19/47 under exact SH; [Omega]_00 = |T|")
def check_theorem2(rng, dtype, xp):
    geom, act, _ = _random_fields(rng, dtype, xp)
    exact = exact_omega(act, geom)
    built = omega_from_autocovariance(act.autocovariance(geom), act.mean, geom, *act.grid)
    ho, wo = geom.output_shape(*act.grid)
    corner = abs(float(exact[0, 0]) - ho * wo) / (ho * wo)
    return measured("theorem2.beta_construction", max(_rel_fro(built, exact), corner),
                    IDENTITY_TOL, dtype, f"{geom}, grid {act.grid}")


def _plugin_and_gram_eigs(rng, dtype, xp, draws=10):
    """Smallest eigenvalue / largest |eigenvalue| of the plug-in Omega (Eq. 19 with empirical
    autocovariances) and of the Gram Omega (Theorem 2) on the same single example, per draw."""
    geom, out = ConvGeometry(3, 3, 1, 1), []
    for _ in range(draws):
        x = _on(xp, rng.normal(size=(1, 2, 3, 3)), dtype)
        pair = []
        for om in (plugin_omega(x, geom), omega_from_patches(im2col(x, geom))):
            ev = _host_np.linalg.eigvalsh(to_numpy(om).astype(_host_np.float64))
            pair.append(ev[0] / _host_np.abs(ev).max())
        out.append(pair)
    return _host_np.array(out)


@register("control.plugin_not_psd", "negative control (Sec. 3.1): the plug-in autocovariance "
          "Omega is indefinite; -min eig / max |eig|, most negative of 10 one-example draws")
def check_plugin_not_psd(rng, dtype, xp):
    ratios = _plugin_and_gram_eigs(rng, dtype, xp)
    return measured("control.plugin_not_psd", -ratios[:, 0].min(), BROKEN_MIN, dtype,
                    expect="above")


@register("theorem2.gram_psd", "the Gram estimator (Theorem 2) on the same data is PSD: "
          "max(0, -min eig) / max eig")
def check_gram_psd(rng, dtype, xp):
    ratios = _plugin_and_gram_eigs(rng, dtype, xp)
    return measured("theorem2.gram_psd", max(0.0, -ratios[:, 1].min()),
                    {"float64": 1e-12, "float32": 1e-5}, dtype)


@register("theorem2.kfac_1x1", "a 1x1 conv on a 1x1 map is K-FAC's dense layer: same exact "
          "Fisher, same Omega and Gamma")
def check_kfac_1x1(rng, dtype, xp):
    j, i, c, n = (int(rng.integers(lo, hi)) for lo, hi in ((1, 4), (1, 4), (2, 5), (1, 5)))
    conv = Sequential([Conv2d(j, i, 1), Tanh(), Flatten(), Dense(i, c)], (j, 1, 1))
    dense = Sequential([Dense(j, i), Tanh(), Dense(i, c)], (j,))
    params = [None if p is None else xp.asarray(p) for p in dense.init(rng, dtype)]
    params[0][:, 0] = _on(xp, rng.normal(size=i), dtype)
    conv_params = [params[0], None, None, params[2]]
    x = _on(xp, rng.normal(size=(n, j)), dtype)
    x_img = x.reshape(n, j, 1, 1)
    err = _rel_fro(true_fisher(conv, conv_params, x_img), true_fisher(dense, params, x))
    seed = int(rng.integers(2**31))
    pairs = zip(network_factors(conv.sampled_records(conv_params, x_img, check_rng(seed, "f"))),
                network_factors(dense.sampled_records(params, x, check_rng(seed, "f"))))
    for a, b in pairs:
        err = max(err, _rel_fro(a.Omega, b.Omega), _rel_fro(a.Gamma, b.Gamma))
    return measured("theorem2.kfac_1x1", err, IDENTITY_TOL, dtype, f"J={j}, I={i}, C={c}, N={n}")
