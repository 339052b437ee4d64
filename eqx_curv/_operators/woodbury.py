r"""Diagonal plus low rank, $D + V S V^\top$, with its inverse by the Woodbury identity.

This is the shape of batch-space Gauss-Newton: with $N$ examples of $C$ outputs, the
damped GGN is $\lambda I + \tfrac1N J^\top H J$ with $J$ of rank at most $NC$, far
below the parameter count, so it is inverted by solving an $NC \times NC$ system.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from .base import AbstractCurvatureOperator


_HIGHEST = jax.lax.Precision.HIGHEST


def _flat_size(structure) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(structure))


class WoodburyOperator(AbstractCurvatureOperator):
    r"""The symmetric operator $D + V S V^\top$ on a parameter PyTree.

    $D$ is diagonal (one non-negative entry per parameter), $V$ maps a small space of
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

    **Arguments:**

    - `diagonal`: $D$: a PyTree of arrays matching `factor.out_structure()`, or a scalar
        applied to every parameter.
    - `factor`: $V$, a lineax operator whose output structure is the parameter PyTree,
        or a 2-D array of shape `(n, k)` (the parameters are then a flat vector).
    - `core`: $S$, a symmetric `(k, k)` array over the flattened input of `factor`;
        `None` for the identity.
    - `psd`: whether $D \ge 0$ and $S$ is PSD, for the operator's tag. This is the
        caller's promise; defaults to `True` when `core` is `None`.
    """

    diagonal: PyTree[Array]
    factor: lx.AbstractLinearOperator
    core: Float[Array, "k k"]
    psd: bool = eqx.field(static=True)

    def __init__(
        self,
        diagonal: PyTree[ArrayLike],
        factor: lx.AbstractLinearOperator | Float[Array, "n k"],
        core: Float[ArrayLike, "k k"] | None = None,
        *,
        psd: bool | None = None,
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
        k = _flat_size(factor.in_structure())
        if jax.tree.structure(diagonal) == jax.tree.structure(0.0) and (
            jnp.ndim(diagonal) == 0
        ):
            value = jnp.asarray(diagonal)
            diagonal = jax.tree.map(
                lambda s: jnp.full(s.shape, value, s.dtype), structure
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
            psd = True if psd is None else psd
        else:
            core = jnp.asarray(core)
            if core.shape != (k, k):
                raise ValueError(
                    f"`core` must have shape ({k}, {k}) (the flattened input size of "
                    f"`factor`), but has shape {core.shape}."
                )
            psd = bool(psd)
        self.diagonal = diagonal
        self.factor = factor
        self.core = core
        self.psd = psd

    def _low_rank(self, vector):
        flat_in, unravel_in = jax.flatten_util.ravel_pytree(
            self.factor.transpose().mv(vector)
        )
        return self.factor.mv(
            unravel_in(jnp.matmul(self.core, flat_in, precision=_HIGHEST))
        )

    def _mv(self, vector):
        return jax.tree.map(
            lambda d, v, u: d * v + u, self.diagonal, vector, self._low_rank(vector)
        )

    def in_structure(self):
        return self.factor.out_structure()

    def _is_psd(self) -> bool:
        return self.psd

    def inverse(self) -> "WoodburyOperator":
        r"""$(D + V S V^\top)^{-1}$ by the Woodbury identity (needs $D > 0$)."""
        inv_d = jax.tree.map(lambda d: 1 / d, self.diagonal)
        factor = self.factor
        scaled = lx.FunctionLinearOperator(
            lambda u: jax.tree.map(lambda a, b: a * b, inv_d, factor.mv(u)),
            factor.in_structure(),
        )
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), factor.in_structure()
        )
        flat, unravel = jax.flatten_util.ravel_pytree(zeros)
        k = flat.size

        def gram_column(e):
            out = factor.transpose().mv(scaled.mv(unravel(e)))
            return jax.flatten_util.ravel_pytree(out)[0]

        gram = jax.vmap(gram_column, out_axes=1)(jnp.eye(k, dtype=flat.dtype))
        gram = 0.5 * (gram + gram.T)
        s = self.core
        # S (I + G S)^{-1} is symmetric; (I + S G)^{-1} S is the same matrix.
        capacitance = jnp.eye(k, dtype=s.dtype) + jnp.matmul(
            s, gram, precision=_HIGHEST
        )
        middle = jnp.linalg.solve(capacitance, s)
        middle = 0.5 * (middle + middle.T)
        return WoodburyOperator(inv_d, scaled, -middle, psd=self.psd)
