"""Tests for kfc_ref.curvature.damping: pi (Eq. 8), factored damping (Eqs. 7, 20-22), exact
damping (App. B.2).

* Eq. 7's residual is pi r (I kron Gamma) + (r/pi) (Omega kron I) exactly, and pi_trace (Eq. 8
  with the trace norm) is the argmin of the triangle-inequality bound on its trace norm, checked
  against a dense grid of pi;
* factored and exact damped solves equal dense solves, in BOTH vec orders: column stacking
  ((Omega kron Gamma) vec(X) = vec(Gamma X Omega), kfc_ref's flat order) and NumPy's row-major
  ravel ((Gamma kron Omega) X.ravel() = (Gamma X Omega).ravel());
* rank-deficient factors with tiny damping give finite results; damping <= 0 is rejected.

Factor sizes, ranks and damping are drawn by hypothesis; every check runs in float64 (tight) and
float32 (loose) with the tolerances named below.  Dense references are computed in float64 from
the same (possibly float32) inputs.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from guarded_xp import asguarded, counting, guarded
from kfc_ref.curvature.damping import (
    NonFiniteCurvatureError, eigen_decompositions, eigen_factors, factored_inverse,
    factored_inverses, natural_gradient, pi_trace, pi_trace_array, symmetrize,
)
from kfc_ref.backend import to_numpy
from kfc_ref.curvature.factors import KroneckerFactors
from kfc_ref.validate import ArgumentError

#: Relative error of a damped solve vs a dense float64 solve.  The damped matrices drawn here
#: have condition numbers <= ~1e4 (factor eigenvalues <= ~30, damping >= 1e-2), so float64
#: round-off is <= 1e4 * 1e-16 * small constants; float32 gets 1e4 * 1.2e-7 ~ 1e-3.
SOLVE_RTOL = {"float64": 1e-9, "float32": 5e-3}
#: pi_trace vs the minimum of the bound over a dense grid, relative: the grid cannot go below
#: the true minimum, so only round-off of the bound evaluation remains.
ARGMIN_RTOL = {"float64": 1e-12, "float32": 1e-5}
#: Grid of pi / pi_trace for the argmin check: 4001 log-spaced points over [e^-4, e^4].
PI_GRID = np.exp(np.linspace(-4.0, 4.0, 4001))
#: Identity of Eq. 7's residual, relative to the largest entry (a few flops per entry).
RESIDUAL_RTOL = {"float64": 1e-13, "float32": 1e-5}
#: Rank-deficient factors with damping 1e-10: the damped system has condition ~1e12, so the
#: solution itself is not accurate; we check it is finite and that the eigen solve is backward
#: stable: ||A x - g|| <= tol (||A||_2 ||x|| + ||g||), tol a few hundred float64 eps.
RANK_DEFICIENT_BACKWARD_RTOL = 1e-13

DTYPES = ["float64", "float32"]


@st.composite
def factor_pairs(draw, full_rank=True):
    """(Omega, Gamma) PSD Gram matrices with drawn sizes/ranks, float64 host arrays."""
    seed = draw(st.integers(0, 2**31 - 1))
    d_omega, d_gamma = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)

    def gram(d):
        rank = d if full_rank else draw(st.integers(0, d))
        B = rng.normal(size=(d, max(rank, 0))) * rng.uniform(0.2, 2.0)
        return B @ B.T
    return gram(d_omega), gram(d_gamma), rng


dampings = st.floats(1e-2, 1.0)


def dense_residual_bound(Omega, Gamma, pis, r):
    """pi r ||I kron Gamma||_tr + (r/pi) ||Omega kron I||_tr with the trace (nuclear) norm of
    the dense Kronecker products, for an array of pi values."""
    eye_o, eye_g = np.eye(Omega.shape[0]), np.eye(Gamma.shape[0])
    left = np.linalg.norm(np.kron(eye_o, Gamma), "nuc")
    right = np.linalg.norm(np.kron(Omega, eye_g), "nuc")
    return pis * r * left + (r / pis) * right


def vec(X):
    """The paper's column-stacking vec."""
    return X.ravel(order="F")


def rel_err(a, b):
    return np.abs(np.asarray(a, dtype=np.float64) - b).max() / max(np.abs(b).max(), 1e-300)


# --------------------------------------------------------------------------- pi, Eq. 7-8
@pytest.mark.parametrize("dtype", DTYPES)
@given(factor_pairs(), dampings, st.floats(0.0, 1.0))
def test_pi_trace_minimises_the_residual_bound(to_xp, dtype, pair, damping, weight_decay):
    Omega, Gamma, _ = pair
    Om, Ga = to_xp(Omega.astype(dtype)), to_xp(Gamma.astype(dtype))
    r = np.sqrt(damping + weight_decay)
    pi = pi_trace(Om, Ga)
    grid = dense_residual_bound(Omega, Gamma, pi * PI_GRID, r)
    at_pi = dense_residual_bound(Omega, Gamma, pi, r)
    assert at_pi <= grid.min() * (1 + ARGMIN_RTOL[dtype])
    # and the grid's argmin sits next to pi (the bound is strictly convex in log pi)
    assert abs(np.log(PI_GRID[grid.argmin()])) <= 2 * (np.log(PI_GRID[1]) - np.log(PI_GRID[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@given(factor_pairs(), dampings)
def test_eq7_residual_is_the_two_cross_terms(to_xp, dtype, pair, damping):
    """(Omega + pi r I) kron (Gamma + r/pi I) - (Omega kron Gamma + r^2 I)
       = pi r (I kron Gamma) + (r/pi) (Omega kron I).  pi from the --xp module, the dense
    Kronecker products on the host."""
    Omega, Gamma, _ = pair
    Om, Ga = Omega.astype(dtype), Gamma.astype(dtype)
    r, pi = np.sqrt(damping), pi_trace(to_xp(Om), to_xp(Ga))
    eo, eg = np.eye(Om.shape[0], dtype=dtype), np.eye(Ga.shape[0], dtype=dtype)
    lhs = (np.kron(Om + pi * r * eo, Ga + (r / pi) * eg)
           - (np.kron(Om, Ga) + r * r * np.kron(eo, eg)))
    rhs = pi * r * np.kron(eo, Ga) + (r / pi) * np.kron(Om, eg)
    assert rel_err(lhs, rhs) <= RESIDUAL_RTOL[dtype] * max(1.0, np.abs(lhs).max())


def test_pi_trace_formula_and_dead_layer(to_xp):
    Omega, Gamma = to_xp(np.diag([4.0, 2.0])), to_xp(np.diag([1.0, 1.0, 1.0]))
    assert pi_trace(Omega, Gamma) == pytest.approx(np.sqrt(3.0 / 1.0))
    assert pi_trace(Omega, to_xp(np.zeros((3, 3)))) == 1.0


# --------------------------------------------------------------------------- solves
@pytest.mark.parametrize("dtype", DTYPES)
@given(factor_pairs(), dampings, st.floats(0.0, 0.5), st.booleans())
def test_factored_solve_equals_dense_solve_in_both_vec_orders(to_xp, dtype, pair, damping,
                                                              weight_decay, use_pi):
    Omega, Gamma, rng = pair
    G = rng.normal(size=(Gamma.shape[0], Omega.shape[0]))
    inv = factored_inverse(to_xp(Omega.astype(dtype)), to_xp(Gamma.astype(dtype)), damping,
                           weight_decay, use_pi=use_pi)
    out = to_numpy(inv.apply(to_xp(G.astype(dtype))))
    assert out.dtype == np.dtype(dtype)
    r = np.sqrt(damping + weight_decay)
    pi = pi_trace(Omega, Gamma) if use_pi else 1.0
    Om_d = Omega + pi * r * np.eye(Omega.shape[0])
    Ga_d = Gamma + (r / pi) * np.eye(Gamma.shape[0])
    col_stacking = np.linalg.solve(np.kron(Om_d, Ga_d), vec(G))
    row_major = np.linalg.solve(np.kron(Ga_d, Om_d), G.ravel())
    assert rel_err(vec(out), col_stacking) <= SOLVE_RTOL[dtype]
    assert rel_err(out.ravel(), row_major) <= SOLVE_RTOL[dtype]
    assert float(inv.pi) == pytest.approx(pi, rel=SOLVE_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(factor_pairs(), dampings)
def test_exact_damped_solve_equals_dense_solve_in_both_vec_orders(to_xp, dtype, pair, damping):
    Omega, Gamma, rng = pair
    G = rng.normal(size=(Gamma.shape[0], Omega.shape[0]))
    out = to_numpy(eigen_factors(to_xp(Omega.astype(dtype)), to_xp(Gamma.astype(dtype)))
                   .apply(to_xp(G.astype(dtype)), damping))
    assert out.dtype == np.dtype(dtype)
    n = Omega.shape[0] * Gamma.shape[0]
    col_stacking = np.linalg.solve(np.kron(Omega, Gamma) + damping * np.eye(n), vec(G))
    row_major = np.linalg.solve(np.kron(Gamma, Omega) + damping * np.eye(n), G.ravel())
    assert rel_err(vec(out), col_stacking) <= SOLVE_RTOL[dtype]
    assert rel_err(out.ravel(), row_major) <= SOLVE_RTOL[dtype]


@pytest.mark.host_only("NumPy's Kronecker identities behind the dense references; no kfc_ref code")
def test_kronecker_orders_act_as_stated():
    """The identities the two vec orders rest on, once, with a non-square X."""
    rng = np.random.default_rng(0)
    Omega, Gamma, X = rng.normal(size=(4, 4)), rng.normal(size=(3, 3)), rng.normal(size=(3, 4))
    np.testing.assert_allclose(np.kron(Omega, Gamma) @ vec(X), vec(Gamma @ X @ Omega.T))
    np.testing.assert_allclose(np.kron(Gamma, Omega) @ X.ravel(), (Gamma @ X @ Omega.T).ravel())
    # for the symmetric factors of KFC Omega^T = Omega, which gives the forms in the docstrings


@pytest.mark.parametrize("dtype", DTYPES)
@given(factor_pairs(full_rank=False))
def test_rank_deficient_factors_at_tiny_damping_stay_finite(to_xp, dtype, pair):
    Omega, Gamma, rng = pair
    G = rng.normal(size=(Gamma.shape[0], Omega.shape[0]))
    damping = 1e-10
    Om, Ga, Gd = (to_xp(a.astype(dtype)) for a in (Omega, Gamma, G))
    exact = to_numpy(eigen_factors(Om, Ga).apply(Gd, damping))
    factored = to_numpy(factored_inverse(Om, Ga, damping).apply(Gd))
    assert np.all(np.isfinite(exact)) and np.all(np.isfinite(factored))
    if dtype == "float64":
        n = Omega.shape[0] * Gamma.shape[0]
        A = np.kron(Omega, Gamma) + damping * np.eye(n)
        x, g = vec(exact), vec(G)
        scale = np.linalg.norm(A, 2) * np.linalg.norm(x) + np.linalg.norm(g)
        assert np.linalg.norm(A @ x - g) <= RANK_DEFICIENT_BACKWARD_RTOL * scale


def test_eigen_factors_clip_negative_round_off(to_xp):
    Omega = np.array([[1.0, 1.0], [1.0, 1.0]]) - 1e-14 * np.eye(2)   # eigenvalue -1e-14
    eig = eigen_factors(to_xp(Omega), to_xp(np.eye(1)))
    assert to_numpy(eig.d_Omega).min() == 0.0
    np.testing.assert_allclose(to_numpy(symmetrize(to_xp(np.array([[1.0, 2.0], [0.0, 1.0]])))),
                               [[1.0, 1.0], [1.0, 1.0]])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("damping", [0.0, -1e-3, float("nan")])
def test_nonpositive_damping_is_rejected(to_xp, damping):
    Omega, Gamma, G = to_xp(np.eye(2)), to_xp(np.eye(3)), to_xp(np.ones((3, 2)))
    with pytest.raises(ArgumentError, match="damping=.* expected a finite number > 0"):
        factored_inverse(Omega, Gamma, damping)
    with pytest.raises(ArgumentError, match="damping=.* expected a finite number > 0"):
        eigen_factors(Omega, Gamma).apply(G, damping)


def test_negative_weight_decay_and_mismatched_lists_are_rejected(to_xp):
    eye = to_xp(np.eye(2))
    with pytest.raises(ArgumentError, match="weight_decay=-0.1 is not allowed"):
        factored_inverse(eye, eye, 1e-3, weight_decay=-0.1)
    with pytest.raises(ArgumentError, match="2 gradients but 1 inverses"):
        natural_gradient([to_xp(np.ones((2, 2)))] * 2, [factored_inverse(eye, eye, 1.0)])


def test_natural_gradient_applies_eq_22_per_layer(to_xp):
    rng = np.random.default_rng(1)
    invs = [factored_inverse(to_xp(np.eye(3) * 2), to_xp(np.eye(2) * 3), 1.0),
            factored_inverse(to_xp(np.eye(1)), to_xp(np.eye(4)), 0.5)]
    grads = [rng.normal(size=(2, 3)), rng.normal(size=(4, 1))]
    outs = natural_gradient([to_xp(g) for g in grads], invs)
    for out, g, inv in zip(outs, grads, invs):
        np.testing.assert_allclose(to_numpy(out),
                                   to_numpy(inv.Gamma_inv) @ g @ to_numpy(inv.Omega_inv))


# --------------------------------------------------------------------------- failure semantics
def _factors(to_device, bad=None):
    """Three layers of well-conditioned factors; ``bad`` = (layer, "Omega"|"Gamma") gets a NaN."""
    out = []
    for l, (a, b) in enumerate([(3, 2), (4, 3), (2, 5)]):
        Om, Ga = np.eye(a) * (l + 1.0), np.eye(b) * 2.0
        if bad == (l, "Omega"):
            Om[0, 1] = Om[1, 0] = np.nan
        if bad == (l, "Gamma"):
            Ga[b - 1, b - 1] = np.inf
        out.append(KroneckerFactors(to_device(Om), to_device(Ga), 1))
    return out


@pytest.mark.parametrize("namespace", ["numpy", "guarded", "--xp"])
@pytest.mark.parametrize("bad", [(1, "Omega"), (2, "Gamma")])
def test_non_finite_factors_raise_the_same_error_on_every_namespace(to_xp, namespace, bad):
    """NumPy's inv/eigh may raise LinAlgError or return NaN on NaN input; CuPy's return NaN
    silently.  The finiteness checks before inversion and eigendecomposition raise one error
    naming the layer and factor on both (the guarded namespace stands in for CuPy; "--xp" is
    the module under test, CuPy itself under --xp cupy)."""
    to_device = {"numpy": np.asarray, "guarded": asguarded, "--xp": to_xp}[namespace]
    factors = _factors(to_device, bad)
    name = f"layer {bad[0]} {bad[1]}"
    with pytest.raises(NonFiniteCurvatureError, match=f"before inversion in: {name}\\. "):
        factored_inverses(factors, 1e-3)
    with pytest.raises(NonFiniteCurvatureError, match=f"before the eigendecomposition in: {name}"):
        eigen_decompositions(factors)
    f = factors[bad[0]]
    with pytest.raises(NonFiniteCurvatureError, match="before inversion in: "):
        factored_inverse(f.Omega, f.Gamma, 1e-3)
    with pytest.raises(NonFiniteCurvatureError, match="before the eigendecomposition"):
        eigen_factors(f.Omega, f.Gamma)
    assert issubclass(NonFiniteCurvatureError, RuntimeError)     # the CLI's one-line errors
    # Control: the same factors without the NaN pass.
    assert len(factored_inverses(_factors(to_device), 1e-3)) == 3


def test_silent_nan_from_eigh_is_caught_after_the_decomposition(monkeypatch):
    """CuPy's eigh returns NaN instead of raising when it does not converge: simulated on the
    guarded namespace, the check after the decomposition raises the same error."""
    def nan_eigh(a):
        w, Q = np.linalg.eigh(np.asarray(a.view(np.ndarray)))
        return asguarded(w * np.nan), asguarded(Q)
    monkeypatch.setattr(guarded.linalg, "eigh", nan_eigh, raising=False)
    with pytest.raises(NonFiniteCurvatureError, match="after the eigendecomposition in: "
                       "layer 0 eigh\\(Omega\\)"):
        eigen_decompositions(_factors(asguarded))


def test_finiteness_checks_cost_one_host_read_each():
    factors = _factors(asguarded)
    with counting() as c:
        factored_inverses(factors, 1e-3)
    assert c.syncs == 1
    with counting() as c:
        eigen_decompositions(factors)
    assert c.syncs == 2
    with counting() as c:
        pi = pi_trace_array(factors[0].Omega, factors[0].Gamma)
    assert c.syncs == 0 and float(pi) == pytest.approx(np.sqrt(1.0 / 2.0))


@given(size=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(["float32", "float64"]))
def test_spd_inverse_equals_inv_and_is_exactly_symmetric(to_xp, size, seed, dtype):
    """backend.spd_inverse (Cholesky on NumPy, inv elsewhere) on a damped Gram matrix equals
    numpy.linalg.inv to the dtype's round-off, and is exactly symmetric on NumPy; an
    indefinite matrix (where Cholesky fails) still gets its inverse."""
    from kfc_ref.backend import get_xp, spd_inverse
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, 2 * size))
    spd = (a @ a.T / (2 * size) + 0.1 * np.eye(size)).astype(dtype)
    got = to_numpy(spd_inverse(to_xp(spd)))
    tol = 1e-3 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, np.linalg.inv(spd.astype(np.float64)), rtol=tol,
                               atol=tol * np.abs(got).max())
    if get_xp(to_xp(spd)) is np:                   # the Cholesky path
        np.testing.assert_array_equal(got, got.T)
    indefinite = np.diag(np.arange(1, size + 1, dtype=dtype) * np.where(
        np.arange(size) % 2 == 0, 1.0, -1.0).astype(dtype))
    np.testing.assert_allclose(to_numpy(spd_inverse(to_xp(indefinite))),
                               np.diag(1.0 / np.diag(indefinite)), rtol=tol)
