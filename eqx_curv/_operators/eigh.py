r"""Matrix functions $f(H)$ of a small symmetric operator, through its eigendecomposition."""

from collections.abc import Callable, Iterable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from .._misc import flat_size, known_values, matmul
from .base import (
    AbstractCurvatureOperator,
    as_tags,
    check_damping,
    check_psd_eigenvalues,
)


def _flat_structure(structure):
    leaves, treedef = jax.tree.flatten(structure)
    return tuple(leaves), treedef


def _square_matrix(operator) -> tuple[Array, PyTree[jax.ShapeDtypeStruct], bool]:
    """The dense matrix of `operator`, its input structure, and whether it is PSD."""
    if isinstance(operator, lx.AbstractLinearOperator):
        if not lx.is_symmetric(operator):
            raise ValueError(
                "`operator` must be symmetric for an eigendecomposition-based "
                f"matrix function, but a {type(operator).__name__} is not reported "
                "symmetric; tag it with `lineax.symmetric_tag` if it is."
            )
        matrix = lx.materialise(operator).as_matrix()
        return matrix, operator.in_structure(), lx.is_positive_semidefinite(operator)
    matrix = jnp.asarray(operator)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            "`operator` must be a lineax operator or a square 2-D array, but "
            f"has shape {matrix.shape}."
        )
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise TypeError(
            f"`operator` must have a floating-point dtype, not {matrix.dtype}."
        )
    return matrix, jax.ShapeDtypeStruct((matrix.shape[0],), matrix.dtype), False


class EighOperator(AbstractCurvatureOperator):
    r"""A symmetric operator held as its eigendecomposition $H = Q \Lambda Q^\top$.

    Built from a symmetric matrix, or from any symmetric lineax operator by
    materialising it (so only for small problems: $n$ products with the operator and an
    $O(n^3)$ eigendecomposition), or directly from eigenvalues and eigenvectors.
    Matrix functions are then cheap and return new `EighOperator`s with the same
    eigenvectors:

    - `abs()`: $|H| = Q |\Lambda| Q^\top$, the positive semidefinite "absolute value"
      used by the saddle-free Newton method (Dauphin et al., "Identifying and attacking
      the saddle point problem in high-dimensional non-convex optimization", NeurIPS
      2014);
    - `power(q)`: $H^q$; `inverse()`: $H^{-1}$;
    - `damped(lam)`: $H + \lambda I$;
    - `pseudo_inverse(rtol)`: $H^+$, dropping eigenvalues with
      $|\lambda_i| \le \text{rtol} \cdot \max_j |\lambda_j|$ instead of dividing by them;
    - `apply(fn, tags=...)`: any $f(H) = Q f(\Lambda) Q^\top$.

    So the saddle-free Newton step is
    `EighOperator(hessian).abs().damped(lam).inverse().mv(grad)`, which never divides by
    a zero curvature when `lam > 0`.

    Always tagged symmetric. It is tagged positive semidefinite when `operator` is (a
    GGN), when a matrix function makes it so (`abs()`, even powers) or when the caller
    says so in `tags`; as with lineax's own tags, a caller's tag is not checked.

    `mv` costs two dense products with $Q$. Rows and columns follow
    `jax.flatten_util.ravel_pytree` of `in_structure()`.

    **Arguments:**

    Either `operator`:

    - `operator`: a symmetric lineax operator, or a square 2-D array (symmetrised as
        $(H + H^\top)/2$; the operator then acts on flat vectors).

    or the decomposition itself (no eigendecomposition is computed):

    - `eigenvalues`: $\Lambda$, shape `(n,)`.
    - `eigenvectors`: $Q$, orthogonal, shape `(n, n)`, eigenvectors as columns.
    - `structure`: the input structure (`n` entries in all, in `ravel_pytree`
        order); defaults to a flat vector of `n` entries.

    and in both cases:

    - `tags`: a lineax tag or an iterable of them, added to the symmetric tag (and to
        `operator`'s positive semidefinite tag, if it has one).
    """

    eigenvalues: Float[Array, " n"]
    eigenvectors: Float[Array, "n n"]
    flat_structure: tuple = eqx.field(static=True)
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(
        self,
        operator: lx.AbstractLinearOperator | Float[Array, "n n"] | None = None,
        *,
        eigenvalues: Float[ArrayLike, " n"] | None = None,
        eigenvectors: Float[ArrayLike, "n n"] | None = None,
        structure: PyTree[jax.ShapeDtypeStruct] | None = None,
        tags: object | Iterable[object] = (),
    ):
        tags = as_tags(tags) | {lx.symmetric_tag}
        decomposed = eigenvalues is not None or eigenvectors is not None
        if operator is not None:
            if decomposed or structure is not None:
                raise ValueError(
                    "Pass either `operator`, or `eigenvalues` and `eigenvectors` (and "
                    "optionally `structure`), not both."
                )
            matrix, structure, psd = _square_matrix(operator)
            if psd:
                tags = tags | {lx.positive_semidefinite_tag}
            eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
        else:
            if eigenvalues is None or eigenvectors is None:
                raise ValueError(
                    "`EighOperator` needs `operator`, or both `eigenvalues` and "
                    "`eigenvectors`."
                )
            eigenvalues = jnp.asarray(eigenvalues)
            eigenvectors = jnp.asarray(eigenvectors)
            n = eigenvalues.shape[0] if eigenvalues.ndim == 1 else -1
            if eigenvalues.ndim != 1 or eigenvectors.shape != (n, n):
                raise ValueError(
                    "`eigenvalues` must have shape (n,) and `eigenvectors` shape "
                    f"(n, n), but they have shapes {eigenvalues.shape} and "
                    f"{eigenvectors.shape}."
                )
            if structure is None:
                structure = jax.ShapeDtypeStruct((n,), eigenvalues.dtype)
            elif flat_size(structure) != n:
                raise ValueError(
                    f"`structure` must hold {n} entries in all (one per eigenvalue), "
                    f"but holds {flat_size(structure)}."
                )
        eigenvalues = jnp.asarray(eigenvalues)
        if lx.positive_semidefinite_tag in tags:
            check_psd_eigenvalues(
                eigenvalues, "Drop the tag, or take `abs()` of an indefinite operator."
            )
            # A PSD matrix's computed eigenvalues may fall below zero by rounding;
            # clipped, its powers (square roots, inverse roots) stay real.
            eigenvalues = jnp.maximum(eigenvalues, 0)
        self.eigenvalues = eigenvalues
        self.eigenvectors = jnp.asarray(eigenvectors)
        self.flat_structure = _flat_structure(structure)
        self.tags = tags

    def _mv(self, vector):
        flat, unravel = jax.flatten_util.ravel_pytree(vector)
        q = self.eigenvectors
        coefficients = matmul(q.T, flat)
        out = matmul(q, self.eigenvalues * coefficients)
        return unravel(out.astype(flat.dtype))

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        leaves, treedef = self.flat_structure
        return jax.tree.unflatten(treedef, leaves)

    def apply(
        self,
        fn: Callable[[Array], Array],
        *,
        tags: object | Iterable[object] = (),
    ) -> "EighOperator":
        r"""$f(H) = Q f(\Lambda) Q^\top$ for an elementwise `fn` on the eigenvalues.

        `tags` are the result's (it is always symmetric); e.g.
        `lineax.positive_semidefinite_tag` when `fn` returns non-negative values.
        """
        return EighOperator(
            eigenvalues=fn(self.eigenvalues),
            eigenvectors=self.eigenvectors,
            structure=self.in_structure(),
            tags=tags,
        )

    def _psd_tags(self, psd: bool) -> tuple[object, ...]:
        return (lx.positive_semidefinite_tag,) if psd else ()

    def abs(self) -> "EighOperator":
        r"""$|H| = Q|\Lambda|Q^\top$: positive semidefinite, equal to $H$ when $H$ is."""
        return self.apply(jnp.abs, tags=lx.positive_semidefinite_tag)

    def power(self, exponent: int | float) -> "EighOperator":
        r"""$H^q$.

        Integer $q$ works for any $H$ (negative $q$ needs it invertible), and an even
        power is tagged PSD. A non-integer $q$ needs $H$ tagged positive
        semidefinite (a negative eigenvalue has no real power): otherwise a
        `ValueError`, whose fix is `abs()` first or the tag.
        """
        value = float(exponent)
        psd = lx.positive_semidefinite_tag in self.tags
        if not value.is_integer():
            if not psd:
                raise ValueError(
                    f"`exponent` is {exponent}, a non-integer power, which needs a "
                    "positive semidefinite operator, and this `EighOperator` is not "
                    "tagged `lineax.positive_semidefinite_tag`. Take `abs()` first, "
                    "or pass the tag if it is PSD."
                )
            power = exponent
        else:
            power = int(value)
        even = value.is_integer() and int(value) % 2 == 0
        return self.apply(lambda w: w**power, tags=self._psd_tags(psd or even))

    def inverse(self) -> "EighOperator":
        r"""$H^{-1}$; see `pseudo_inverse` for a singular $H$."""
        psd = lx.positive_semidefinite_tag in self.tags
        return self.apply(lambda w: 1 / w, tags=self._psd_tags(psd))

    def damped(self, damping: Real[ArrayLike, ""]) -> "EighOperator":
        r"""$H + \lambda I$ for a scalar $\lambda \ge 0$ (may be traced)."""
        damping = check_damping(damping)
        psd = lx.positive_semidefinite_tag in self.tags
        return self.apply(
            lambda w: w + damping.astype(w.dtype), tags=self._psd_tags(psd)
        )

    def pseudo_inverse(self, rtol: float | None = None) -> "EighOperator":
        r"""$H^+$: inverts eigenvalues with $|\lambda_i| > \text{rtol} \max_j|\lambda_j|$
        and sets the others to zero.

        `rtol` defaults to $n \cdot \text{eps}$ of the dtype, as `numpy.linalg.pinv`.
        """
        w = self.eigenvalues
        if rtol is None:
            rtol = w.shape[0] * float(jnp.finfo(w.dtype).eps)
        elif known_values(rtol) is not None and not rtol >= 0:
            raise ValueError(f"`rtol` must be non-negative, but is {rtol}.")
        keep = jnp.abs(w) > rtol * jnp.max(jnp.abs(w))
        psd = lx.positive_semidefinite_tag in self.tags
        one = jnp.ones((), w.dtype)
        return self.apply(
            lambda w: jnp.where(keep, 1 / jnp.where(keep, w, one), 0),
            tags=self._psd_tags(psd),
        )


@lx.diagonal.register(EighOperator)
def _(operator):
    q = operator.eigenvectors
    return matmul(q**2, operator.eigenvalues)
