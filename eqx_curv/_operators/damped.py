"""Tikhonov (Levenberg-Marquardt) damping of a symmetric operator."""

import jax
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree, Real

from .base import AbstractCurvatureOperator, check_damping


class DampedOperator(AbstractCurvatureOperator):
    r"""The damped operator $A + \lambda I$.

    `A` may be any symmetric lineax operator, a curvature operator or not. The result
    is tagged positive semidefinite exactly when `A` is (so conjugate gradients accept
    a damped GGN), which assumes $\lambda \ge 0$: a negative damping given as a number
    is rejected here, and a traced damping is the caller's responsibility.

    `lineax.linearise` of a damped operator linearises `A`, so an iterative solver
    precomputes `A`'s primal pass once.

    **Arguments:**

    - `operator`: the symmetric operator $A$.
    - `damping`: the scalar $\lambda \ge 0$; a Python number or a (possibly traced)
        array, so that it can change between steps without recompiling and `jax.grad`
        can flow into it.
    """

    operator: lx.AbstractLinearOperator
    damping: Real[Array, ""]

    def __init__(
        self, operator: lx.AbstractLinearOperator, damping: Real[ArrayLike, ""]
    ):
        if not isinstance(operator, lx.AbstractLinearOperator):
            raise TypeError(
                "`operator` must be a lineax linear operator (for example a "
                f"`GGNOperator`), not {type(operator).__name__}."
            )
        if not lx.is_symmetric(operator):
            raise ValueError(
                "`operator` must be symmetric for `A + damping * I` to be a curvature "
                "matrix; tag it with `lineax.symmetric_tag` if it is."
            )
        self.operator = operator
        self.damping = check_damping(damping)

    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return jax.tree.map(
            lambda a, v: a + self.damping.astype(v.dtype) * v,
            self.operator.mv(vector),
            vector,
        )

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.operator.in_structure()

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        # Symmetric because `A` is (checked above); PSD when `A` is and damping >= 0
        # (a damping known to be negative is rejected; a traced one is promised).
        if lx.is_positive_semidefinite(self.operator):
            return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])
        return frozenset([lx.symmetric_tag])


@lx.linearise.register(DampedOperator)
def _(operator):
    return DampedOperator(lx.linearise(operator.operator), operator.damping)
