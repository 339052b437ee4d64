"""Seeded, jittable power iteration for the dominant eigenvalue of a symmetric matrix."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real

from .._misc import check_positive_int, check_scalar, HIGHEST, structure_of, zeros_from


def _flat_matvec(matrix):
    """The product with `matrix` on flat vectors, and the dimension and dtype."""
    if isinstance(matrix, lx.AbstractLinearOperator):
        structure = matrix.in_structure()
        if (
            eqx.tree_equal(
                structure_of(structure), structure_of(matrix.out_structure())
            )
            is not True
        ):
            raise ValueError(
                "`matrix` must be a square operator (the same input and output "
                f"structure) for power iteration, but it maps {structure_of(structure)} "
                f"to {structure_of(matrix.out_structure())}; pass a symmetric operator "
                "such as a curvature operator (for singular values of a rectangular "
                "`J`, iterate on `J.T @ J`)."
            )
        zeros = zeros_from(structure)
        flat, unravel = jax.flatten_util.ravel_pytree(zeros)
        if flat.size == 0:
            raise ValueError(
                "`matrix` acts on an empty PyTree (no unknowns); power iteration needs "
                "at least one."
            )
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise TypeError(
                "`matrix` must act on real floating-point vectors, but its input "
                f"structure has dtype {flat.dtype}."
            )

        def matvec(v):
            return jax.flatten_util.ravel_pytree(matrix.mv(unravel(v)))[0]

        return matvec, flat.size, flat.dtype
    matrix = check_matrix(matrix)

    def matvec(v):
        return jnp.matmul(matrix, v, precision=HIGHEST)

    return matvec, matrix.shape[0], matrix.dtype


def check_matrix(matrix, name="matrix"):
    """`matrix` as a JAX array, checked to be one non-empty square real matrix."""
    try:
        if isinstance(matrix, (str, bytes)):
            raise TypeError
        matrix = jnp.asarray(matrix)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a real floating-point array, not "
            f"{type(matrix).__name__}."
        ) from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"`{name}` must be a square 2-D array, but has shape {matrix.shape}; pass "
            "one symmetric matrix (use `jax.vmap` for a batch of them)."
        )
    if matrix.shape[0] == 0:
        raise ValueError(
            f"`{name}` is empty (shape {matrix.shape}); pass a matrix with at least "
            "one row."
        )
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating-point dtype, not {matrix.dtype}; cast "
            "it with `.astype(jnp.float32)`."
        )
    return matrix


class PowerIterationResult(eqx.Module):
    r"""The result of [`eqx_curv.power_iteration`][].

    **Fields:**

    - `eigenvalue`: the Rayleigh quotient $\lambda = v^\top A v$ (signed), the estimate
        of the eigenvalue of largest magnitude.
    - `eigenvector`: the unit vector $v$ it was computed from (flat, of length $n$).
    - `residual`: $\lVert A v - \lambda v\rVert_2$. For a symmetric $A$ some eigenvalue
        lies within `residual` of `eigenvalue` (and, with a gap $\delta$ to the rest of
        the spectrum, within $\text{residual}^2 / \delta$), so this is the honest
        measure of how far the estimate can be trusted.
    - `num_steps`: the number of products with $A$ (the starting one included).
    - `converged`: whether `residual <= rtol * |eigenvalue|`. When `False` the estimate
        may be far from every eigenvalue (e.g. two eigenvalues of nearly equal
        magnitude and opposite sign, which the iteration cannot separate in few steps).
    """

    eigenvalue: Float[Array, ""]
    eigenvector: Float[Array, " n"]
    residual: Float[Array, ""]
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]


def power_iteration(
    matrix: Float[ArrayLike, "n n"] | lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    max_steps: int = 100,
    rtol: Real[ArrayLike, ""] | None = None,
) -> PowerIterationResult:
    r"""The eigenvalue of largest magnitude of a symmetric matrix, by power iteration.

    Starting from a standard-normal vector drawn from `key`, repeats
    $v \leftarrow A v / \lVert A v \rVert$ and stops when the eigen-residual of the
    Rayleigh quotient $\lambda = v^\top A v$ is small,

    $$\lVert A v - \lambda v\rVert_2 \le \text{rtol}\cdot|\lambda|,$$

    or after `max_steps` products. (A test on the change of $\lambda$ between steps
    would not do: when the two extreme eigenvalues have nearly equal magnitude and
    opposite signs, $\lambda$ hardly moves while $v$ is still a mixture of both
    eigenvectors and $\lambda$ lies far from either.) The loop is a
    `jax.lax.while_loop`, so the function is jittable and `vmap`-able, and the same
    `key` always gives the same answer. It is not reverse-mode differentiable (the
    loop); forward mode works.

    For a positive semidefinite matrix the Rayleigh quotient never exceeds
    $\lambda_{\max}$ and approaches it from below.

    **Arguments:**

    - `matrix`: a symmetric square 2-D array (JAX or NumPy), or a symmetric lineax
        operator (whose input PyTree is flattened as `jax.flatten_util.ravel_pytree`
        does).
    - `key`: a JAX PRNG key for the starting vector.
    - `max_steps`: the largest number of products with `matrix`, a Python int $\ge 1$.
    - `rtol`: the tolerance on the residual, relative to $|\lambda|$. Defaults to the
        square root of the dtype's machine epsilon, which puts $\lambda$ itself at about
        machine precision when the top eigenvalue is separated from the rest (the
        eigenvalue error is of the order of the squared residual).

    **Returns:**

    A [`eqx_curv.PowerIterationResult`][] with `eigenvalue`, `eigenvector`,
    `residual`, `num_steps` and `converged`.
    """
    check_positive_int(max_steps, "max_steps")
    matvec, n, dtype = _flat_matvec(matrix)
    if rtol is None:
        rtol = float(jnp.finfo(dtype).eps) ** 0.5
    checked = check_scalar(rtol, "rtol", fix="; use e.g. 1e-4")
    tol = jnp.asarray(checked, dtype)
    v0 = jax.random.normal(key, (n,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def evaluate(v):
        w = matvec(v)
        lam = jnp.vdot(v, w, precision=HIGHEST)
        residual = jnp.linalg.norm(w - lam * v)
        return w, lam, residual, residual <= tol * jnp.abs(lam)

    def cond(carry):
        step, *_, converged = carry
        return (step < max_steps) & ~converged

    def body(carry):
        step, v, w, *_ = carry
        norm = jnp.linalg.norm(w)
        # A zero product means v is in the null space: keep the old vector.
        v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1), v)
        return step + 1, v, *evaluate(v)

    init = (jnp.array(1), v0, *evaluate(v0))
    steps, v, _, lam, residual, converged = jax.lax.while_loop(cond, body, init)
    return PowerIterationResult(lam, v, residual, steps, converged)
