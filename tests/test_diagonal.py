"""Diagonal estimators against the dense diagonal."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import operator_entry, ravel
from models import make_problem

import eqx_curv


def _op(name):
    build, oracle, _ = operator_entry(name)
    args = make_problem("layernorm", "softmax", jax.random.key(0))
    key = jax.random.key(1)
    return build(*args, key), oracle(*args, key)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_exact_diagonal(batch_size):
    op, dense = _op("hessian")
    diag = eqx_curv.exact_diagonal(op, batch_size=batch_size)
    assert jax.tree.structure(diag) == jax.tree.structure(op.in_structure())
    eps = float(jnp.finfo(dense.dtype).eps)
    np.testing.assert_allclose(ravel(diag), jnp.diag(dense), atol=100 * eps)
    # the reference page's "diagonal", H @ 1, is something else
    assert not np.allclose(dense.sum(1), jnp.diag(dense), atol=1e-3)


def test_exact_diagonal_of_any_lineax_operator():
    matrix = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    op = lx.MatrixLinearOperator(matrix, lx.symmetric_tag)
    np.testing.assert_allclose(eqx_curv.exact_diagonal(op), jnp.array([2.0, 3.0]))


def test_hutchinson_is_unbiased():
    op, dense = _op("ggn")
    num = 4000
    est = ravel(
        eqx_curv.hutchinson_diagonal(op, jax.random.key(2), num, batch_size=500)
    )
    # Var of z_j (Az)_j for Rademacher z: sum over k != j of A_jk^2.
    var = (dense**2).sum(1) - jnp.diag(dense) ** 2
    np.testing.assert_array_less(
        jnp.abs(est - jnp.diag(dense)), 5 * jnp.sqrt(var / num) + 1e-12
    )


def test_hutchinson_exact_on_diagonal_operator():
    d = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[4.0]])}
    op = lx.DiagonalLinearOperator(d)
    est = eqx_curv.hutchinson_diagonal(op, jax.random.key(3), 3)
    np.testing.assert_allclose(ravel(est), ravel(d))


def test_bad_arguments():
    op, _ = _op("ggn")
    with pytest.raises(ValueError, match="num_samples"):
        eqx_curv.hutchinson_diagonal(op, jax.random.key(0), 0)
    with pytest.raises(TypeError, match="operator"):  # jaxtyping, or ours
        eqx_curv.exact_diagonal(jnp.eye(3))  # pyright: ignore
    rect = lx.MatrixLinearOperator(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="square"):
        eqx_curv.exact_diagonal(rect)


def test_diagonals_over_part_of_the_parameters():
    """On an operator over a filtered parameter PyTree (None where frozen)."""
    op, dense = _op("ggn_head")
    structure = op.in_structure()
    assert any(
        leaf is None for leaf in jax.tree.leaves(structure, is_leaf=lambda x: x is None)
    )
    diag = eqx_curv.exact_diagonal(op)
    assert jax.tree.structure(diag) == jax.tree.structure(structure)
    eps = float(jnp.finfo(dense.dtype).eps)
    np.testing.assert_allclose(ravel(diag), jnp.diag(dense), atol=100 * eps)
    num = 400
    est = eqx_curv.hutchinson_diagonal(op, jax.random.key(4), num)
    assert jax.tree.structure(est) == jax.tree.structure(structure)
    var = (dense**2).sum(1) - jnp.diag(dense) ** 2
    np.testing.assert_array_less(
        jnp.abs(ravel(est) - jnp.diag(dense)), 5 * jnp.sqrt(var / num) + 1e-12
    )
