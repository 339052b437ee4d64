r"""Diagonal plus low rank, $D + V S V^\top$, with its inverse by the Woodbury identity.

This is the shape of batch-space Gauss-Newton: with $N$ examples of $C$ outputs, the
damped GGN is $\lambda I + \tfrac1N J^\top H J$ with $J$ of rank at most $NC$, far
below the parameter count, so it is inverted by solving an $NC \times NC$ system.
"""

from collections.abc import Iterable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from .._misc import flat_size, known_values, matmul, zeros_from
from .base import (
    AbstractCurvatureOperator,
    as_tags,
    is_concretely_symmetric,
    spectrum_tolerance,
)


class WoodburyOperator(AbstractCurvatureOperator):
    r"""The symmetric operator $D + V S V^\top$ on a parameter PyTree.

    $D$ is diagonal (one entry per parameter, positive for `inverse()`), $V$ maps a small space of
    dimension $k$ (e.g. the batch times the outputs) to the parameters, and $S$ is a
    symmetric $k \times k$ core (the identity by default). `mv` costs one product with
    $V$ and one with $V^\top$. `inverse()` applies the Woodbury identity

    $$(D + V S V^\top)^{-1} = D^{-1} - D^{-1} V\, S (I + G S)^{-1}\, V^\top D^{-1},
    \qquad G = V^\top D^{-1} V,$$

    which needs $D > 0$ but not an invertible $S$ (the softmax cross-entropy's Hessian
    is singular), and is again a `WoodburyOperator`. Forming $G$ costs $k$ products
    with $V$ and with $V^\top$.

    For batch-space Gauss-Newton with damping $\lambda$: $D = \lambda$,
    $V = J^\top$ (a `lineax.JacobianLinearOperator` of the batched model transposed, or
    any linear map from output space to parameters), $S = H / N$ with $H$ the
    block-diagonal output-space Hessian of the loss; or $V = J^\top H^{1/2}/\sqrt N$
    and $S = I$.

    Always tagged symmetric: $S$ must be symmetric (a concrete non-symmetric `core` is
    an error) and is symmetrised as $(S + S^\top)/2$, so a traced one is symmetric by
    construction. Positive semidefiniteness is only the caller's tag, which here
    promises $D \ge 0$ and $S$ positive semidefinite (sufficient for
    $D + V S V^\top \succeq 0$); a concrete negative entry of $D$ or a concrete `core`
    with a negative eigenvalue is then an error, while traced ones are the caller's
    promise.

    **Arguments:**

    - `diagonal`: $D$: a PyTree of arrays matching `factor.out_structure()`, or a scalar
        applied to every parameter.
    - `factor`: $V$, a lineax operator whose output structure is the parameter PyTree,
        or a 2-D array of shape `(n, k)` (the parameters are then a flat vector).
    - `core`: $S$, a symmetric `(k, k)` array over the flattened input of `factor`;
        `None` for the identity.
    - `tags`: a lineax tag or an iterable of them, e.g.
        `lineax.positive_semidefinite_tag` for a damped Gauss-Newton matrix.
    """

    diagonal: PyTree[Array]
    factor: lx.AbstractLinearOperator
    core: Float[Array, "k k"]
    tags: frozenset[object] = eqx.field(static=True)

    def __init__(
        self,
        diagonal: PyTree[ArrayLike],
        factor: lx.AbstractLinearOperator | Float[Array, "n k"],
        core: Float[ArrayLike, "k k"] | None = None,
        *,
        tags: object | Iterable[object] = (),
    ):
        if not isinstance(factor, lx.AbstractLinearOperator):
            factor = jnp.asarray(factor)
            if factor.ndim != 2:
                raise ValueError(
                    "`factor` must be a lineax operator or a 2-D array (n, k), but "
                    f"has shape {factor.shape}."
                )
            factor = lx.MatrixLinearOperator(factor)
        structure = factor.out_structure()
        k = flat_size(factor.in_structure())
        if jax.tree.structure(diagonal) == jax.tree.structure(0.0) and (
            jnp.ndim(diagonal) == 0
        ):
            scalar = jnp.asarray(diagonal)
            diagonal = jax.tree.map(
                lambda s: jnp.full(s.shape, scalar, s.dtype), structure
            )
        else:
            if jax.tree.structure(diagonal) != jax.tree.structure(structure):
                raise ValueError(
                    "`diagonal` must have the structure of `factor.out_structure()` "
                    "(the parameter PyTree) or be a scalar."
                )
            diagonal = jax.tree.map(
                lambda d, s: jnp.broadcast_to(jnp.asarray(d, s.dtype), s.shape),
                diagonal,
                structure,
            )
        dtype = jax.tree.leaves(structure)[0].dtype
        if core is None:
            core = jnp.eye(k, dtype=dtype)
        else:
            core = jnp.asarray(core)
            if core.shape != (k, k):
                raise ValueError(
                    f"`core` must have shape ({k}, {k}) (the flattened input size of "
                    f"`factor`), but has shape {core.shape}."
                )
            value = known_values(core)
            if value is not None and not is_concretely_symmetric(value):
                raise ValueError(
                    "`core` must be symmetric (the operator is D + V S V^T with a "
                    "symmetric S), but it is not; pass `(core + core.T) / 2`."
                )
            core = 0.5 * (core + core.T)
        tags = as_tags(tags) | {lx.symmetric_tag}
        if lx.positive_semidefinite_tag in tags:
            _check_psd_promise(diagonal, core)
        self.diagonal = diagonal
        self.factor = factor
        self.core = core
        self.tags = tags

    def _low_rank(self, vector):
        flat_in, unravel_in = jax.flatten_util.ravel_pytree(
            self.factor.transpose().mv(vector)
        )
        return self.factor.mv(unravel_in(matmul(self.core, flat_in)))

    def _mv(self, vector):
        return jax.tree.map(
            lambda d, v, u: d * v + u, self.diagonal, vector, self._low_rank(vector)
        )

    def in_structure(self):
        return self.factor.out_structure()

    def inverse(self) -> "WoodburyOperator":
        r"""$(D + V S V^\top)^{-1}$ by the Woodbury identity (needs $D > 0$).

        The result is tagged symmetric only: it is positive definite when this operator
        is, but its core $-S (I + G S)^{-1}$ is negative semidefinite, which the PSD
        tag of a `WoodburyOperator` ($D \ge 0$, $S \succeq 0$) does not describe. To
        use it where a PSD tag is needed (a CG preconditioner), wrap it:
        `lineax.TaggedLinearOperator(op.inverse(), lineax.positive_semidefinite_tag)`.
        """
        inv_d = jax.tree.map(lambda d: 1 / d, self.diagonal)
        factor = self.factor
        scaled = lx.FunctionLinearOperator(
            lambda u: jax.tree.map(lambda a, b: a * b, inv_d, factor.mv(u)),
            factor.in_structure(),
        )
        zeros = zeros_from(factor.in_structure())
        flat, unravel = jax.flatten_util.ravel_pytree(zeros)
        k = flat.size

        def gram_column(e):
            out = factor.transpose().mv(scaled.mv(unravel(e)))
            return jax.flatten_util.ravel_pytree(out)[0]

        gram = jax.vmap(gram_column, out_axes=1)(jnp.eye(k, dtype=flat.dtype))
        gram = 0.5 * (gram + gram.T)
        s = self.core
        # S (I + G S)^{-1} is symmetric; (I + S G)^{-1} S is the same matrix.
        capacitance = jnp.eye(k, dtype=s.dtype) + matmul(s, gram)
        middle = jnp.linalg.solve(capacitance, s)
        middle = 0.5 * (middle + middle.T)
        return WoodburyOperator(inv_d, scaled, -middle)


def _check_psd_promise(diagonal, core) -> None:
    """Under a PSD tag: no concrete negative entry of $D$, no concrete non-PSD $S$."""
    for leaf in jax.tree.leaves(diagonal):
        value = known_values(leaf)
        if value is not None and value.size and float(value.min()) < 0:
            raise ValueError(
                f"`diagonal` has the entry {float(value.min()):.3g}, but the operator "
                "is tagged `lineax.positive_semidefinite_tag`, which promises a "
                "non-negative diagonal (and a PSD `core`). Drop the tag, or use a "
                "non-negative diagonal (damping)."
            )
    value = known_values(core)
    if value is not None:
        w = np.linalg.eigvalsh(value)
        if float(w.min()) < -spectrum_tolerance(w, w.size):
            raise ValueError(
                f"`core` has the eigenvalue {float(w.min()):.3g}, but the operator is "
                "tagged `lineax.positive_semidefinite_tag`, which promises a positive "
                "semidefinite `core` (and a non-negative diagonal). Drop the tag, or "
                "pass a PSD core."
            )
