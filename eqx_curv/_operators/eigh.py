r"""Matrix functions $f(H)$ of a small symmetric operator, through its eigendecomposition."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from .base import AbstractCurvatureOperator, check_damping, concrete_value


_HIGHEST = jax.lax.Precision.HIGHEST


def _flat_structure(structure):
    leaves, treedef = jax.tree.flatten(structure)
    return tuple(leaves), treedef


class EighOperator(AbstractCurvatureOperator):
    r"""A symmetric operator held as its eigendecomposition $H = Q \Lambda Q^\top$.

    Built from a symmetric matrix, or from any symmetric lineax operator by
    materialising it (so only for small problems: $n$ products with the operator and an
    $O(n^3)$ eigendecomposition). Matrix functions are then cheap and return new
    `EighOperator`s with the same eigenvectors:

    - `abs()`: $|H| = Q |\Lambda| Q^\top$, the positive semidefinite "absolute value"
      used by the saddle-free Newton method (Dauphin et al., "Identifying and attacking
      the saddle point problem in high-dimensional non-convex optimization", NeurIPS
      2014);
    - `power(q)`: $H^q$; `inverse()`: $H^{-1}$;
    - `damped(lam)`: $H + \lambda I$;
    - `pseudo_inverse(rtol)`: $H^+$, dropping eigenvalues with
      $|\lambda_i| \le \text{rtol} \cdot \max_j |\lambda_j|$ instead of dividing by them;
    - `apply(fn, psd=...)`: any $f(H) = Q f(\Lambda) Q^\top$.

    So the saddle-free Newton step is
    `EighOperator(hessian).abs().damped(lam).inverse().mv(grad)`, which never divides by
    a zero curvature when `lam > 0`.

    `mv` costs two dense products with $Q$. Rows and columns follow
    `jax.flatten_util.ravel_pytree` of `in_structure()`.

    **Arguments:**

    - `operator`: a symmetric lineax operator, or a square 2-D array (symmetrised as
        $(H + H^\top)/2$; the operator then acts on flat vectors).
    - `psd`: whether $H$ is positive semidefinite, for its tag. Defaults to
        `lineax.is_positive_semidefinite(operator)` for an operator and `False` for an
        array.
    """

    eigenvalues: Float[Array, " n"]
    eigenvectors: Float[Array, "n n"]
    flat_structure: tuple = eqx.field(static=True)
    psd: bool = eqx.field(static=True)

    def __init__(
        self,
        operator: lx.AbstractLinearOperator | Float[Array, "n n"],
        *,
        psd: bool | None = None,
    ):
        if isinstance(operator, lx.AbstractLinearOperator):
            if not lx.is_symmetric(operator):
                raise ValueError(
                    "`operator` must be symmetric for an eigendecomposition-based "
                    f"matrix function, but a {type(operator).__name__} is not reported "
                    "symmetric; tag it with `lineax.symmetric_tag` if it is."
                )
            structure = operator.in_structure()
            matrix = lx.materialise(operator).as_matrix()
            if psd is None:
                psd = lx.is_positive_semidefinite(operator)
        else:
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
            structure = jax.ShapeDtypeStruct((matrix.shape[0],), matrix.dtype)
            psd = bool(psd)
        w, q = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
        self.eigenvalues = w
        self.eigenvectors = q
        self.flat_structure = _flat_structure(structure)
        self.psd = psd

    def _mv(self, vector):
        flat, unravel = jax.flatten_util.ravel_pytree(vector)
        q = self.eigenvectors
        coefficients = jnp.matmul(q.T, flat, precision=_HIGHEST)
        out = jnp.matmul(q, self.eigenvalues * coefficients, precision=_HIGHEST)
        return unravel(out.astype(flat.dtype))

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        leaves, treedef = self.flat_structure
        return jax.tree.unflatten(treedef, leaves)

    def _is_psd(self) -> bool:
        return self.psd

    def apply(
        self, fn: Callable[[Array], Array], *, psd: bool = False
    ) -> "EighOperator":
        r"""$f(H) = Q f(\Lambda) Q^\top$ for an elementwise `fn` on the eigenvalues.

        `psd` says whether `fn` returns non-negative values (for the result's tag).
        """
        return _with_eigenvalues(self, fn(self.eigenvalues), psd)

    def abs(self) -> "EighOperator":
        r"""$|H| = Q|\Lambda|Q^\top$: positive semidefinite, equal to $H$ when $H$ is."""
        return self.apply(jnp.abs, psd=True)

    def power(self, exponent: int | float) -> "EighOperator":
        r"""$H^q$. Non-integer $q$ needs $H$ PSD; negative $q$ needs it definite."""
        even = float(exponent) % 2 == 0
        return self.apply(lambda w: w**exponent, psd=self.psd or even)

    def inverse(self) -> "EighOperator":
        r"""$H^{-1}$; see `pseudo_inverse` for a singular $H$."""
        return self.apply(lambda w: 1 / w, psd=self.psd)

    def damped(self, damping: Real[ArrayLike, ""]) -> "EighOperator":
        r"""$H + \lambda I$ for a scalar $\lambda \ge 0$ (may be traced)."""
        damping = check_damping(damping)
        return self.apply(lambda w: w + damping.astype(w.dtype), psd=self.psd)

    def pseudo_inverse(self, rtol: float | None = None) -> "EighOperator":
        r"""$H^+$: inverts eigenvalues with $|\lambda_i| > \text{rtol} \max_j|\lambda_j|$
        and sets the others to zero.

        `rtol` defaults to $n \cdot \text{eps}$ of the dtype, as `numpy.linalg.pinv`.
        """
        w = self.eigenvalues
        if rtol is None:
            rtol = w.shape[0] * float(jnp.finfo(w.dtype).eps)
        elif concrete_value(rtol) is not None and not rtol >= 0:
            raise ValueError(f"`rtol` must be non-negative, but is {rtol}.")
        keep = jnp.abs(w) > rtol * jnp.max(jnp.abs(w))
        return self.apply(
            lambda w: jnp.where(keep, 1 / jnp.where(keep, w, 1), 0), psd=self.psd
        )


def _with_eigenvalues(operator: EighOperator, eigenvalues, psd: bool) -> EighOperator:
    # Same eigenvectors and structure, new spectrum, without a new eigendecomposition.
    # Built the way Equinox rebuilds a module when unflattening it.
    new = object.__new__(EighOperator)
    object.__setattr__(new, "eigenvalues", eigenvalues)
    object.__setattr__(new, "eigenvectors", operator.eigenvectors)
    object.__setattr__(new, "flat_structure", operator.flat_structure)
    object.__setattr__(new, "psd", psd)
    return new


@lx.diagonal.register(EighOperator)
def _(operator):
    q = operator.eigenvectors
    return jnp.matmul(q**2, operator.eigenvalues, precision=_HIGHEST)
