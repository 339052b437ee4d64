r"""Kronecker-factored curvature: $A \otimes B$ acting on a matrix parameter.

Convention. The operator acts on an $m \times n$ matrix $X$ (a weight), with
$A \in \mathbb{R}^{m \times m}$ and $B \in \mathbb{R}^{n \times n}$:

$$(A \otimes B)\,\mathrm{vec}(X) = \mathrm{vec}(A X B^\top),$$

where $\mathrm{vec}$ is the row-major flattening `X.ravel()` (the order
`jax.flatten_util.ravel_pytree` uses). So `as_matrix()` equals `jnp.kron(A, B)`. For a
dense layer $y = W x$ with weight $W$ of shape `(out, in)`, K-FAC's factors are
$A = \mathbb{E}[g g^\top]$ (output gradients, `out x out`) and $B = \mathbb{E}[x x^\top]$
(inputs, `in x in`).
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, Real

from .base import AbstractCurvatureOperator, check_damping


_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _check_factor(factor, name: str) -> Array:
    factor = jnp.asarray(factor)
    if factor.ndim != 2 or factor.shape[0] != factor.shape[1]:
        raise ValueError(
            f"`{name}` must be a square 2-D matrix, but has shape {factor.shape}."
        )
    if not jnp.issubdtype(factor.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating-point dtype, not {factor.dtype}; cast it "
            "with `.astype(jnp.float32)`."
        )
    return factor


def _factor_eigh(factor, psd: bool):
    w, q = jnp.linalg.eigh(0.5 * (factor + factor.T))
    # A PSD factor's negative eigenvalues are rounding: clip them, so that fractional
    # powers and damped inverses stay finite and PSD.
    return (jnp.maximum(w, 0) if psd else w), q


def _spectral(factor, fn, psd: bool):
    w, q = _factor_eigh(factor, psd)
    return _mm(q * fn(w), q.T)


class KroneckerOperator(AbstractCurvatureOperator):
    r"""The Kronecker product $A \otimes B$ on an $m \times n$ matrix parameter.

    `mv(X)` returns $A X B^\top$: two matrix products, $A \otimes B$ is never formed.
    `as_matrix()` is `jnp.kron(A, B)` (row-major vec, see the module docstring).
    Inverses, powers and damping go through the factors' eigendecompositions, as
    methods returning operators.

    **Arguments:**

    - `left`: $A$, symmetric $m \times m$.
    - `right`: $B$, symmetric $n \times n$.
    - `psd`: whether both factors are positive semidefinite (as Kronecker factors of a
        Fisher or GGN are). This is the caller's promise; it sets the operator's PSD
        tag and makes spectral functions clip the factors' rounding-negative
        eigenvalues at zero.
    """

    left: Float[Array, "m m"]
    right: Float[Array, "n n"]
    psd: bool = eqx.field(static=True)

    def __init__(
        self,
        left: Float[ArrayLike, "m m"],
        right: Float[ArrayLike, "n n"],
        *,
        psd: bool = True,
    ):
        left = _check_factor(left, "left")
        right = _check_factor(right, "right")
        if left.dtype != right.dtype:
            raise ValueError(
                f"`left` and `right` must have the same dtype, but have {left.dtype} "
                f"and {right.dtype}; cast one of them."
            )
        self.left = left
        self.right = right
        self.psd = psd

    def _mv(self, vector):
        return _mm(_mm(self.left, vector), self.right.T)

    def in_structure(self):
        return jax.ShapeDtypeStruct(
            (self.left.shape[0], self.right.shape[0]), self.left.dtype
        )

    def _is_psd(self) -> bool:
        return self.psd

    def power(self, exponent: int | float) -> "KroneckerOperator":
        r"""$(A \otimes B)^q = A^q \otimes B^q$, through each factor's eigendecomposition.

        For non-integer $q$ the factors must be PSD (`psd=True`); negative $q$ needs
        them positive definite, else see `damped_power`.
        """
        fn = lambda w: w**exponent  # noqa: E731
        return KroneckerOperator(
            _spectral(self.left, fn, self.psd),
            _spectral(self.right, fn, self.psd),
            psd=self.psd or float(exponent) % 2 == 0,
        )

    def inverse(self) -> "KroneckerOperator":
        r"""$(A \otimes B)^{-1} = A^{-1} \otimes B^{-1}$."""
        return self.power(-1.0)

    def damped_power(
        self,
        damping: Real[ArrayLike, ""],
        exponent: int | float,
        *,
        method: Literal["exact", "factored"] = "exact",
    ) -> AbstractCurvatureOperator:
        r"""$(A \otimes B + \lambda I)^q$, exactly or by the factored approximation.

        - `method="exact"`: with $A = Q_A \Lambda_A Q_A^\top$ and
          $B = Q_B \Lambda_B Q_B^\top$,
          $(A \otimes B + \lambda I)^q = (Q_A \otimes Q_B)
          \,\mathrm{diag}\big((\lambda^A_i \lambda^B_j + \lambda)^q\big)
          (Q_A \otimes Q_B)^\top$, a [`eqx_curv.KroneckerEigenOperator`][] (four
          matrix products per `mv`).
        - `method="factored"`: the $\pi$-adjusted approximation of Martens and Grosse,
          $(A + \pi\sqrt\lambda\, I)^q \otimes (B + \tfrac{\sqrt\lambda}{\pi} I)^q$ with
          $\pi = \sqrt{(\mathrm{tr} A / m) / (\mathrm{tr} B / n)}$, a
          `KroneckerOperator` (two products per `mv`). It equals the exact form
          when $\lambda = 0$ and otherwise adds the cross terms
          $\pi\sqrt\lambda\, I \otimes B + \tfrac{\sqrt\lambda}{\pi} A \otimes I$.

        Reference: James Martens and Roger Grosse, "Optimizing Neural Networks with
        Kronecker-factored Approximate Curvature", ICML 2015, section 6.3.

        **Arguments:**

        - `damping`: $\lambda \ge 0$, a scalar (may be traced).
        - `exponent`: $q$, e.g. `-1` for the damped inverse.
        - `method`: `"exact"` or `"factored"`.
        """
        damping = check_damping(damping).astype(self.left.dtype)
        psd = self.psd
        if method == "exact":
            wa, qa = _factor_eigh(self.left, psd)
            wb, qb = _factor_eigh(self.right, psd)
            values = (wa[:, None] * wb[None, :] + damping) ** exponent
            return KroneckerEigenOperator(qa, qb, values, psd=psd)
        elif method == "factored":
            m, n = self.left.shape[0], self.right.shape[0]
            mean_a = jnp.trace(self.left) / m
            mean_b = jnp.trace(self.right) / n
            # pi balances the two factors' scales; if either trace is zero, fall back
            # to pi = 1 rather than dividing by zero.
            ok = (mean_a > 0) & (mean_b > 0)
            pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_b, 1)), 1)
            root = jnp.sqrt(damping)
            fn = lambda w: w**exponent  # noqa: E731
            left = self.left + pi * root * jnp.eye(m, dtype=self.left.dtype)
            right = self.right + (root / pi) * jnp.eye(n, dtype=self.left.dtype)
            return KroneckerOperator(
                _spectral(left, fn, psd), _spectral(right, fn, psd), psd=psd
            )
        else:
            raise ValueError(
                f'`method` must be "exact" or "factored", but is {method!r}.'
            )

    def damped_inverse(
        self,
        damping: Real[ArrayLike, ""],
        *,
        method: Literal["exact", "factored"] = "exact",
    ) -> AbstractCurvatureOperator:
        r"""$(A \otimes B + \lambda I)^{-1}$: `damped_power(damping, -1, method=method)`."""
        return self.damped_power(damping, -1.0, method=method)


class KroneckerEigenOperator(AbstractCurvatureOperator):
    r"""$(Q_A \otimes Q_B)\,\mathrm{diag}(\mathrm{vec}\,S)\,(Q_A \otimes Q_B)^\top$ on an
    $m \times n$ matrix.

    `mv(X)` returns $Q_A \big((Q_A^\top X Q_B) \odot S\big) Q_B^\top$. This is how
    `KroneckerOperator.damped_power(..., method="exact")` represents
    $(A \otimes B + \lambda I)^q$, and the preconditioner of eigenbasis methods (SOAP,
    EKFAC) in general.

    **Arguments:**

    - `left_vectors`: $Q_A$, orthogonal $m \times m$.
    - `right_vectors`: $Q_B$, orthogonal $n \times n$.
    - `eigenvalues`: $S$, the $m \times n$ eigenvalues in the Kronecker eigenbasis.
    - `psd`: whether every entry of $S$ is non-negative (the caller's promise; sets the
        PSD tag).
    """

    left_vectors: Float[Array, "m m"]
    right_vectors: Float[Array, "n n"]
    eigenvalues: Float[Array, "m n"]
    psd: bool = eqx.field(static=True)

    def __init__(
        self,
        left_vectors: Float[Array, "m m"],
        right_vectors: Float[Array, "n n"],
        eigenvalues: Float[Array, "m n"],
        *,
        psd: bool = True,
    ):
        left_vectors = _check_factor(left_vectors, "left_vectors")
        right_vectors = _check_factor(right_vectors, "right_vectors")
        shape = (left_vectors.shape[0], right_vectors.shape[0])
        if jnp.shape(eigenvalues) != shape:
            raise ValueError(
                f"`eigenvalues` must have shape {shape} (rows of `left_vectors` by rows "
                f"of `right_vectors`), but has shape {jnp.shape(eigenvalues)}."
            )
        self.left_vectors = left_vectors
        self.right_vectors = right_vectors
        self.eigenvalues = jnp.asarray(eigenvalues, left_vectors.dtype)
        self.psd = psd

    def _mv(self, vector):
        qa, qb = self.left_vectors, self.right_vectors
        rotated = _mm(_mm(qa.T, vector), qb) * self.eigenvalues
        return _mm(_mm(qa, rotated), qb.T)

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.eigenvalues.shape, self.eigenvalues.dtype)

    def _is_psd(self) -> bool:
        return self.psd


def _tags(operator):
    tags = [lx.symmetric_tag]
    if operator._is_psd():
        tags.append(lx.positive_semidefinite_tag)
    return frozenset(tags)


@lx.materialise.register(KroneckerOperator)
def _(operator):
    m, n = operator.in_structure().shape
    dense = jnp.kron(operator.left, operator.right).reshape(m, n, m, n)
    return lx.PyTreeLinearOperator(dense, operator.out_structure(), _tags(operator))


@lx.diagonal.register(KroneckerOperator)
def _(operator):
    return jnp.kron(jnp.diag(operator.left), jnp.diag(operator.right))


@lx.diagonal.register(KroneckerEigenOperator)
def _(operator):
    # diag_{(i,j)} = sum_{k,l} Qa[i,k]^2 Qb[j,l]^2 S[k,l]
    qa2, qb2 = operator.left_vectors**2, operator.right_vectors**2
    return _mm(_mm(qa2, operator.eigenvalues), qb2.T).ravel()
