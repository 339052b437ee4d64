"""KroneckerOperator and KroneckerEigenOperator against dense `jnp.kron` oracles."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import lineax as lx
import numpy as np
import pytest

import eqx_curv
from eqx_curv.testing import kronecker_factors


SHAPES = ((1, 1), (3, 5), (6, 4), (8, 8))
PSD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def psd_factor(n, seed, cond=1e2):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def vec(x):
    # Row-major: the order of jax.flatten_util.ravel_pytree.
    return np.asarray(x).ravel()


def dense_power(matrix, q):
    w, v = np.linalg.eigh(matrix)
    return (v * w**q) @ v.T


@hypothesis.given(
    factors=kronecker_factors(SHAPES, conditions=(1e2,)), seed=st.integers(0, 2**16)
)
def test_kronecker_identities(factors, seed):
    a, b = (np.asarray(f) for f in factors)
    m, n = shape = (a.shape[0], b.shape[0])
    op = eqx_curv.KroneckerOperator(*factors, tags=PSD)
    dense = np.kron(a, b)
    x = np.random.default_rng(seed).standard_normal(shape)
    rtol = 1e-10
    # (A ⊗ B) vec(X) = vec(A X B^T), with row-major vec.
    np.testing.assert_allclose(vec(op.mv(jnp.asarray(x))), dense @ vec(x), rtol=rtol)
    np.testing.assert_allclose(np.asarray(op.as_matrix()), dense, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(
        np.asarray(lx.materialise(op).as_matrix()), dense, rtol=rtol, atol=1e-14
    )
    np.testing.assert_allclose(np.asarray(lx.diagonal(op)), np.diag(dense), rtol=rtol)
    # Inverse and powers.
    for q, got in [
        (-1.0, op.inverse()),
        (0.5, op.power(0.5)),
        (-0.25, op.power(-0.25)),
    ]:
        # Forward error of f(A) through an eigendecomposition: about eps * cond(A) * |f(A)|.
        want = dense_power(dense, q)
        kappa = np.linalg.cond(dense)
        atol = 10 * np.finfo(np.float64).eps * kappa * np.abs(want).max()
        np.testing.assert_allclose(
            np.asarray(got.as_matrix()), want, rtol=1e-8, atol=atol
        )
    # Exact damped inverse and damped powers through the eigenbases.
    lam = 0.3
    damped = dense + lam * np.eye(m * n)
    for q in (-1.0, -0.5):
        got = op.damped_power(lam, q, method="exact")
        assert isinstance(got, eqx_curv.KroneckerEigenOperator)
        np.testing.assert_allclose(
            vec(got.mv(jnp.asarray(x))), dense_power(damped, q) @ vec(x), rtol=1e-9
        )
        np.testing.assert_allclose(
            np.asarray(lx.diagonal(got)), np.diag(dense_power(damped, q)), rtol=1e-9
        )
    np.testing.assert_allclose(
        vec(op.damped_inverse(lam).mv(jnp.asarray(x))),
        np.linalg.solve(damped, vec(x)),
        rtol=1e-9,
    )


def test_factored_damping_is_the_pi_adjusted_product():
    a, b = 5.0 * psd_factor(4, 0), 0.2 * psd_factor(3, 1)
    op = eqx_curv.KroneckerOperator(jnp.asarray(a), jnp.asarray(b), tags=PSD)
    lam = 1e-2
    pi = np.sqrt((np.trace(a) / 4) / (np.trace(b) / 3))
    expected = np.linalg.inv(
        np.kron(a + pi * np.sqrt(lam) * np.eye(4), b + np.sqrt(lam) / pi * np.eye(3))
    )
    got = op.damped_inverse(lam, method="factored")
    assert isinstance(got, eqx_curv.KroneckerOperator)
    np.testing.assert_allclose(np.asarray(got.as_matrix()), expected, rtol=1e-9)
    # With no damping, both methods are the exact inverse.
    exact = np.linalg.inv(np.kron(a, b))
    for method in ("exact", "factored"):
        np.testing.assert_allclose(
            np.asarray(op.damped_inverse(0.0, method=method).as_matrix()),
            exact,
            rtol=1e-7,
        )
    # Under pytest the Literal annotation itself is checked (jaxtyping + beartype);
    # without it the method raises a ValueError naming the argument.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="method"):
        op.damped_inverse(lam, method="pi")  # pyright: ignore  # testing the check
    with pytest.raises(ValueError, match="damping"):
        op.damped_inverse(-1.0)


def test_tags_and_lineax_solves():
    a, b = psd_factor(4, 2), psd_factor(3, 3)
    op = eqx_curv.KroneckerOperator(jnp.asarray(a), jnp.asarray(b), tags=PSD)
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    assert not lx.is_positive_semidefinite(
        eqx_curv.KroneckerOperator(jnp.asarray(a), -jnp.asarray(b))
    )
    g = np.random.default_rng(0).standard_normal((4, 3))
    lam = 0.1
    expected = np.linalg.solve(np.kron(a, b) + lam * np.eye(12), vec(g))
    damped = op + lam * lx.IdentityLinearOperator(op.in_structure())
    for solver in (lx.AutoLinearSolver(well_posed=True), lx.LU()):
        sol = lx.linear_solve(damped, jnp.asarray(g), solver).value
        np.testing.assert_allclose(vec(sol), expected, rtol=1e-9)
    psd_damped = lx.TaggedLinearOperator(damped, lx.positive_semidefinite_tag)
    for solver in (lx.CG(rtol=1e-12, atol=1e-12), lx.Cholesky()):
        sol = lx.linear_solve(psd_damped, jnp.asarray(g), solver).value
        np.testing.assert_allclose(vec(sol), expected, rtol=1e-8)
    inv = lx.invert(op).mv(jnp.asarray(g))
    np.testing.assert_allclose(
        vec(inv), np.linalg.solve(np.kron(a, b), vec(g)), rtol=1e-8
    )
    # Composes with other operators and with grad through a solve.
    composed = op @ op.inverse()
    np.testing.assert_allclose(
        np.asarray(composed.mv(jnp.asarray(g))), g, rtol=1e-8, atol=1e-12
    )

    def loss(scale):
        scaled = eqx_curv.KroneckerOperator(scale * jnp.asarray(a), jnp.asarray(b))
        return jnp.sum(lx.linear_solve(scaled, jnp.asarray(g)).value)

    grad = jax.grad(loss)(2.0)
    np.testing.assert_allclose(float(grad), -float(loss(2.0)) / 2.0, rtol=1e-8)


def test_jit_and_float32_precision():
    a, b = psd_factor(16, 4), psd_factor(12, 5)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    x = np.random.default_rng(1).standard_normal((16, 12))

    @jax.jit
    def apply(a, b, x):
        return eqx_curv.KroneckerOperator(a, b, tags=PSD).damped_inverse(1e-2).mv(x)

    got = apply(a32, b32, jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.float32
    dense = np.kron(a32.astype(np.float64), b32.astype(np.float64)) + 1e-2 * np.eye(192)
    expected = np.linalg.solve(dense, vec(x))
    # Relative to the solution's scale; the damped system has condition number 1e2.
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(
        vec(got), expected, atol=100 * 1e2 * eps * np.abs(expected).max()
    )


def test_bad_factors_raise():
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="left"):
        eqx_curv.KroneckerOperator(jnp.ones((2, 3)), jnp.eye(2))
    with pytest.raises(ValueError, match="dtype"):
        eqx_curv.KroneckerOperator(jnp.eye(2), jnp.eye(2, dtype=jnp.float32))
    op = eqx_curv.KroneckerOperator(jnp.eye(2), jnp.eye(3))
    with pytest.raises(ValueError, match="structure"):
        op.mv(jnp.ones((3, 2)))


def test_damped_operator_of_a_kronecker_product():
    # DampedOperator keeps the PSD tag, so CG and Cholesky accept A ⊗ B + lam I.
    a, b = psd_factor(5, 6), psd_factor(4, 7)
    lam = 0.05
    op = eqx_curv.DampedOperator(
        eqx_curv.KroneckerOperator(jnp.asarray(a), jnp.asarray(b), tags=PSD), lam
    )
    assert lx.is_positive_semidefinite(op)
    g = np.random.default_rng(3).standard_normal((5, 4))
    expected = np.linalg.solve(np.kron(a, b) + lam * np.eye(20), vec(g))
    for solver in (
        lx.CG(rtol=1e-12, atol=1e-12),
        eqx_curv.CG(rtol=1e-12, atol=1e-12, max_steps=200),
        lx.Cholesky(),
    ):
        sol = lx.linear_solve(op, jnp.asarray(g), solver).value
        np.testing.assert_allclose(vec(sol), expected, rtol=1e-8)
    exact = eqx_curv.KroneckerOperator(
        jnp.asarray(a), jnp.asarray(b), tags=PSD
    ).damped_inverse(lam)
    np.testing.assert_allclose(vec(exact.mv(jnp.asarray(g))), expected, rtol=1e-9)


# --- tags: given or shown, never assumed ----------------------------------------------


def test_tags_are_never_a_default_promise():
    a, b = jnp.diag(jnp.array([1.0, -2.0])), jnp.eye(3)
    op = eqx_curv.KroneckerOperator(a, b)
    # Concrete symmetric factors are shown symmetric; nothing says PSD.
    assert op.tags == frozenset([lx.symmetric_tag])
    assert lx.is_symmetric(op) and not lx.is_positive_semidefinite(op)
    dense = np.kron(np.asarray(a), np.asarray(b))
    # An even power of an indefinite factor: A^2 ⊗ B^2 = (A ⊗ B)^2, with 4 (not 0)
    # where the -2 was, and tagged PSD since it is.
    squared = op.power(2)
    np.testing.assert_allclose(np.asarray(squared.as_matrix()), dense @ dense)
    assert np.asarray(squared.left)[1, 1] == 4.0
    assert lx.is_positive_semidefinite(squared)
    np.testing.assert_allclose(
        np.asarray(op.power(3).as_matrix()), dense @ dense @ dense
    )
    assert not lx.is_positive_semidefinite(op.power(3))
    np.testing.assert_allclose(
        np.asarray(op.inverse().as_matrix()), np.linalg.inv(dense), rtol=1e-12
    )
    # A non-integer power of an operator not tagged PSD is refused with a sentence.
    with pytest.raises(ValueError, match="`exponent` is 0.5, a non-integer power"):
        op.power(0.5)
    # A PSD tag on concretely indefinite factors is refused, for small factors by
    # their eigenvalues and for large ones by their diagonals.
    with pytest.raises(ValueError, match="`left` has the eigenvalue -2"):
        eqx_curv.KroneckerOperator(a, b, tags=lx.positive_semidefinite_tag)
    big = jnp.diag(jnp.concatenate([jnp.ones(600), -jnp.ones(1)]))
    with pytest.raises(ValueError, match="`right` has the diagonal entry -1"):
        eqx_curv.KroneckerOperator(b, big, tags=lx.positive_semidefinite_tag)
    # So is one on eigenvalues of an eigendecomposed product that are negative.
    with pytest.raises(ValueError, match="The eigenvalues include -1"):
        eqx_curv.KroneckerEigenOperator(
            jnp.eye(2),
            jnp.eye(2),
            jnp.array([[1.0, -1.0], [2.0, 3.0]]),
            tags=lx.positive_semidefinite_tag,
        )
    # `tags=` takes one tag or an iterable, as lineax's operators do; a PSD tag
    # implies symmetry.
    one = eqx_curv.KroneckerOperator(b, b, tags=lx.positive_semidefinite_tag)
    many = eqx_curv.KroneckerOperator(b, b, tags=[lx.positive_semidefinite_tag])
    assert one.tags == many.tags == frozenset(PSD)
    # Traced factors cannot be checked: their tags are exactly the caller's, and
    # spectral functions then ask for a symmetric tag.
    seen = []
    jax.jit(lambda a: seen.append(eqx_curv.KroneckerOperator(a, b).tags))(a)
    assert seen == [frozenset()]
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="not tagged symmetric"):
        jax.jit(lambda a: eqx_curv.KroneckerOperator(a, b).damped_inverse(0.1).mv(x))(a)
    tagged = jax.jit(
        lambda a: (
            eqx_curv.KroneckerOperator(a, b, tags=lx.symmetric_tag)
            .damped_inverse(0.5)
            .mv(x)
        )
    )(a)
    np.testing.assert_allclose(
        vec(tagged), np.linalg.solve(dense + 0.5 * np.eye(6), vec(x)), rtol=1e-12
    )


def test_non_symmetric_factors_have_a_true_transpose():
    rng = np.random.default_rng(0)
    a = jnp.asarray(3 * np.eye(3) + rng.standard_normal((3, 3)))
    b = jnp.asarray(2 * np.eye(2) + rng.standard_normal((2, 2)))
    op = eqx_curv.KroneckerOperator(a, b)
    dense = np.kron(np.asarray(a), np.asarray(b))
    assert not lx.is_symmetric(op) and op.tags == frozenset()
    assert isinstance(op.T, eqx_curv.KroneckerOperator)
    np.testing.assert_allclose(np.asarray(op.T.as_matrix()), dense.T)
    with pytest.raises(ValueError, match="`left` is not symmetric"):
        eqx_curv.KroneckerOperator(a, b, tags=lx.symmetric_tag)
    with pytest.raises(ValueError, match="`right` is not symmetric"):
        eqx_curv.KroneckerOperator(jnp.eye(3), b, tags=lx.positive_semidefinite_tag)
    # Integer powers of general factors by products.
    np.testing.assert_allclose(
        np.asarray(op.power(-2).as_matrix()),
        np.linalg.matrix_power(np.linalg.inv(dense), 2),
        rtol=1e-10,
    )

    # The gradient of c . (A(s) ⊗ B)^{-1} g through GMRES needs the true transpose.
    g = jnp.asarray(rng.standard_normal((3, 2)))
    c = jnp.asarray(rng.standard_normal(6))
    direction = jnp.asarray(rng.standard_normal((3, 3)))
    solver = lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=100)

    def objective(left):
        op = eqx_curv.KroneckerOperator(left, b)
        return lx.linear_solve(op, g, solver).value.ravel() @ c

    def dense_objective(left):
        return jnp.linalg.solve(jnp.kron(left, b), g.ravel()) @ c

    grad = jax.grad(objective)(a)
    np.testing.assert_allclose(grad, jax.grad(dense_objective)(a), rtol=1e-8)
    h = 1e-6
    fd = (dense_objective(a + h * direction) - dense_objective(a - h * direction)) / (
        2 * h
    )
    np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=1e-7)
