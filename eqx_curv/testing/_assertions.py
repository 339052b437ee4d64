"""Assertions on curvature objects, with tolerances from dtype and conditioning.

Each assertion raises an `AssertionError` whose message shows where the property
breaks worst: the unit vector (with the parameter entries it weighs most) or the
eigenvalue. The matrices are small (a curvature operator on a test-sized model), so
each assertion materialises them and judges in float64.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from .._misc import structure_of
from ._strategies import spd_matrix


_MAX_SIZE = 4096


# ---------------------------------------------------------------------------------------
# Materialising and describing.


def as_operator(
    operator: lx.AbstractLinearOperator | ArrayLike, name: str = "operator"
) -> lx.AbstractLinearOperator:
    """A lineax operator as is; a square matrix as a `lineax.MatrixLinearOperator`."""
    if isinstance(operator, lx.AbstractLinearOperator):
        return operator
    matrix = jnp.asarray(operator)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"`{name}` must be a lineax operator or a square matrix, but is an array "
            f"of shape {matrix.shape}."
        )
    return lx.MatrixLinearOperator(matrix)


def check_square(operator: lx.AbstractLinearOperator, name: str = "operator") -> int:
    """The number of unknowns of a square operator of floating-point structure."""
    structure = structure_of(operator.in_structure())
    if structure_of(operator.out_structure()) != structure:
        raise ValueError(
            f"`{name}` must map its input structure to itself (a curvature matrix is "
            f"square), but maps {structure} to {structure_of(operator.out_structure())}."
        )
    for leaf in jax.tree.leaves(structure):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"`{name}` acts on a leaf of dtype {leaf.dtype}; these assertions "
                "handle real floating-point operators only."
            )
    size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(structure))
    if size > _MAX_SIZE:
        raise ValueError(
            f"`{name}` has {size} unknowns; these assertions materialise it, which is "
            f"meant for at most {_MAX_SIZE}. Build it on a smaller model or batch."
        )
    return size


def eps_of(operator: lx.AbstractLinearOperator) -> float:
    """The machine epsilon of the least precise leaf of the operator's input."""
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(operator.in_structure())]
    return max(float(jnp.finfo(dtype).eps) for dtype in dtypes)


def entry_names(structure: PyTree[jax.ShapeDtypeStruct]) -> list[str]:
    """A name for each entry of the flattened structure (`ravel_pytree` order)."""
    names = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(structure):
        where = jax.tree_util.keystr(path) or "vector"
        for index in np.ndindex(*leaf.shape):  # one empty index for a scalar
            names.append(f"{where}[{', '.join(map(str, index))}]" if index else where)
    return names


def describe_vector(vector: np.ndarray, names: Sequence[str], count: int = 4) -> str:
    """The `count` largest entries of a vector, each with the parameter it stands for."""
    order = np.argsort(-np.abs(vector))[:count]
    shown = ", ".join(f"{vector[i]:+.3g} at {names[i]}" for i in order)
    return f"largest entries {shown} (of {vector.size})"


def unravel_like(operator: lx.AbstractLinearOperator) -> Callable:
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure())
    return jax.flatten_util.ravel_pytree(zeros)[1]


def flat(tree: PyTree[ArrayLike]) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


@eqx.filter_jit
def _matrix_from_mv(operator: lx.AbstractLinearOperator) -> Array:
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure())
    vector, unravel = jax.flatten_util.ravel_pytree(zeros)
    basis = jnp.eye(vector.size, dtype=vector.dtype)

    def column(e):
        return jax.flatten_util.ravel_pytree(operator.mv(unravel(e)))[0]

    return jax.vmap(column)(basis).T


def matrix_from_mv(operator: lx.AbstractLinearOperator) -> np.ndarray:
    """The operator's matrix, column by column from `mv` (not from `as_matrix()`), in
    float64."""
    return np.asarray(_matrix_from_mv(operator), np.float64)


@eqx.filter_jit
def _compiled_as_matrix(operator: lx.AbstractLinearOperator) -> Array:
    return operator.as_matrix()


def as_matrix(operator: lx.AbstractLinearOperator) -> np.ndarray:
    """`operator.as_matrix()` in float64, compiled where it can be (eagerly, lineax's
    `as_matrix()` dispatches every primitive of every product one by one)."""
    try:
        matrix = _compiled_as_matrix(operator)
    except Exception:  # an `as_matrix()` that only works eagerly (e.g. through NumPy)
        matrix = operator.as_matrix()
    return np.asarray(matrix, np.float64)


def _spectral_norm(matrix: np.ndarray) -> float:
    return float(np.linalg.norm(matrix, 2)) if matrix.size else 0.0


def default_rtol(size: int, eps: float) -> float:
    """Rounding of a product with `size` terms, with a margin of 10."""
    return 10 * size * eps


# ---------------------------------------------------------------------------------------
# Failure messages on matrices (shared with the conformance suites); `None` when the
# property holds.


def symmetry_failure(
    matrix: np.ndarray, names: Sequence[str], eps: float, rtol: float | None
) -> str | None:
    n = matrix.shape[0]
    rtol = default_rtol(n, eps) if rtol is None else rtol
    scale = _spectral_norm(matrix)
    skew = matrix - matrix.T
    error = _spectral_norm(skew)
    if error <= rtol * scale:
        return None
    u, s, vt = np.linalg.svd(skew)
    i, j = (int(k) for k in np.unravel_index(np.argmax(np.abs(skew)), skew.shape))
    return (
        f"The operator is not symmetric: ||A - A^T||_2 = {error:.3g}, above the "
        f"tolerance {rtol:.2g} x ||A||_2 = {rtol * scale:.3g}. Worst entry: "
        f"A[{i}, {j}] = {matrix[i, j]:.6g} but A[{j}, {i}] = {matrix[j, i]:.6g} "
        f"(row {names[i]}, column {names[j]}). The worst unit vectors give "
        f"u^T A v - v^T A u = {s[0]:.3g}, with\n"
        f"  u: {describe_vector(u[:, 0], names)}\n"
        f"  v: {describe_vector(vt[0], names)}"
    )


def semidefinite_failure(
    matrix: np.ndarray,
    names: Sequence[str],
    eps: float,
    rtol: float | None,
    sign: Literal[1, -1] = 1,
) -> tuple[str, np.ndarray] | None:
    """For `sign = 1` positive semidefiniteness, for `-1` negative; the message and the
    worst eigenvector."""
    n = matrix.shape[0]
    rtol = default_rtol(n, eps) if rtol is None else rtol
    values, vectors = np.linalg.eigh(0.5 * sign * (matrix + matrix.T))
    scale = float(np.max(np.abs(values), initial=0.0))
    tolerance = rtol * scale
    if values.size == 0 or values[0] >= -tolerance:
        return None
    kind = "positive" if sign == 1 else "negative"
    count = int(np.sum(values < -tolerance))
    lowest = sign * values[0]
    return (
        f"The operator is not {kind} semidefinite: its symmetric part has the "
        f"eigenvalue {lowest:.6g} (largest magnitude {scale:.3g}; tolerance "
        f"{rtol:.2g} x that = {tolerance:.3g}), and {count} of its {n} eigenvalues "
        f"have the wrong sign. The eigenvector v of {lowest:.3g}: "
        f"{describe_vector(vectors[:, 0], names)}."
    ), vectors[:, 0]


def matrix_failure(
    label: str,
    got: np.ndarray,
    expected: np.ndarray,
    names: Sequence[str],
    rtol: float,
    what: str = "the dense matrix",
) -> str | None:
    scale = _spectral_norm(expected)
    difference = got - expected
    error = _spectral_norm(difference)
    if error <= rtol * scale:
        return None
    _, _, vt = np.linalg.svd(difference)
    v = vt[0]
    residual = difference @ v
    k = int(np.argmax(np.abs(residual)))
    return (
        f"{label} disagrees with {what}: ||A - D||_2 = {error:.3g}, above the "
        f"tolerance {rtol:.2g} x ||D||_2 = {rtol * scale:.3g}. Along the worst unit "
        f"vector v ({describe_vector(v, names)}), (A v)[{k}] = {(got @ v)[k]:.6g} "
        f"where (D v)[{k}] = {(expected @ v)[k]:.6g} (row {names[k]})."
    )


def _materialised(
    operator: lx.AbstractLinearOperator | ArrayLike,
) -> tuple[np.ndarray, list[str], float]:
    """The float64 matrix (from `mv` for an operator; a matrix as given), a name per
    row, and the machine epsilon of the input's dtype."""
    if isinstance(operator, lx.AbstractLinearOperator):
        check_square(operator)
        names = entry_names(operator.in_structure())
        return matrix_from_mv(operator), names, eps_of(operator)
    as_operator(operator)  # checks that it is a square matrix
    matrix = jnp.asarray(operator)
    dtype = matrix.dtype if jnp.issubdtype(matrix.dtype, jnp.inexact) else jnp.float64
    names = [f"[{i}]" for i in range(matrix.shape[0])]
    return np.asarray(matrix, np.float64), names, float(jnp.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------
# Public assertions.


def assert_symmetric(
    operator: lx.AbstractLinearOperator | ArrayLike, *, rtol: float | None = None
) -> None:
    r"""Assert that an operator (or a square matrix) is symmetric.

    Its matrix is built column by column from `operator.mv` and judged in float64:
    $\lVert A - A^\top\rVert_2 \le \mathrm{rtol}\,\lVert A\rVert_2$. On failure the
    message names the worst entry and the unit vectors $u, v$ that maximise
    $u^\top A v - v^\top A u$, with the parameter entries they weigh most.

    **Arguments:**

    - `operator`: a square lineax operator (e.g. a curvature operator), or a matrix.
    - `rtol`: the relative tolerance; by default $10\,n\,\varepsilon$ for $n$ unknowns
        and the machine epsilon $\varepsilon$ of the operator's dtype.

    **Raises:**

    `AssertionError` with the worst violation.
    """
    matrix, names, eps = _materialised(operator)
    message = symmetry_failure(matrix, names, eps, rtol)
    if message is not None:
        raise AssertionError(message)


def assert_psd(
    operator: lx.AbstractLinearOperator | ArrayLike, *, rtol: float | None = None
) -> None:
    r"""Assert that an operator (or a square matrix) is positive semidefinite.

    The smallest eigenvalue of the symmetric part of its matrix (built from
    `operator.mv`, in float64) must be at least $-\mathrm{rtol}\,|\lambda|_{\max}$. On
    failure the message shows that eigenvalue, how many eigenvalues are negative, the
    eigenvector's largest entries, and $v^\top A v$ through `operator.mv` itself.

    **Arguments:**

    - `operator`: a square lineax operator, or a matrix.
    - `rtol`: the relative tolerance; by default $10\,n\,\varepsilon$.

    **Raises:**

    `AssertionError` with the most negative eigenvalue and its eigenvector.
    """
    matrix, names, eps = _materialised(operator)
    operator = as_operator(operator)
    found = semidefinite_failure(matrix, names, eps, rtol)
    if found is not None:
        message, vector = found
        tree = unravel_like(operator)(jnp.asarray(vector))
        tree = jax.tree.map(
            lambda x, s: x.astype(s.dtype), tree, operator.in_structure()
        )
        quadratic = float(flat(tree) @ flat(operator.mv(tree)))
        raise AssertionError(f"{message} Through `mv`, v^T A v = {quadratic:.6g}.")


def assert_matches_dense(
    operator: lx.AbstractLinearOperator,
    dense: ArrayLike,
    *,
    rtol: float | None = None,
) -> None:
    r"""Assert that an operator's `mv` and its `as_matrix()` both equal a dense matrix.

    Rows and columns of `dense` are in `jax.flatten_util.ravel_pytree` order of the
    operator's input structure. Both the matrix built column by column from `mv` and
    the one `as_matrix()` returns must satisfy
    $\lVert A - D\rVert_2 \le \mathrm{rtol}\,\lVert D\rVert_2$; on failure the message
    says which of the two disagrees, along the worst unit vector (the top right
    singular vector of $A - D$) and in which row.

    **Arguments:**

    - `operator`: a square lineax operator.
    - `dense`: the reference matrix (JAX or NumPy; judged in float64), e.g. from
        `jax.hessian` on the flattened parameters.
    - `rtol`: the relative tolerance; by default $10\,n\,\varepsilon$ for the
        operator's dtype.

    **Raises:**

    `AssertionError` naming `mv` and/or `as_matrix()` and the worst vector.
    """
    operator = as_operator(operator)
    n = check_square(operator)
    dense = np.asarray(dense, np.float64)
    if dense.shape != (n, n):
        raise ValueError(
            f"`dense` must be the {n} x {n} matrix of the operator's {n} unknowns, but "
            f"has shape {dense.shape}."
        )
    rtol = default_rtol(n, eps_of(operator)) if rtol is None else rtol
    names = entry_names(operator.in_structure())
    messages = [
        matrix_failure(label, got, dense, names, rtol)
        for label, got in [
            ("`mv`", matrix_from_mv(operator)),
            ("`as_matrix()`", as_matrix(operator)),
        ]
    ]
    messages = [m for m in messages if m is not None]
    if messages:
        raise AssertionError("\n".join(messages))


def assert_secant(
    matrix: lx.AbstractLinearOperator | ArrayLike | Callable,
    s: ArrayLike,
    y: ArrayLike,
    *,
    form: Literal["hessian", "inverse"] = "hessian",
    rtol: float | None = None,
) -> None:
    r"""Assert the secant condition of a quasi-Newton update.

    For `form="hessian"`, $H s = y$ (the updated Hessian approximation maps the step
    to the gradient change); for `form="inverse"`, $B y = s$ (the updated inverse
    Hessian approximation maps the gradient change back to the step). Judged as
    $\lVert H s - y\rVert \le \mathrm{rtol}\,\lVert y\rVert$ (or with $s$ and $y$
    swapped); on failure the message shows the worst component and $y^\top s$.

    **Arguments:**

    - `matrix`: the updated approximation: a matrix, a lineax operator, or a function
        `v -> H v`.
    - `s`: the step $s_k = x_{k+1} - x_k$, a 1-D array.
    - `y`: the gradient change $y_k = g_{k+1} - g_k$, a 1-D array; the pair must have
        $y^\top s > 0$ (BFGS keeps positive definiteness only then).
    - `form`: `"hessian"` or `"inverse"`.
    - `rtol`: the relative tolerance; by default $10^3\,\varepsilon\,\kappa$, with the
        condition number $\kappa$ of `matrix` when it is a matrix or an operator
        (1 for a function).

    **Raises:**

    `AssertionError` with the worst component; `ValueError` for a pair with
    $y^\top s \le 0$.
    """
    if form not in ("hessian", "inverse"):
        raise ValueError(f"`form` must be 'hessian' or 'inverse', not {form!r}.")
    s64, y64 = np.asarray(s, np.float64), np.asarray(y, np.float64)
    if s64.ndim != 1 or s64.shape != y64.shape:
        raise ValueError(
            f"`s` and `y` must be 1-D arrays of one length, but have shapes "
            f"{s64.shape} and {y64.shape}."
        )
    curvature = float(y64 @ s64)
    if not curvature > 0:
        raise ValueError(
            f"The secant condition is asserted for pairs with y^T s > 0, but this pair "
            f"has y^T s = {curvature:.3g}. Draw pairs with "
            "`eqx_curv.testing.secant_pairs()`, or skip such a pair as BFGS does."
        )
    if isinstance(matrix, lx.AbstractLinearOperator) or not callable(matrix):
        operator = as_operator(matrix, "matrix")
        dense = as_matrix(operator)
        kappa = float(np.linalg.cond(dense))
        dtype = jnp.result_type(*jax.tree.leaves(operator.in_structure()))
        apply = operator.mv
    else:
        kappa, dtype, apply = 1.0, jnp.result_type(s), matrix
    source, target = (s64, y64) if form == "hessian" else (y64, s64)
    got = np.asarray(apply(jnp.asarray(source, dtype)), np.float64)
    eps = float(jnp.finfo(dtype).eps)
    rtol = 1e3 * eps * kappa if rtol is None else rtol
    error = float(np.linalg.norm(got - target) / np.linalg.norm(target))
    if not error <= rtol:
        k = int(np.argmax(np.abs(got - target)))
        equation = "H s = y" if form == "hessian" else "B y = s"
        lhs, rhs = ("H s", "y") if form == "hessian" else ("B y", "s")
        raise AssertionError(
            f"The secant condition {equation} fails: ||{lhs} - {rhs}|| / ||{rhs}|| = "
            f"{error:.3g}, above the tolerance {rtol:.3g}. Worst component {k}: "
            f"({lhs})[{k}] = {got[k]:.6g} where {rhs}[{k}] = {target[k]:.6g} "
            f"(y^T s = {curvature:.4g}, ||s|| = {np.linalg.norm(s64):.3g}, "
            f"||y|| = {np.linalg.norm(y64):.3g})."
        )


def inverse_root_tolerance(
    dtype: Any, size: int, condition: float | int, p: int
) -> float:
    r"""The relative error allowed to an inverse $p$-th root:
    $\varepsilon\,(10\sqrt{n} + \kappa / p)$, rounding in $\sqrt{n}$-long dot products
    plus the forward error of a backward-stable method on a matrix of condition
    number $\kappa$ (the root's own condition number is about $\kappa / p$)."""
    return float(jnp.finfo(dtype).eps) * (10 * np.sqrt(size) + condition / p)


def assert_inverse_root(
    root_fn: Callable,
    p: int,
    *,
    sizes: Sequence[int] = (8, 32),
    conditions: Sequence[float | int] = (1.0, 1e2, 1e4),
    dtype: Any = jnp.float32,
    seed: int = 0,
    safety: float | int = 1.0,
) -> None:
    r"""Assert that `root_fn(matrix, p)` computes the inverse $p$-th root $A^{-1/p}$.

    Draws its own symmetric positive definite matrices, one per size and condition
    number ([`eqx_curv.testing.spd_matrix`][]), calls `root_fn` on each, and compares
    with the root from a float64 eigendecomposition: relative Frobenius error at most
    `safety` times [`eqx_curv.testing.inverse_root_tolerance`][]. If the result has a
    `.ridge` (as [`eqx_curv.InverseRootResult`][] does), the reference is the root of
    $A + \text{ridge}\,I$. On failure the message shows, for each failing matrix, the
    eigenvalue of $A$ where the root is furthest off, the root's value there, and the
    exponent it behaves like (a root that rounds $p$ to a power of two shows $p = 4$
    where $p = 3$ was asked).

    **Arguments:**

    - `root_fn`: called as `root_fn(matrix, p)`; returns the root, or a result with
        a `.root` field.
    - `p`: the root's order, an int $\ge 1$.
    - `sizes`, `conditions`: the matrices to try (every combination).
    - `dtype`: the dtype of the matrices handed to `root_fn`.
    - `seed`: the seed of the first matrix.
    - `safety`: a factor on the tolerance.

    **Raises:**

    `AssertionError` listing every failing matrix.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"`p` must be an int >= 1, not {p!r}.")
    failures = []
    case = 0
    for n in sizes:
        for cond in conditions:
            matrix = jnp.asarray(spd_matrix(n, cond, seed + case), dtype)
            case += 1
            out = root_fn(matrix, p)
            root = np.asarray(getattr(out, "root", out), np.float64)
            ridge = float(getattr(out, "ridge", 0.0))
            label = f"n = {n}, condition {cond:.0e}"
            if root.shape != (n, n):
                failures.append(f"{label}: the root has shape {root.shape}.")
                continue
            if not np.isfinite(root).all():
                failures.append(f"{label}: the root holds non-finite entries.")
                continue
            ridged = np.asarray(matrix, np.float64) + ridge * np.eye(n)
            values, vectors = np.linalg.eigh(0.5 * (ridged + ridged.T))
            expected = (vectors * values ** (-1.0 / p)) @ vectors.T
            kappa = float(values[-1] / values[0])
            error = float(np.linalg.norm(root - expected) / np.linalg.norm(expected))
            tolerance = safety * inverse_root_tolerance(dtype, n, kappa, p)
            if error <= tolerance:
                continue
            # The root's value along each eigenvector of A, against lambda^(-1/p).
            got = np.einsum("ij,ik,kj->j", vectors, root, vectors)
            want = values ** (-1.0 / p)
            with np.errstate(divide="ignore", invalid="ignore"):
                off = np.abs(np.log(np.abs(got) / want))
            j = int(np.nanargmax(off)) if np.isfinite(off).any() else 0
            ridged = f" (with the ridge, {kappa:.3g})" if ridge > 0 else ""
            acts_like = ""
            if got[j] > 0 and abs(np.log(values[j])) > 1e-3:
                exponent = -np.log(values[j]) / np.log(got[j])
                acts_like = f"; there it acts like an inverse {exponent:.3g}-th root"
            failures.append(
                f"{label}{ridged}: relative error {error:.3g}, "
                f"above the tolerance {tolerance:.3g}. At the eigenvalue "
                f"{values[j]:.4g} of A, the root gives {got[j]:.6g} where "
                f"lambda^(-1/{p}) = {want[j]:.6g}{acts_like}."
            )
    if failures:
        raise AssertionError(
            f"`root_fn(matrix, {p})` is not the inverse {p}-th root on "
            f"{len(failures)} of {case} matrices:\n  " + "\n  ".join(failures)
        )
