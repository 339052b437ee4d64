"""Seeded, jittable power iteration for the dominant eigenvalue of a symmetric matrix."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, PRNGKeyArray


_HIGHEST = jax.lax.Precision.HIGHEST


def _flat_matvec(matrix):
    """The product with `matrix` on flat vectors, and the dimension and dtype."""
    if isinstance(matrix, lx.AbstractLinearOperator):
        structure = matrix.in_structure()
        if jax.tree.structure(structure) != jax.tree.structure(matrix.out_structure()):
            raise ValueError(
                "`matrix` must be a square operator (same input and output structure) "
                "for power iteration; pass a symmetric operator such as a curvature "
                "operator."
            )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
        flat, unravel = jax.flatten_util.ravel_pytree(zeros)

        def matvec(v):
            return jax.flatten_util.ravel_pytree(matrix.mv(unravel(v)))[0]

        return matvec, flat.size, flat.dtype
    matrix = check_matrix(matrix)

    def matvec(v):
        return jnp.matmul(matrix, v, precision=_HIGHEST)

    return matvec, matrix.shape[0], matrix.dtype


def check_matrix(matrix, name="matrix"):
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"`{name}` must be a square 2-D array, but has shape {matrix.shape}; pass "
            "one symmetric matrix (use `jax.vmap` for a batch of them)."
        )
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating-point dtype, not {matrix.dtype}; cast it "
            "with `.astype(jnp.float32)`."
        )
    return matrix


def power_iteration(
    matrix: Float[Array, "n n"] | lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    max_steps: int = 100,
    rtol: float | None = None,
) -> tuple[Float[Array, ""], Float[Array, " n"]]:
    r"""The eigenvalue of largest magnitude of a symmetric matrix, by power iteration.

    Starting from a standard-normal vector drawn from `key`, repeats
    $v \leftarrow A v / \lVert A v \rVert$ and stops when the Rayleigh quotient
    $\lambda = v^\top A v$ changes by at most `rtol` relative to itself, or after
    `max_steps` products. The loop is a `jax.lax.while_loop`, so the function is
    jittable and `vmap`-able, and the same `key` always gives the same answer.

    For a positive semidefinite matrix the Rayleigh quotient never exceeds
    $\lambda_{\max}$ and approaches it from below.

    **Arguments:**

    - `matrix`: a symmetric square 2-D array, or a symmetric lineax operator (whose
        input PyTree is flattened as `jax.flatten_util.ravel_pytree` does).
    - `key`: a JAX PRNG key for the starting vector.
    - `max_steps`: the largest number of products with `matrix`.
    - `rtol`: relative tolerance on successive eigenvalue estimates. Defaults to
        the square root of the dtype's machine epsilon.

    **Returns:**

    A pair `(eigenvalue, eigenvector)`: the Rayleigh quotient (a scalar, signed) and
    the unit vector it was computed from (flat, of length $n$).
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"`max_steps` must be a positive Python int, but is {max_steps!r}."
        )
    matvec, n, dtype = _flat_matvec(matrix)
    if rtol is None:
        rtol = float(jnp.finfo(dtype).eps) ** 0.5
    v0 = jax.random.normal(key, (n,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    w0 = matvec(v0)
    lam0 = jnp.vdot(v0, w0)

    def cond(carry):
        step, _, _, lam, lam_prev = carry
        unconverged = jnp.abs(lam - lam_prev) > rtol * jnp.abs(lam)
        return (step < max_steps) & unconverged

    def body(carry):
        step, _, w, lam, _ = carry
        norm = jnp.linalg.norm(w)
        # A zero product means v is in the null space: keep the old vector.
        v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1), carry[1])
        w = matvec(v)
        return step + 1, v, w, jnp.vdot(v, w), lam

    init = (jnp.array(1), v0, w0, lam0, jnp.array(jnp.inf, dtype))
    _, v, _, lam, _ = jax.lax.while_loop(cond, body, init)
    return lam, v
