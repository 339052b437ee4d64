r"""Newton-Schulz iterations: orthogonalisation (Muon) and the inverse square root."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from .._misc import check_scalar, HIGHEST, matmul
from .roots import (
    check_matrix,
    check_max_steps,
    check_tolerances,
    compute_dtype,
    default_tolerances,
    eigh_dtype_for,
    InverseRootResult,
    iterate_to_rounding,
    ridge_and_scale,
    with_root_derivative,
)


MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Muon's quintic coefficients $(a, b, c)$: fast, but only roughly orthogonal."""

CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)
r"""The classic cubic Newton-Schulz step $\tfrac12 X (3I - X^\top X)$: converges to the
orthogonal polar factor."""


def newton_schulz(
    matrix: Float[ArrayLike, "*batch m n"],
    *,
    num_steps: int = 5,
    coefficients: tuple[float, ...] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    precision: jax.lax.Precision | None = HIGHEST,
) -> Float[Array, "*batch m n"]:
    r"""Approximately orthogonalise a matrix: $G = U \Sigma V^\top \mapsto U V^\top$.

    Normalises $X_0 = G / (\lVert G \rVert_F + \text{eps})$, so that every singular
    value is at most 1, then applies `num_steps` times the odd polynomial

    $$X \leftarrow a X + b (X X^\top) X + c (X X^\top)^2 X,$$

    which acts on each singular value $\sigma$ as
    $\sigma \mapsto a\sigma + b\sigma^3 + c\sigma^5$ and leaves the singular vectors
    alone. A tall matrix is transposed first so that $X X^\top$ is the smaller Gram
    matrix.

    With Muon's default `coefficients` (Keller Jordan et al., "Muon: An optimizer for
    hidden layers in neural networks", 2024) five steps push singular values from
    very small up into roughly $[0.7, 1.2]$: fast, and close enough to orthogonal for an
    optimizer step, but not orthogonal. With `CUBIC_COEFFICIENTS` $(1.5, -0.5, 0)$
    (or the quintic $(15/8, -10/8, 3/8)$) the iteration converges to the polar factor
    $U V^\top$ itself, given enough steps: about
    $\log(\lVert G\rVert_F / \sigma_{\min}) / \log 1.5$ plus a few.

    **Arguments:**

    - `matrix`: the matrix $G$, optionally with leading batch dimensions.
    - `num_steps`: the number of polynomial steps, a Python int.
    - `coefficients`: $(a, b, c)$.
    - `eps`: added to the Frobenius norm, so that a zero matrix maps to zero.
    - `precision`: matmul precision; `HIGHEST` by default (GPUs otherwise use
        reduced-precision passes in float32).

    **Returns:**

    The approximately orthogonal matrix, with `matrix`'s shape and dtype.
    """
    if isinstance(matrix, (str, bytes)):
        raise TypeError(f"`matrix` must be an array, not {type(matrix).__name__}.")
    matrix = jnp.asarray(matrix)
    if matrix.ndim < 2:
        raise ValueError(
            f"`matrix` must have at least 2 dimensions (m, n), but has shape "
            f"{matrix.shape}."
        )
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise TypeError(
            f"`matrix` must have a floating-point dtype, not {matrix.dtype}."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(
            f"`num_steps` must be a non-negative Python int, but is {num_steps!r}."
        )
    if len(coefficients) != 3:
        raise ValueError(
            "`coefficients` must be three numbers (a, b, c) of the polynomial "
            f"a x + b x^3 + c x^5, but is {coefficients!r}."
        )
    a, b, c = coefficients
    if not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in coefficients
    ):
        raise TypeError(
            f"`coefficients` must be three Python numbers, but is {coefficients!r}."
        )
    eps = check_scalar(eps, "eps", fix="; use e.g. 1e-7")
    tall = matrix.shape[-2] > matrix.shape[-1]
    x = jnp.swapaxes(matrix, -1, -2) if tall else matrix
    norm = jnp.sqrt(jnp.sum(x**2, axis=(-2, -1), keepdims=True))
    x = x / (norm + eps)

    def mm(u, v):
        return jnp.matmul(u, v, precision=precision)

    def step(x, _):
        gram = mm(x, jnp.swapaxes(x, -1, -2))
        poly = b * gram + c * mm(gram, gram)
        return a * x + mm(poly, x), None

    x, _ = jax.lax.scan(step, x, None, length=num_steps)
    return jnp.swapaxes(x, -1, -2) if tall else x


def newton_schulz_inverse_sqrt(
    matrix: Float[ArrayLike, "n n"],
    *,
    ridge_epsilon: Real[ArrayLike, ""] = 1e-6,
    max_steps: int = 100,
    tolerance: float | None = None,
    fallback_tolerance: float | None = None,
    power_iteration_steps: int = 30,
    key: PRNGKeyArray | None = None,
) -> InverseRootResult:
    r"""$(A + \epsilon\lambda_{\max} I)^{-1/2}$ by the coupled Newton-Schulz iteration.

    With $\bar A = A + \epsilon \lambda_{\max} I$ ($\lambda_{\max}$ by a seeded power
    iteration) and $z = 3 / (2 \lambda_{\max}(\bar A))$, starts from
    $Y_0 = z \bar A$, $Z_0 = I$ and repeats

    $$T = \tfrac12 (3I - Z Y),\qquad Y \leftarrow Y T,\qquad Z \leftarrow T Z,$$

    so that $Y \to (z\bar A)^{1/2}$ and $Z \to (z\bar A)^{-1/2}$; the root is
    $\sqrt{z} Z$. The product $M = ZY$ is carried instead of $Y$, as
    $M \leftarrow T M T$ (three products per step): computing $ZY$ afresh would put a
    floor of about $\text{eps}\cdot\kappa$ under the residual. Only matrix products (at `Precision.HIGHEST`), no inverse and no
    eigendecomposition, so it is cheap under `vmap` and on accelerators. (Higham,
    *Functions of Matrices*, SIAM 2008, section 6.7.) The residual is
    $\lVert M - I\rVert_F$ and the loop stops as in
    [`eqx_curv.inverse_pth_root`][].

    Unlike [`eqx_curv.inverse_pth_root`][] there is no eigendecomposition fallback: if
    the residual does not fall below `fallback_tolerance` (or the input is not finite),
    `converged` and `valid` are `False` and the root is all NaN.

    Dtypes and differentiation as for [`eqx_curv.inverse_pth_root`][]: 16-bit inputs
    are computed in float32, and derivatives are those of the exact root (through an
    eigendecomposition, in float64 when 64-bit mode is on, computed only when
    differentiating).

    **Arguments:**

    As for [`eqx_curv.inverse_pth_root`][] with $p = 2$.

    **Returns:**

    An [`eqx_curv.InverseRootResult`][].
    """
    matrix = check_matrix(matrix)
    check_max_steps(max_steps)
    check_tolerances(tolerance, fallback_tolerance)
    in_dtype = matrix.dtype
    dtype = compute_dtype(in_dtype)
    matrix = matrix.astype(dtype)
    n = matrix.shape[0]
    tolerance, fallback_tolerance = default_tolerances(
        dtype, n, tolerance, fallback_tolerance
    )
    identity = jnp.eye(n, dtype=dtype)
    finite_input, ridged, ridge, z = ridge_and_scale(
        matrix, 2, ridge_epsilon, power_iteration_steps, key
    )

    def mm(u, v):
        return matmul(u, v)

    def step(state):
        zz, m = state
        t = 0.5 * (3 * identity - m)
        # Z <- T Z and M = Z Y <- T M T; Y itself is never needed.
        return mm(t, zz), mm(mm(t, m), t)

    def residual(state):
        return jnp.sqrt(jnp.sum((state[1] - identity) ** 2))

    (zz, _), err, steps = iterate_to_rounding(
        step,
        (identity, z * jax.lax.stop_gradient(ridged)),
        residual,
        max_steps=max_steps,
        tolerance=tolerance,
        fallback_tolerance=fallback_tolerance,
    )
    root = jnp.sqrt(z) * 0.5 * (zz + zz.T)
    converged = finite_input & (err <= fallback_tolerance)
    root = with_root_derivative(2, eigh_dtype_for(dtype, True), ridged, root)
    root = jnp.where(converged, root, jnp.nan).astype(in_dtype)
    ridge = ridge.astype(in_dtype)
    return InverseRootResult(root, err, ridge, steps, converged, converged)
