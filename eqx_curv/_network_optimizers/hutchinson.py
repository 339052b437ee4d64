r"""The gradient and a Hutchinson estimate of the curvature's diagonal, in one pass.

Shared by [`eqx_curv.AdaHessian`][] and [`eqx_curv.StochasticDiagonalNewton`][],
with the moving averages and hyperparameter checks both use.
With Rademacher probes $z_s$ (entries $\pm 1$), $\frac1S \sum_s z_s \odot A z_s$ is
an unbiased estimate of $\mathrm{diag}(A)$ (Bekas, Kokiopoulou and Saad, "An
estimator for the diagonal of a matrix", Applied Numerical Mathematics 57(11), 2007),
never $A \mathbf{1}$, the row sums.

The products come out of the same pass as the gradient: for the Hessian, one
forward-over-reverse `jax.jvp` of `jax.value_and_grad` gives the loss, the gradient
and $Hz$ together; for the generalised Gauss-Newton matrix, one `jax.linearize` of
the model gives the outputs and $Jz$, and one transposed pass with two cotangents
(the loss gradient and $H_\text{loss} J z$) gives the gradient and $J^\top
H_\text{loss} J z$.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from .._losses import AbstractLoss
from .._misc import check_hyperparameter, RealScalarLike, shown, structure_of
from .._operators.diagonal import rademacher_like
from .base import cast_like, Objective


Curvature = Literal["hessian", "ggn"]


def rademacher_probes(
    key: PRNGKeyArray, params: PyTree[Array], num_probes: int
) -> PyTree[Array]:
    """`num_probes` Rademacher probes shaped like `params`, stacked on a leading axis."""
    structure = structure_of(params)
    keys = jax.random.split(key, num_probes)
    return jax.vmap(lambda k: rademacher_like(k, structure))(keys)


def _first(tree: PyTree[Array]) -> PyTree[Array]:
    return jax.tree.map(lambda x: x[0], tree)


def _hessian_products(
    objective: Objective, params: PyTree[Array], probes: PyTree[Array]
) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
    value_and_grad = jax.value_and_grad(objective.value)
    if jax.tree.leaves(probes)[0].shape[0] == 1:
        # One probe: a single forward-over-reverse pass.
        (value, grads), (_, hz) = jax.jvp(value_and_grad, (params,), (_first(probes),))
        return value, grads, jax.tree.map(lambda x: x[None], hz)
    # Several: the primal pass once, then one tangent pass per probe.
    (value, grads), hvp = jax.linearize(value_and_grad, params)
    hz = jax.vmap(lambda z: hvp(z)[1])(probes)
    return value, grads, hz


def _ggn_products(
    objective: Objective, params: PyTree[Array], probes: PyTree[Array]
) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
    loss = objective.loss
    assert isinstance(loss, AbstractLoss)  # the optimizer's `check_loss` said so
    targets = objective.targets
    outputs, jvp_fn = jax.linearize(objective.outputs, params)
    value, output_grad = jax.value_and_grad(loss)(outputs, targets)
    hjz = jax.vmap(lambda z: loss.hvp(outputs, jvp_fn(z), targets=targets))(probes)
    # The gradient and every J^T H J z in one transposed pass.
    cotangents = jnp.concatenate([output_grad[None], hjz])
    (pulled,) = jax.vmap(jax.linear_transpose(jvp_fn, params))(cotangents)
    return value, _first(pulled), jax.tree.map(lambda x: x[1:], pulled)


def gradient_and_products(
    objective: Objective,
    params: PyTree[Array],
    probes: PyTree[Array],
    curvature: Curvature = "hessian",
) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
    """`(loss, gradient, A z_s for each probe)`, the probes stacked on a leading axis."""
    products = _hessian_products if curvature == "hessian" else _ggn_products
    return products(objective, params, probes)


def gradient_and_diagonal(
    objective: Objective,
    params: PyTree[Array],
    key: PRNGKeyArray,
    num_probes: int,
    curvature: Curvature = "hessian",
) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
    r"""`(loss, gradient, diagonal)`: the diagonal is $\frac1S \sum_s z_s \odot A z_s$.

    $A$ is the Hessian of the mean loss (`curvature="hessian"`) or its generalised
    Gauss-Newton matrix (`"ggn"`, which needs an eqx_curv loss), at the dropout masks
    of `objective.model_key`, so the gradient and the curvature see one network.
    """
    probes = rademacher_probes(key, params, num_probes)
    value, grads, az = gradient_and_products(objective, params, probes, curvature)
    diagonal = jax.tree.map(lambda z, y: jnp.mean(z * y, axis=0), probes, az)
    return value, grads, diagonal


def _is_conv(x) -> bool:
    return isinstance(x, (eqx.nn.Conv, eqx.nn.ConvTranspose))


def conv_spatial_dims(params: PyTree) -> PyTree[int]:
    """For each leaf of `params`, how many trailing axes are spatial kernel axes.

    A leaf is a convolution kernel where it is the `weight` of an `eqx.nn.Conv`
    (`Conv1d`, `Conv2d`, `Conv3d`, ...) or `eqx.nn.ConvTranspose`, found by module
    type: its shape is `(out, in / groups, *kernel)` with `num_spatial_dims` kernel
    axes. Every other leaf gets 0.
    """

    def dims(node):
        if _is_conv(node) and eqx.is_array(node.weight):
            zeros = jax.tree.map(lambda _: 0, node)
            return eqx.tree_at(lambda c: c.weight, zeros, node.num_spatial_dims)
        return jax.tree.map(lambda _: 0, node)

    return jax.tree.map(dims, params, is_leaf=_is_conv)


def spatially_averaged(diagonal: PyTree[Array], dims: PyTree[int]) -> PyTree[Array]:
    """$|D|$ averaged over the trailing `dims` axes of each leaf (and kept full size);
    leaves with `dims == 0` unchanged."""

    def average(d, n):
        if n == 0:
            return d
        axes = tuple(range(d.ndim - n, d.ndim))
        return jnp.broadcast_to(jnp.mean(jnp.abs(d), axis=axes, keepdims=True), d.shape)

    return jax.tree.map(average, diagonal, dims)


def tree_mean(tree: PyTree[Array], dtype) -> Array:
    """The mean of every entry of every leaf, in `dtype`."""
    leaves = jax.tree.leaves(tree)
    total = sum((jnp.sum(x.astype(dtype)) for x in leaves), jnp.zeros((), dtype))
    return total / sum(x.size for x in leaves)


def ema(decay: RealScalarLike, average: Array, new: Array) -> Array:
    """One step of an exponential moving average, in `new`'s dtype."""
    decay = cast_like(decay, new)
    return decay * average + (1 - decay) * new


def bias_corrected(decay: RealScalarLike, count: Array, average: Array) -> Array:
    """`average / (1 - decay ** t)` at step `t = count + 1` (from a zero start)."""
    t = (count + 1).astype(average.dtype)
    return average / (1 - cast_like(decay, average) ** t)


def check_power(value: RealScalarLike, name: str) -> None:
    check_hyperparameter(
        (value > 0) & (value <= 1),
        f"`{name}` must lie in (0, 1], but is {shown(value)}. Use 1 for the "
        "Newton-like step, or e.g. 0.5 for a gentler one.",
    )


def check_decay(value: RealScalarLike, name: str, example: str) -> None:
    check_hyperparameter(
        (value >= 0) & (value < 1),
        f"`{name}` must lie in [0, 1), but is {shown(value)}. Use e.g. {example}.",
    )


def check_non_negative(value: RealScalarLike, name: str, fix: str) -> None:
    check_hyperparameter(
        (value >= 0) & (value < jnp.inf),
        f"`{name}` must be a finite non-negative number, but is {shown(value)}. {fix}",
    )
