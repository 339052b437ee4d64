r"""A float32 symmetric eigendecomposition that recomputes its failures in float64."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._misc import HIGHEST


class EighRetryResult(eqx.Module):
    r"""The result of [`eqx_curv.eigh_with_retry`][].

    **Fields:**

    - `eigenvalues`: `[*batch, n]`, ascending, in the input's dtype.
    - `eigenvectors`: `[*batch, n, n]`, the columns orthonormal eigenvectors.
    - `retries`: how many of the matrices were recomputed in float64 (0 on the
        common path).
    - `failures`: how many results still fail the check after the retry: a matrix
        with non-finite entries (never retried: its result stays non-finite), an
        eigenvalue beyond the range of float32, or every failed matrix when
        `retry=False`.
    """

    eigenvalues: Float[Array, "*batch n"]
    eigenvectors: Float[Array, "*batch n n"]
    retries: Int[Array, ""]
    failures: Int[Array, ""]


def default_rtol(n: int, dtype) -> float:
    """$64\\sqrt{n}\\,\\varepsilon$: see `eigh_with_retry`."""
    return 64 * n**0.5 * float(jnp.finfo(dtype).eps)


def _symmetric(matrix: Array) -> Array:
    # Halved before the sum: entries near the dtype's largest value do not overflow.
    return 0.5 * matrix + 0.5 * jnp.swapaxes(matrix, -1, -2)


def eigh_failed(
    matrix: Array, values: Array, vectors: Array, rtol: float | None = None
) -> Array:
    r"""Per matrix, whether `(values, vectors)` fail as an eigendecomposition of the
    symmetric part $A$ of `matrix`: a non-finite entry, or
    $\lVert V \operatorname{diag}(w) V^\top - A\rVert_F > \mathrm{rtol}\,
    \lVert A\rVert_F$ (computed on $A / \max|A|$, so that no norm overflows)."""
    n = matrix.shape[-1]
    rtol = default_rtol(n, matrix.dtype) if rtol is None else rtol
    a = _symmetric(matrix)
    scale = jnp.max(jnp.abs(a), axis=(-2, -1))
    scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1)
    a = a / scale[..., None, None]
    w = values / scale[..., None]
    product = jnp.matmul(
        vectors * w[..., None, :], jnp.swapaxes(vectors, -1, -2), precision=HIGHEST
    )
    residual = jnp.sqrt(jnp.sum(jnp.square(product - a), axis=(-2, -1)))
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1)))
    finite = jnp.isfinite(values).all(-1) & jnp.isfinite(vectors).all((-2, -1))
    # `~(r <= t)` rather than `r > t`: a NaN residual fails too.
    return ~finite | ~(residual <= rtol * norm)


def _host_eigh(matrix: ArrayLike, redo: ArrayLike):
    """`numpy.linalg.eigh` in float64 of the matrices where `redo`, on the host."""
    matrix, redo = np.asarray(matrix), np.asarray(redo)
    dtype = matrix.dtype
    values = np.zeros(matrix.shape[:-1], dtype)
    vectors = np.zeros(matrix.shape, dtype)
    if redo.any():
        a = matrix[redo].astype(np.float64)
        a = 0.5 * (a + np.swapaxes(a, -1, -2))
        try:
            w, v = np.linalg.eigh(a)
        except np.linalg.LinAlgError:
            # Did not converge even in float64: reported through `failures`.
            w, v = np.full(a.shape[:-1], np.nan), np.full(a.shape, np.nan)
        with np.errstate(over="ignore"):  # beyond float32's range: inf, reported
            values[redo] = w.astype(dtype)
            vectors[redo] = v.astype(dtype)
    return values, vectors


def _float64_eigh(matrix: Array, redo: Array) -> tuple[Array, Array]:
    """Float64 eigendecompositions of the matrices where `redo` (the others: zeros)."""
    dtype = matrix.dtype
    if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64:
        # 64-bit mode: on the device. The other matrices are replaced by the
        # identity, so that a non-finite one never reaches the solver.
        eye = jnp.eye(matrix.shape[-1], dtype=jnp.float64)
        wide = jnp.where(redo[..., None, None], matrix.astype(jnp.float64), eye)
        w, v = jnp.linalg.eigh(wide)
        return w.astype(dtype), v.astype(dtype)
    # Otherwise float64 exists only on the host: NumPy's eigh through a callback.
    # "broadcast_all": under `jax.vmap` the callback sees the whole batch at once.
    shapes = (
        jax.ShapeDtypeStruct(matrix.shape[:-1], dtype),
        jax.ShapeDtypeStruct(matrix.shape, dtype),
    )
    return jax.pure_callback(
        _host_eigh, shapes, matrix, redo, vmap_method="broadcast_all"
    )


def to_retry(matrix: Array, failed: Array, retry: bool) -> Array:
    """Per matrix, whether `retry_failed` recomputes it: failed, with finite
    entries, and not float64 already."""
    if not retry or matrix.dtype == jnp.float64:
        return jnp.zeros_like(failed)
    return failed & jnp.isfinite(matrix).all((-2, -1))


def retry_failed(
    matrix: Array, values: Array, vectors: Array, failed: Array, retry: bool
) -> EighRetryResult:
    """Recompute in float64 (under `lax.cond`, only if some matrix needs it) the
    decompositions where `to_retry`; count them, and those still failing."""
    redo = to_retry(matrix, failed, retry)
    if retry and matrix.dtype != jnp.float64:

        def recompute(operands):
            values, vectors = operands
            w, v = _float64_eigh(matrix, redo)
            return (
                jnp.where(redo[..., None], w, values),
                jnp.where(redo[..., None, None], v, vectors),
            )

        values, vectors = jax.lax.cond(
            redo.any(), recompute, lambda operands: operands, (values, vectors)
        )
        fixed = (
            redo & jnp.isfinite(values).all(-1) & jnp.isfinite(vectors).all((-2, -1))
        )
    else:
        fixed = redo
    return EighRetryResult(
        values,
        vectors,
        jnp.sum(redo, dtype=jnp.int32),
        jnp.sum(failed & ~fixed, dtype=jnp.int32),
    )


def check_eigh_input(matrix: Array, name: str = "matrix") -> None:
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"`{name}` must be a square matrix or a batch of them (shape "
            f"[..., n, n]), but has shape {matrix.shape}."
        )
    if matrix.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"`{name}` must be real float32 (or float64), but has dtype "
            f"{matrix.dtype}; cast it with `.astype(jnp.float32)` first."
        )


def eigh_with_retry(
    matrix: Float[ArrayLike, "*batch n n"],
    *,
    retry: bool = True,
    rtol: float | None = None,
) -> EighRetryResult:
    r"""`jnp.linalg.eigh`, with the matrices whose float32 result failed recomputed in
    float64.

    An eigendecomposition $A = V \operatorname{diag}(w) V^\top$ of each symmetric
    matrix (the symmetric part $\frac12(A + A^\top)$, as `jnp.linalg.eigh` takes)
    is computed as `jnp.linalg.eigh` computes it, then checked: it fails where an
    eigenvalue or eigenvector is not finite, or where the reconstruction residual
    $\lVert V \operatorname{diag}(w) V^\top - A\rVert_F$ exceeds
    $\mathrm{rtol}\,\lVert A\rVert_F$. The failed ones are recomputed in float64
    and cast back. The recomputation runs under `jax.lax.cond`: when nothing
    failed (the common path) the result is bitwise that of `jnp.linalg.eigh`, and
    the only cost is the check (one $n^3$ product per matrix, far below the
    decomposition itself).

    Float64 does not need `jax_enable_x64`: without it the retry is
    `numpy.linalg.eigh` in float64 on the host, through `jax.pure_callback` (the
    failed matrices only); with it, `jnp.linalg.eigh` in float64 on the device.
    Under `jax.vmap` the `lax.cond` becomes a select, so the retry branch runs on
    every call (it still recomputes only the failed matrices); pass a batch
    `[k, n, n]` instead, which one `lax.cond` covers. Not differentiable: use
    `jnp.linalg.eigh` where derivatives are needed.

    Where float32 fails, e.g.: `jnp.linalg.eigh` symmetrises as $(A + A^\top)/2$,
    which overflows to infinity for entries above half of float32's largest
    value (the eigenvalues then come out NaN, although they are representable);
    GPU solvers can return NaN on badly scaled or clustered spectra. A matrix
    with non-finite entries is never retried (float64 cannot help): its result
    stays non-finite and is counted in `failures`.

    **The tolerance.** A backward-stable eigensolver leaves a residual of a small
    multiple of $\varepsilon \lVert A \rVert$. Measured on CPU in float32 (random
    symmetric, ill-conditioned up to $10^7$, rank-deficient and badly scaled PSD
    matrices, 200 each for $n \le 100$), the largest residual was $7\varepsilon
    \lVert A\rVert_F$ ($n = 3$), $14\varepsilon$ at $n = 100$ and $15\varepsilon$ at
    $n = 1000$: it grows no faster than $\sqrt{n}$. The default
    $\mathrm{rtol} = 64 \sqrt{n}\,\varepsilon$ leaves a margin of at least 15 over
    those, while a failed decomposition is off by far more ($10^{-4}$ relative at
    $n = 1000$ is still caught).

    **Arguments:**

    - `matrix`: a symmetric matrix `[n, n]`, or a batch `[*batch, n, n]`, float32
        (float64 is decomposed and checked, never retried).
    - `retry`: recompute the failed matrices in float64. With `False`, the result
        is `jnp.linalg.eigh`'s, and `failures` counts the failed ones. Default
        `True`.
    - `rtol`: the relative residual above which a decomposition fails; `None` for
        $64\sqrt{n}\,\varepsilon$ of the dtype.

    **Returns:**

    An [`eqx_curv.EighRetryResult`][]: the eigenvalues (ascending), the
    eigenvectors, the number of matrices retried and the number still failing.
    """
    matrix = jnp.asarray(matrix)
    check_eigh_input(matrix)
    if not isinstance(retry, bool):
        raise TypeError(
            f"`retry` must be a Python bool (static), not {type(retry).__name__}."
        )
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0
    ):
        raise ValueError(
            f"`rtol` must be a non-negative Python float, or None for the default "
            f"64 * sqrt(n) * eps, but is {rtol!r}."
        )
    values, vectors = jnp.linalg.eigh(matrix)
    failed = eigh_failed(matrix, values, vectors, rtol)
    return retry_failed(matrix, values, vectors, failed, retry)
