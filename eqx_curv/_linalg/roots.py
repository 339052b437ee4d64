r"""Inverse $p$-th roots of symmetric positive definite matrices.

The main path is the coupled Newton iteration of Guo and Higham (2006), written with
exact integer powers; an eigendecomposition is the fallback when it does not converge.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real

from .._misc import check_positive_int, check_scalar, HIGHEST, matmul
from .power_iteration import check_matrix as check_matrix, power_iteration


def _binary_power(base: Array, p: int, multiply) -> Array:
    """`base` to the power `p` under the associative product `multiply`."""
    check_positive_int(p, "p")
    # The lowest set bit of p starts the product; later bits multiply into it.
    while not p & 1:
        base = multiply(base, base)
        p >>= 1
    result = base
    p >>= 1
    while p:
        base = multiply(base, base)
        if p & 1:
            result = multiply(result, base)
        p >>= 1
    return result


def matrix_power(matrix: Float[ArrayLike, "n n"], p: int) -> Float[Array, "n n"]:
    r"""$M^p$ for an integer $p \ge 1$, by binary exponentiation at HIGHEST precision.

    Uses $\lfloor \log_2 p \rfloor$ squarings and one product per further set bit of
    $p$: the exponent is exact for every $p$, not rounded to a power of two.

    **Arguments:**

    - `matrix`: a square real matrix $M$ (JAX or NumPy array).
    - `p`: the exponent, a Python int $\ge 1$.

    **Returns:**

    $M^p$, as a JAX array of `matrix`'s dtype.
    """
    return _binary_power(check_matrix(matrix), p, matmul)


def power_minus_identity(
    excess: Float[ArrayLike, "n n"], p: int
) -> Float[Array, "n n"]:
    r"""$(I + E)^p - I$ for an integer $p \ge 1$, without forming $I + E$.

    Binary exponentiation in the "excess over the identity" representation: with
    $(I + U)(I + V) - I = U + V + UV$, each squaring or product costs one matrix product,
    as in [`eqx_curv.matrix_power`][], but nothing is ever computed as a difference of two
    numbers close to 1. Where $E$ is small the result is accurate relative to its own
    (small) size rather than to $\lVert I \rVert$.

    **Arguments:**

    - `excess`: the square real matrix $E$ (JAX or NumPy array).
    - `p`: the exponent, a Python int $\ge 1$.

    **Returns:**

    $(I + E)^p - I$, as a JAX array of `excess`'s dtype.
    """
    excess = check_matrix(excess, "excess")
    return _binary_power(excess, p, lambda u, v: u + v + matmul(u, v))


class InverseRootResult(eqx.Module):
    r"""The result of [`eqx_curv.inverse_pth_root`][].

    **Fields:**

    - `root`: the inverse $p$-th root $(A + \epsilon \lambda_{\max} I)^{-1/p}$, in the
        input's dtype; all NaN when `valid` is `False`.
    - `error`: the Newton iteration's final residual $\lVert M - I\rVert_F$, where
        $M = X^p (A + \epsilon \lambda_{\max} I)$ is tracked by the coupled iteration.
    - `ridge`: the ridge $\epsilon \lambda_{\max}$ that was added to the diagonal
        (with $\lambda_{\max}$ the power-iteration estimate).
    - `num_steps`: the number of Newton steps taken.
    - `converged`: whether the Newton iteration reached `error <= fallback_tolerance`
        (if not, `root` comes from the eigendecomposition).
    - `valid`: whether the input was finite and the ridged matrix positive definite
        (its smallest eigenvalue positive). When `False`, `root` is all NaN, so a
        non-positive-definite or non-finite input never passes for a root.
    """

    root: Float[Array, "n n"]
    error: Float[Array, ""]
    ridge: Float[Array, ""]
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    valid: Bool[Array, ""]


def _residual(m, identity):
    # ||M - I||_F bounds the spectral norm of M - I from above.
    return jnp.sqrt(jnp.sum((m - identity) ** 2))


def iterate_to_rounding(
    step, state, residual, *, max_steps, tolerance, fallback_tolerance
):
    """Run `state = step(state)` until `residual(state)` reaches the rounding level.

    Stops when the residual is at most `tolerance`, after `max_steps`, on a non-finite
    residual, or when a step fails to reduce the residual once it is below
    `fallback_tolerance` (the iterations used here shrink it monotonically in exact
    arithmetic, so a non-decrease there is rounding). Above `fallback_tolerance` a
    residual that stalls is tolerated (a cluster of tiny eigenvalues moves the
    Frobenius norm by less than its rounding) unless it grows by half.

    Returns the state with the smallest residual, that residual and the step count.
    """
    err0 = residual(state)

    def cond(carry):
        i, _, _, _, _, keep_going = carry
        return (i < max_steps) & keep_going

    def body(carry):
        i, state, err, best, best_err, _ = carry
        state = step(state)
        new_err = residual(state)
        finite = jnp.isfinite(new_err)
        better = finite & (new_err < best_err)
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), state, best)
        best_err = jnp.where(better, new_err, best_err)
        decreasing = new_err < err
        stalled_early = (new_err > fallback_tolerance) & (new_err <= 1.5 * err)
        keep_going = finite & (new_err > tolerance) & (decreasing | stalled_early)
        return i + 1, state, new_err, best, best_err, keep_going

    init = (jnp.array(0), state, err0, state, err0, err0 > tolerance)
    steps, _, _, best, best_err, _ = jax.lax.while_loop(cond, body, init)
    return best, best_err, steps


def default_tolerances(
    dtype, n: int, tolerance: float | None, fallback_tolerance: float | None
) -> tuple[float, float]:
    # The Frobenius residual of these iterations bottoms out near p * eps * sqrt(n);
    # stopping at eps * sqrt(n) is at that level, and accepting up to
    # sqrt(eps) * sqrt(n) / 10 leaves a factor of about 1 / (3 p sqrt(eps)) of margin.
    eps = float(jnp.finfo(dtype).eps)
    stop = eps * n**0.5 if tolerance is None else tolerance
    accept = (eps * n) ** 0.5 / 10 if fallback_tolerance is None else fallback_tolerance
    return stop, accept


def compute_dtype(dtype):
    """float32 for 16-bit floats (whose eps is too coarse for these iterations, and
    which `jnp.linalg.eigh` does not take), else `dtype` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def check_ridge_epsilon(ridge_epsilon):
    return check_scalar(
        ridge_epsilon,
        "ridge_epsilon",
        fix="; use e.g. 1e-6 (the ridge relative to the largest eigenvalue)",
    )


def ridge_and_scale(matrix, p, ridge_epsilon, power_iteration_steps, key):
    """Symmetrise, add the ridge, and choose the scale z of the first Newton iterate.

    Returns whether the input is finite, the ridged matrix, the ridge and z. The ridged
    matrix and the ridge are differentiable in `matrix` and `ridge_epsilon` (the
    ridge through the Rayleigh quotient at the power iteration's fixed final vector,
    whose derivative is that of the eigenvalue); z is not.
    """
    ridge_epsilon = check_ridge_epsilon(ridge_epsilon)
    check_positive_int(power_iteration_steps, "power_iteration_steps")
    if key is None:
        key = jax.random.key(0)
    dtype = matrix.dtype
    identity = jnp.eye(matrix.shape[0], dtype=dtype)
    finite_input = jnp.isfinite(matrix).all()
    # Non-finite entries would poison every product; iterate on the identity instead
    # and report the input as invalid.
    matrix = jnp.where(finite_input, 0.5 * (matrix + matrix.T), identity)
    estimate = power_iteration(
        jax.lax.stop_gradient(matrix), key, max_steps=power_iteration_steps
    )
    v = jax.lax.stop_gradient(estimate.eigenvector)
    lam_max = jnp.abs(jnp.vdot(v, matmul(matrix, v[:, None])[:, 0], precision=HIGHEST))
    if not isinstance(ridge_epsilon, (int, float)):
        ridge_epsilon = ridge_epsilon.astype(dtype)
    ridge = ridge_epsilon * lam_max
    # z = (1 + p) / (2 lambda_max(ridged)) puts the spectrum of M_0 = z * ridged in
    # (0, (p + 1) / 2]. Power iteration approaches lambda_max from below, so M_0 may
    # reach a little beyond, still well inside (0, p + 1) where the iteration converges.
    scale = jax.lax.stop_gradient((1 + ridge_epsilon) * lam_max)
    scale = jnp.where(scale > 0, scale, 1)
    return finite_input, matrix + ridge * identity, ridge, (1 + p) / (2 * scale)


def _inverse_root_divided_differences(w, p):
    r"""$K_{ij} = (w_i^{-1/p} - w_j^{-1/p}) / (w_i - w_j)$, and $f'(w_i)$ where equal.

    With $w_i = w_j (1 + \delta)$ the quotient is
    $w_j^{-1/p - 1}\,\mathrm{expm1}(-\log1p(\delta) / p) / \delta$, free of the
    cancellation of the plain difference when $w_i \approx w_j$.
    """
    wi, wj = w[:, None], w[None, :]
    delta = (wi - wj) / wj
    safe = jnp.where(delta == 0, 1, delta)
    ratio = jnp.where(delta == 0, -1.0 / p, jnp.expm1(-jnp.log1p(safe) / p) / safe)
    k = wj ** (-1.0 / p - 1) * ratio
    return 0.5 * (k + k.T)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def with_root_derivative(p, eigh_dtype, ridged, root):
    r"""`root`, differentiated as $\bar A^{-1/p}$ with respect to `ridged` $= \bar A$.

    The iterations that compute roots are `while_loop`s, which JAX cannot
    differentiate in reverse mode; they run on `stop_gradient`-ed inputs, and this
    function attaches the derivative of the exact root instead (implicit
    differentiation through an eigendecomposition $\bar A = Q \operatorname{diag}(w)
    Q^\top$, the Daleckii-Krein formula):
    $d(\bar A^{-1/p}) = Q\,(K \circ Q^\top d\bar A\, Q)\,Q^\top$ with $K$ the
    divided differences of $w \mapsto w^{-1/p}$. Linear in $d\bar A$, so reverse mode
    transposes it.
    """
    del p, eigh_dtype, ridged
    return root


@with_root_derivative.defjvp
def _with_root_derivative_jvp(p, eigh_dtype, primals, tangents):
    ridged, root = primals
    d_ridged, _ = tangents
    w, q = jnp.linalg.eigh(ridged.astype(eigh_dtype))
    w = jnp.where(w > 0, w, jnp.nan)  # no root, no derivative: NaN as the root
    k = _inverse_root_divided_differences(w, p)
    d = d_ridged.astype(eigh_dtype)
    d = 0.5 * (d + d.T)
    inner = matmul(matmul(q.T, d), q)
    d_root = matmul(matmul(q, k * inner), q.T)
    return root, d_root.astype(root.dtype)


def eigh_dtype_for(dtype, in_float64: bool):
    # float64 is only available in 64-bit mode (canonicalisation maps it to float32
    # otherwise).
    x64 = jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64
    return jnp.float64 if in_float64 and x64 else dtype


def check_max_steps(max_steps):
    check_positive_int(max_steps, "max_steps")


def check_tolerances(tolerance, fallback_tolerance):
    for name, value in (
        ("tolerance", tolerance),
        ("fallback_tolerance", fallback_tolerance),
    ):
        if value is not None:
            check_scalar(value, name, fix="; or None for the dtype's default")


def _check_p(p):
    check_positive_int(p, "p", "the root's order, static under jit")


def eigh_inverse_pth_root(
    matrix: Float[ArrayLike, "n n"], p: int
) -> tuple[Float[Array, "n n"], Bool[Array, ""]]:
    r"""$A^{-1/p}$ through an eigendecomposition, and whether $A$ is positive definite.

    Symmetrises $A$ first. The root is NaN where $A$ has a non-positive eigenvalue, and
    the returned flag is then `False`.
    """
    matrix = check_matrix(matrix)
    _check_p(p)
    dtype = matrix.dtype
    matrix = matrix.astype(compute_dtype(dtype))
    sym = 0.5 * (matrix + matrix.T)
    w, q = jnp.linalg.eigh(sym)
    positive = w[0] > 0
    scale = jnp.where(w > 0, w, jnp.nan) ** (-1.0 / p)
    return matmul(q * scale[None, :], q.T).astype(dtype), positive


def ridged_eigh_inverse_pth_root(
    matrix: Float[ArrayLike, "n n"], p: int, ridge_epsilon: Real[ArrayLike, ""]
) -> tuple[Float[Array, "n n"], Bool[Array, ""]]:
    r"""$(A + \epsilon \lambda_{\max} I)^{-1/p}$ of a PSD matrix from one eigendecomposition.

    The ridge of [`eqx_curv.inverse_pth_root`][], with $\lambda_{\max}$ the largest
    computed eigenvalue, applied to the eigenvalues: $Q \operatorname{diag}\big(
    (\max(w, 0) + \epsilon w_{\max})^{-1/p}\big) Q^\top$. Eigenvalues below zero
    are the decomposition's rounding of a PSD matrix (a float32 one is accurate to
    about $\text{eps}\,\lambda_{\max}$, the size of a $10^{-6}$ ridge) and count as
    zero. One `eigh` costs about $10 n^3$ flops, against four to six products of
    $2 n^3$ per Newton step and 15-20 steps at condition numbers near
    $1/\epsilon$; its forward error is that of a backward-stable method,
    $\text{eps}\,\kappa / p$ relative (about 1% in float32 at $\kappa = 10^6$),
    where the Newton iteration's is about ten times smaller.

    Returns the root (all NaN when not valid) and whether it is valid: a finite
    input with a positive largest eigenvalue, and a finite result. Not
    differentiated.
    """
    matrix = check_matrix(matrix)
    _check_p(p)
    ridge_epsilon = check_ridge_epsilon(ridge_epsilon)
    in_dtype = matrix.dtype
    dtype = compute_dtype(in_dtype)
    matrix = matrix.astype(dtype)
    finite_input = jnp.isfinite(matrix).all()
    matrix = jnp.where(finite_input, matrix, jnp.eye(matrix.shape[0], dtype=dtype))
    w, q = jnp.linalg.eigh(matrix)
    w_max = w[-1]
    ridged = jnp.maximum(w, 0) + jnp.asarray(ridge_epsilon).astype(dtype) * w_max
    scale = jnp.where(ridged > 0, ridged, 1) ** (-1.0 / p)
    root = matmul(q * scale[None, :], q.T)
    valid = finite_input & (w_max > 0) & jnp.isfinite(root).all()
    return jnp.where(valid, root, jnp.nan).astype(in_dtype), valid


def inverse_pth_root(
    matrix: Float[ArrayLike, "n n"],
    p: int,
    *,
    ridge_epsilon: Real[ArrayLike, ""] = 1e-6,
    max_steps: int = 100,
    tolerance: float | None = None,
    fallback_tolerance: float | None = None,
    fallback_in_float64: bool = True,
    power_iteration_steps: int = 30,
    key: PRNGKeyArray | None = None,
) -> InverseRootResult:
    r"""The inverse $p$-th root $(A + \epsilon \lambda_{\max} I)^{-1/p}$ of a symmetric PSD matrix.

    1. $\lambda_{\max}$ is estimated by a seeded [`eqx_curv.power_iteration`][] and the
       ridge $\epsilon \lambda_{\max} I$ is added, so that $\bar A = A +
       \epsilon\lambda_{\max} I$ has condition number at most about $1/\epsilon$.
    2. The coupled Newton iteration of Guo and Higham runs from $z = (1 + p) /
       (2 \lambda_{\max}(\bar A))$, $X_0 = z^{1/p} I$, $M_0 = z \bar A$:

       $$T_k = \tfrac{1}{p}\big((p + 1) I - M_k\big),\quad X_{k+1} = X_k T_k,\quad
       M_{k+1} = T_k^{\,p} M_k,$$

       which keeps $M_k = X_k^p \bar A$ and drives $M_k \to I$, $X_k \to
       \bar A^{-1/p}$. $T_k^p$ is an exact integer power (binary exponentiation), so
       every $p \ge 1$ is right, and every product is at `Precision.HIGHEST`. Both
       updates are evaluated as "old + correction": with $D_k = (I - M_k)/p$,
       $X_{k+1} = X_k + X_k D_k$ and $M_{k+1} = M_k + \big((I + D_k)^p - I\big) M_k$
       ([`eqx_curv.power_minus_identity`][]), which costs the same products and is more
       accurate than forming $T_k$ (the corrections shrink quadratically and carry
       only their own rounding; measured in "Matrix roots" of the docs). The
       iteration stops when the residual $\lVert M_k - I\rVert_F$ (an upper bound on
       the spectral norm) is at most `tolerance`, when it stops decreasing (each
       eigenvalue of $M_k$ moves monotonically towards 1, so a non-decrease means
       rounding level), or after `max_steps`; the iterate with the smallest residual is
       kept, and symmetrised.
    3. If the final residual exceeds `fallback_tolerance` or anything is non-finite,
       the root is recomputed from an eigendecomposition of $\bar A$ (in float64 when
       `fallback_in_float64` and `jax_enable_x64` are on). The choice is a
       `jax.lax.cond`, so the function is jittable (under `vmap` both branches run).

    A non-finite input, or one whose ridged matrix is not positive definite, gives a
    result with `valid=False` and an all-NaN root rather than a wrong number.

    **Dtypes.** float16 and bfloat16 inputs are computed in float32 (their machine
    epsilon is too coarse for the iteration, and `jnp.linalg.eigh` does not take
    them); `root` and `ridge` come back in the input's dtype.

    **Differentiation.** `jax.grad`, `jax.jvp` and their compositions work, and give
    the derivative of the exact root $\bar A^{-1/p}$ with respect to `matrix` and
    `ridge_epsilon` (not of the truncated iteration): the loops run on
    `jax.lax.stop_gradient`-ed inputs, and the derivative is attached by implicit
    differentiation through an eigendecomposition of $\bar A$ (Daleckii-Krein
    formula; one `eigh`, in float64 under the same rule as the fallback, computed only
    when differentiating). The ridge is differentiated through $\lambda_{\max}$
    (Rayleigh quotient at the power iteration's final vector). The diagnostics
    `error`, `num_steps`, `converged` and `valid` carry no derivative. In float32
    the derivative's relative error is about $\text{eps}\cdot\kappa(\bar A)$.

    Reference: Chun-Hua Guo and Nicholas J. Higham, "A Schur-Newton method for the
    matrix $p$'th root and its inverse", SIAM J. Matrix Anal. Appl. 28(3), 2006.

    **Arguments:**

    - `matrix`: a symmetric positive semidefinite $n \times n$ matrix (JAX or NumPy
        array, any real floating dtype, $n \ge 1$).
    - `p`: the order of the root, a Python int $\ge 1$.
    - `ridge_epsilon`: $\epsilon$, the ridge relative to $\lambda_{\max}$: a finite
        non-negative real scalar (a traced value is checked at run time with
        `eqx.error_if`).
    - `max_steps`: the most Newton steps.
    - `tolerance`: stop once $\lVert M - I\rVert_F$ is at most this. Defaults to
        $\text{eps}\sqrt{n}$ for the dtype's machine epsilon, about the rounding level.
    - `fallback_tolerance`: use the eigendecomposition when the final residual is above
        this. Defaults to $\sqrt{\text{eps}\, n} / 10$ (1.2e-3 in float32 at
        $n = 128$), a factor of about $1 / (3 p \sqrt{\text{eps}})$ above the level the
        iteration reaches.
    - `fallback_in_float64`: compute the fallback eigendecomposition in float64 when
        64-bit mode is enabled (the root is cast back to the input dtype).
    - `power_iteration_steps`: the most products for the $\lambda_{\max}$ estimate.
    - `key`: PRNG key for the power iteration; defaults to `jax.random.key(0)`.

    **Returns:**

    An [`eqx_curv.InverseRootResult`][] with the root, the residual, the number of
    steps and the `converged` / `valid` flags.
    """
    matrix = check_matrix(matrix)
    _check_p(p)
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
        matrix, p, ridge_epsilon, power_iteration_steps, key
    )
    # The loops below run on constants; `with_root_derivative` differentiates the
    # result as the exact root of `ridged`.
    ridged_const = jax.lax.stop_gradient(ridged)
    x0 = identity * z ** (1.0 / p)
    m0 = ridged_const * z

    def newton_step(state):
        # T = I + D with D = (I - M) / p; X <- X T and M <- T^p M, both written as
        # "old + correction" so that the corrections, which shrink quadratically,
        # carry their own rounding only (not that of a product with I).
        x, m = state
        d = (identity - m) / p
        return x + matmul(x, d), m + matmul(power_minus_identity(d, p), m)

    (x, _), err, steps = iterate_to_rounding(
        newton_step,
        (x0, m0),
        lambda state: _residual(state[1], identity),
        max_steps=max_steps,
        tolerance=tolerance,
        fallback_tolerance=fallback_tolerance,
    )
    # X is a polynomial in the symmetric matrix; drop the antisymmetric rounding.
    x = 0.5 * (x + x.T)
    converged = finite_input & (err <= fallback_tolerance)
    fallback_dtype = eigh_dtype_for(dtype, fallback_in_float64)

    def newton_branch():
        return x, jnp.array(True)

    def eigh_branch():
        root, positive = eigh_inverse_pth_root(ridged_const.astype(fallback_dtype), p)
        return root.astype(dtype), positive

    root, positive = jax.lax.cond(converged, newton_branch, eigh_branch)
    root = with_root_derivative(p, fallback_dtype, ridged, root)
    valid = finite_input & positive
    root = jnp.where(valid, root, jnp.nan).astype(in_dtype)
    ridge = ridge.astype(in_dtype)
    return InverseRootResult(root, err, ridge, steps, converged, valid)
