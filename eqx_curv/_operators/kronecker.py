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

from collections.abc import Iterable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Real

from .._misc import known_values, matmul
from .base import (
    AbstractCurvatureOperator,
    as_tags,
    check_damping,
    check_psd_eigenvalues,
    is_concretely_symmetric,
    spectrum_tolerance,
    transpose_of,
)


# Above this size a PSD tag is checked on the factor's diagonal only, not its spectrum.
_EIGVALSH_CHECK_SIZE = 512


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


def _check_psd_factor(value: np.ndarray, name: str) -> None:
    """A concrete factor under a PSD tag: symmetric, no clearly negative eigenvalue."""
    n = value.shape[0]
    if n <= _EIGVALSH_CHECK_SIZE:
        w = np.linalg.eigvalsh(0.5 * (value + value.T))
        bad = float(w.min()) < -spectrum_tolerance(w, n)
        lowest = f"has the eigenvalue {float(w.min()):.3g}"
    else:
        d = np.diag(value)
        bad = float(d.min()) < -spectrum_tolerance(d, n)
        lowest = f"has the diagonal entry {float(d.min()):.3g}"
    if bad:
        raise ValueError(
            f"`{name}` {lowest}, but the operator is tagged "
            "`lineax.positive_semidefinite_tag`, which promises positive semidefinite "
            "factors. Drop the tag (integer powers and inverses of indefinite factors "
            "are then exact), or pass PSD factors."
        )


def _kronecker_tags(left, right, tags: frozenset[object]) -> frozenset[object]:
    """The caller's tags, checked where the factors are concrete, plus what they show.

    A PSD tag promises PSD (so symmetric) factors. Concrete factors that are symmetric
    up to rounding give the symmetric tag; concrete factors that contradict a given
    tag are an error. Traced factors cannot be checked: their tags are the caller's.
    """
    left_value, right_value = known_values(left), known_values(right)
    psd = lx.positive_semidefinite_tag in tags
    if psd:
        tags = tags | {lx.symmetric_tag}
    if left_value is None or right_value is None:
        return tags
    concrete = {"left": left_value, "right": right_value}
    symmetric = all(is_concretely_symmetric(v) for v in concrete.values())
    if lx.symmetric_tag in tags and not symmetric:
        name = next(k for k, v in concrete.items() if not is_concretely_symmetric(v))
        raise ValueError(
            f"`{name}` is not symmetric, but the operator is tagged symmetric "
            "(`lineax.symmetric_tag`, or `lineax.positive_semidefinite_tag`, which "
            "implies it). Drop the tag: a Kronecker product of non-symmetric factors "
            "is supported, with the true transpose `A.T ⊗ B.T`."
        )
    if psd:
        for name, value in concrete.items():
            _check_psd_factor(value, name)
    return tags | {lx.symmetric_tag} if symmetric else tags


def _integer(exponent) -> int | None:
    value = float(exponent)
    return int(value) if value.is_integer() else None


def _factor_eigh(factor, psd: bool):
    w, q = jnp.linalg.eigh(0.5 * (factor + factor.T))
    # A PSD factor's negative eigenvalues are rounding: clip them, so that fractional
    # powers and damped inverses stay finite and PSD.
    return (jnp.maximum(w, 0) if psd else w), q


def _spectral(factor, fn, psd: bool):
    w, q = _factor_eigh(factor, psd)
    return matmul(q * fn(w)[None, :], q.T)


def _require_symmetric(operator, what: str) -> None:
    if lx.symmetric_tag not in operator.tags:
        raise ValueError(
            f"`{what}` goes through the factors' eigendecompositions, so it needs "
            "factors known to be symmetric, and this `KroneckerOperator` is not tagged "
            "symmetric (its factors were traced, or are not symmetric). If they are, "
            "build it with `tags=lineax.symmetric_tag` (or "
            "`tags=(lineax.symmetric_tag, lineax.positive_semidefinite_tag)` for PSD "
            "factors)."
        )


class KroneckerOperator(AbstractCurvatureOperator):
    r"""The Kronecker product $A \otimes B$ on an $m \times n$ matrix parameter.

    `mv(X)` returns $A X B^\top$: two matrix products, $A \otimes B$ is never formed.
    `as_matrix()` is `jnp.kron(A, B)` (row-major vec, see the module docstring).
    Inverses, powers and damping go through the factors, as methods returning
    operators.

    Properties are lineax tags, never assumed. A Kronecker product of symmetric
    factors is symmetric; concrete factors are checked (up to rounding) and tagged
    symmetric when they are, while traced factors (inside `jax.jit`) are symmetric only
    if the caller tags them so. An operator not tagged symmetric is a general
    (non-symmetric) linear map whose transpose is $A^\top \otimes B^\top$, so
    `jax.grad` through `lineax.GMRES` or `lineax.LU` solves with it is exact.
    Positive semidefiniteness is only ever the caller's tag: it promises PSD factors
    (as K-FAC's are), which are then checked when concrete (their eigenvalues for
    factors up to 512 rows, their diagonals above that), and it lets spectral
    functions clip the factors' rounding-negative eigenvalues at zero.

    **Arguments:**

    - `left`: $A$, an $m \times m$ matrix.
    - `right`: $B$, an $n \times n$ matrix.
    - `tags`: a lineax tag or an iterable of them, e.g.
        `(lineax.symmetric_tag, lineax.positive_semidefinite_tag)` for the factors of
        a Fisher or GGN. A tag that concrete factors contradict is an error.
    """

    left: Float[Array, "m m"]
    right: Float[Array, "n n"]
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(
        self,
        left: Float[ArrayLike, "m m"],
        right: Float[ArrayLike, "n n"],
        *,
        tags: object | Iterable[object] = (),
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
        self.tags = _kronecker_tags(left, right, as_tags(tags))

    def _mv(self, vector):
        return matmul(matmul(self.left, vector), self.right.T)

    def in_structure(self):
        return jax.ShapeDtypeStruct(
            (self.left.shape[0], self.right.shape[0]), self.left.dtype
        )

    def power(self, exponent: int | float) -> "KroneckerOperator":
        r"""$(A \otimes B)^q = A^q \otimes B^q$.

        - Integer $q$: exact for any factors (negative $q$ needs them invertible):
          through the eigendecompositions when the operator is tagged symmetric (an
          even power of symmetric factors is tagged PSD), by repeated products and
          `jnp.linalg.inv` otherwise.
        - Non-integer $q$: only for an operator tagged positive semidefinite (for
          indefinite factors $A^q \otimes B^q$ is not $(A \otimes B)^q$, nor real);
          anything else raises a `ValueError`. Negative $q$ needs positive definite
          factors, else see `damped_power`.
        """
        q = _integer(exponent)
        psd = lx.positive_semidefinite_tag in self.tags
        symmetric = lx.symmetric_tag in self.tags
        if q is None and not psd:
            raise ValueError(
                f"`exponent` is {exponent}, a non-integer power, which is only defined "
                "here for positive semidefinite factors, and this `KroneckerOperator` "
                "is not tagged `lineax.positive_semidefinite_tag`. Tag it if its "
                "factors are PSD, or use an integer exponent."
            )
        if not symmetric:
            # General factors: integer powers by products (mixed-product property).
            def fn(factor):
                if q < 0:  # pyright: ignore  # q is an int here: checked above
                    factor = jnp.linalg.inv(factor)
                return jnp.linalg.matrix_power(factor, abs(q))  # pyright: ignore

            return KroneckerOperator(fn(self.left), fn(self.right))
        power = q if q is not None else exponent
        spectral_fn = lambda w: w**power  # noqa: E731
        even = q is not None and q % 2 == 0
        tags = [lx.symmetric_tag]
        if psd or even:
            tags.append(lx.positive_semidefinite_tag)
        return KroneckerOperator(
            _spectral(self.left, spectral_fn, psd),
            _spectral(self.right, spectral_fn, psd),
            tags=tags,
        )

    def inverse(self) -> "KroneckerOperator":
        r"""$(A \otimes B)^{-1} = A^{-1} \otimes B^{-1}$: `power(-1)`."""
        return self.power(-1)

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

        Both need an operator tagged symmetric. The result is tagged PSD when this
        operator is; otherwise a non-integer `exponent` of a negative
        $\lambda^A_i \lambda^B_j + \lambda$ is NaN, as for any real power.

        Reference: James Martens and Roger Grosse, "Optimizing Neural Networks with
        Kronecker-factored Approximate Curvature", ICML 2015, section 6.3.

        **Arguments:**

        - `damping`: $\lambda \ge 0$, a scalar (may be traced).
        - `exponent`: $q$, e.g. `-1` for the damped inverse.
        - `method`: `"exact"` or `"factored"`.
        """
        damping = check_damping(damping).astype(self.left.dtype)
        _require_symmetric(self, "damped_power")
        psd = lx.positive_semidefinite_tag in self.tags
        tags = [lx.symmetric_tag, lx.positive_semidefinite_tag] if psd else ()
        if method == "exact":
            wa, qa = _factor_eigh(self.left, psd)
            wb, qb = _factor_eigh(self.right, psd)
            values = (wa[:, None] * wb[None, :] + damping) ** exponent
            return KroneckerEigenOperator(qa, qb, values, tags=tags)
        elif method == "factored":
            m, n = self.left.shape[0], self.right.shape[0]
            mean_a = jnp.trace(self.left) / m
            mean_b = jnp.trace(self.right) / n
            # pi balances the two factors' scales; if either trace is zero, fall back
            # to pi = 1 rather than dividing by zero.
            ok = (mean_a > 0) & (mean_b > 0)
            one = jnp.ones((), self.left.dtype)
            pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_b, one)), one)
            root = jnp.sqrt(damping)
            fn = lambda w: w**exponent  # noqa: E731
            left = self.left + pi * root * jnp.eye(m, dtype=self.left.dtype)
            right = self.right + (root / pi) * jnp.eye(n, dtype=self.left.dtype)
            return KroneckerOperator(
                _spectral(left, fn, psd),
                _spectral(right, fn, psd),
                tags=(lx.symmetric_tag, *tags),
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
        return self.damped_power(damping, -1, method=method)


class KroneckerEigenOperator(AbstractCurvatureOperator):
    r"""$(Q_A \otimes Q_B)\,\mathrm{diag}(\mathrm{vec}\,S)\,(Q_A \otimes Q_B)^\top$ on an
    $m \times n$ matrix.

    `mv(X)` returns $Q_A \big((Q_A^\top X Q_B) \odot S\big) Q_B^\top$. This is how
    `KroneckerOperator.damped_power(..., method="exact")` represents
    $(A \otimes B + \lambda I)^q$, and the preconditioner of eigenbasis methods (SOAP,
    EKFAC) in general.

    Symmetric by construction, so always tagged symmetric. Positive semidefiniteness is
    the caller's tag, promising $S \ge 0$; concrete eigenvalues with a negative entry
    under that tag are an error.

    **Arguments:**

    - `left_vectors`: $Q_A$, orthogonal $m \times m$.
    - `right_vectors`: $Q_B$, orthogonal $n \times n$.
    - `eigenvalues`: $S$, the $m \times n$ eigenvalues in the Kronecker eigenbasis.
    - `tags`: a lineax tag or an iterable of them, e.g.
        `lineax.positive_semidefinite_tag`.
    """

    left_vectors: Float[Array, "m m"]
    right_vectors: Float[Array, "n n"]
    eigenvalues: Float[Array, "m n"]
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(
        self,
        left_vectors: Float[Array, "m m"],
        right_vectors: Float[Array, "n n"],
        eigenvalues: Float[Array, "m n"],
        *,
        tags: object | Iterable[object] = (),
    ):
        left_vectors = _check_factor(left_vectors, "left_vectors")
        right_vectors = _check_factor(right_vectors, "right_vectors")
        shape = (left_vectors.shape[0], right_vectors.shape[0])
        if jnp.shape(eigenvalues) != shape:
            raise ValueError(
                f"`eigenvalues` must have shape {shape} (rows of `left_vectors` by rows "
                f"of `right_vectors`), but has shape {jnp.shape(eigenvalues)}."
            )
        eigenvalues = jnp.asarray(eigenvalues, left_vectors.dtype)
        tags = as_tags(tags) | {lx.symmetric_tag}
        if lx.positive_semidefinite_tag in tags:
            check_psd_eigenvalues(
                eigenvalues, "Drop the tag, or clip the eigenvalues at zero."
            )
        self.left_vectors = left_vectors
        self.right_vectors = right_vectors
        self.eigenvalues = eigenvalues
        self.tags = tags

    def _mv(self, vector):
        qa, qb = self.left_vectors, self.right_vectors
        rotated = matmul(matmul(qa.T, vector), qb) * self.eigenvalues
        return matmul(matmul(qa, rotated), qb.T)

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.eigenvalues.shape, self.eigenvalues.dtype)


@transpose_of.register(KroneckerOperator)
def _(operator):
    # (A ⊗ B)^T = A^T ⊗ B^T; only reached when the operator is not tagged symmetric.
    return KroneckerOperator(
        operator.left.T, operator.right.T, tags=lx.transpose_tags(operator.tags)
    )


@lx.materialise.register(KroneckerOperator)
def _(operator):
    m, n = operator.in_structure().shape
    dense = jnp.kron(operator.left, operator.right).reshape(m, n, m, n)
    return lx.PyTreeLinearOperator(dense, operator.out_structure(), operator.tags)


@lx.diagonal.register(KroneckerOperator)
def _(operator):
    return jnp.kron(jnp.diag(operator.left), jnp.diag(operator.right))


@lx.diagonal.register(KroneckerEigenOperator)
def _(operator):
    # diag_{(i,j)} = sum_{k,l} Qa[i,k]^2 Qb[j,l]^2 S[k,l]
    qa2, qb2 = operator.left_vectors**2, operator.right_vectors**2
    return matmul(matmul(qa2, operator.eigenvalues), qb2.T).ravel()
