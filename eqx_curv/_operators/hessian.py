"""The Hessian of a scalar function, as a matrix-free lineax operator."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from .base import (
    AbstractCurvatureOperator,
    check_inexact_params,
    linearised,
    structure_of,
)


class HessianOperator(AbstractCurvatureOperator):
    r"""The Hessian $\nabla^2 f(\theta)$ of a scalar function at a point.

    Products are forward-over-reverse: $Hv = \partial_\epsilon \nabla f(\theta +
    \epsilon v)|_{\epsilon=0}$, one `jax.jvp` of `jax.grad(fn)`, about the cost of two to
    four gradients. `lineax.linearise` (called by every iterative lineax solver) runs
    the gradient's primal pass once, after which each product costs only its tangent
    pass.

    The Hessian is symmetric but in general indefinite, so it is tagged symmetric
    only: damping does not make it PSD. Solve with an indefinite solver (`lx.GMRES`,
    `lx.LU`), or use a GGN / Fisher operator for conjugate gradients.

    For curvature over part of a model, split it and close over the rest:
    `params, static = eqx.partition(model, filter_spec)` and
    `fn = lambda p: loss(eqx.combine(p, static))`. A stateful model's `eqx.nn.State`
    must be kept out of `params` (pass it to `fn` by closure, not through
    `eqx.filter(model, eqx.is_inexact_array)` of a module that holds it), or its
    running statistics become unknowns.

    **Arguments:**

    - `fn`: a function `fn(params) -> scalar`. Anything else it needs (data, static
        parts of a model) is closed over; closed-over arrays are hoisted into this
        operator's PyTree, so `jax.grad` with respect to them flows through solves.
    - `params`: the point $\theta$, a PyTree of floating-point arrays (for an Equinox
        model, `eqx.filter(model, eqx.is_inexact_array)`).
    """

    fn: Callable
    params: PyTree[Array]

    def __init__(self, fn: Callable[[PyTree[Array]], Scalar], params: PyTree):
        # `params` annotated as any PyTree: the check below says what is wrong with a
        # whole model passed as parameters, and how to split it.
        check_inexact_params(params)
        params = jax.tree.map(jnp.asarray, params)
        out = eqx.filter_eval_shape(fn, params)
        if not (
            isinstance(out, jax.ShapeDtypeStruct)
            and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)
        ):
            raise ValueError(
                "`fn` must map the parameters to a floating-point scalar (the loss), "
                f"but it returns {out}. Reduce it to a scalar, e.g. with `jnp.mean`."
            )
        self.fn = eqx.filter_closure_convert(fn, params)
        self.params = params

    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return jax.jvp(jax.grad(self.fn), (self.params,), (vector,))[1]

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return structure_of(self.params)

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        # Symmetric; in general indefinite, so no semidefinite tag.
        return frozenset([lx.symmetric_tag])


@lx.linearise.register(HessianOperator)
def _(operator):
    _, hvp = jax.linearize(jax.grad(operator.fn), operator.params)
    return linearised(hvp, operator.in_structure(), operator.tags)
