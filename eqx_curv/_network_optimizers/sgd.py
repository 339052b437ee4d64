r"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PyTree

from .._misc import check_hyperparameter, RealScalarLike, shown
from .base import (
    AbstractGradientOptimizer,
    cast_like,
    is_zero,
    LearningRate,
)


class _SGDStats(eqx.Module):
    # The momentum buffer b (None without momentum).
    momentum: PyTree[Array] | None


class AbstractSGD(AbstractGradientOptimizer[_SGDStats]):
    """Stochastic gradient descent; see [`eqx_curv.SGD`][]."""

    learning_rate: AbstractVar[LearningRate]
    momentum: AbstractVar[RealScalarLike]
    nesterov: AbstractVar[bool]
    weight_decay: AbstractVar[RealScalarLike]

    def __check_init__(self):
        m, wd = self.momentum, self.weight_decay
        check_hyperparameter(
            (m >= 0) & (m < 1),
            f"`momentum` must lie in [0, 1), but is {shown(m)}. Use e.g. 0.9, or 0 for "
            "plain SGD.",
        )
        check_hyperparameter(
            wd >= 0,
            f"`weight_decay` must be non-negative, but is {shown(wd)}. Use 0 for none.",
        )

    def init_stats(self, params: PyTree[Array]) -> _SGDStats:
        if is_zero(self.momentum):
            return _SGDStats(None)
        return _SGDStats(jax.tree.map(jnp.zeros_like, params))

    def uses_params(self) -> bool:
        return not is_zero(self.weight_decay)

    def direction(
        self,
        grads: PyTree[Array],
        aux: None,
        params: PyTree[Array],
        stats: _SGDStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _SGDStats, dict[str, Array]]:
        del aux, count
        if stats.momentum is None:
            buffer = None
            step = grads
        else:

            def new_buffer(b, g):
                return cast_like(self.momentum, g) * b + g

            buffer = jax.tree.map(new_buffer, stats.momentum, grads)
            if self.nesterov:
                step = jax.tree.map(
                    lambda b, g: g + cast_like(self.momentum, g) * b, buffer, grads
                )
            else:
                step = buffer

        def update(d, p):
            lr = cast_like(learning_rate, p)
            if is_zero(self.weight_decay):
                return -lr * d
            return -lr * (d + cast_like(self.weight_decay, p) * p)

        return jax.tree.map(update, step, params), _SGDStats(buffer), {}


class SGD(AbstractSGD):
    r"""Stochastic gradient descent, with heavy-ball or Nesterov momentum.

    With gradient $g_t$ of the mini-batch loss, momentum $\mu$, learning rate
    $\eta_t$ (from the schedule) and weight decay $\lambda$:

    $$b_t = \mu\, b_{t-1} + g_t, \qquad
    d_t = \begin{cases} g_t + \mu\, b_t & \text{Nesterov} \\ b_t & \text{otherwise}
    \end{cases}, \qquad
    \theta_{t+1} = \theta_t - \eta_t\,(d_t + \lambda\, \theta_t),$$

    with $b_0 = 0$. The buffer accumulates raw gradients (the convention of PyTorch's
    `SGD`; Sutskever, Martens, Dahl and Hinton, "On the importance of initialization
    and momentum in deep learning", ICML 2013, for the Nesterov form), so a constant
    gradient moves $\eta / (1 - \mu)$ per step. The weight decay is decoupled from the
    gradient (Loshchilov and Hutter, "Decoupled weight decay regularization", ICLR
    2019): it shrinks the weights by $\eta_t \lambda$ and never enters the momentum.

    It needs only the gradient: `as_optax()`
    ([`eqx_curv.AbstractNetworkOptimizer.as_optax`][]) gives the same updates as
    an optax transformation. Any callable `loss(outputs, targets) -> scalar` works.

    **Arguments:**

    - `learning_rate`: $\eta$, a non-negative number or a schedule `count -> rate`
        (e.g. `optax.cosine_decay_schedule(...)`). Default 0.01.
    - `momentum`: $\mu \in [0, 1)$. Default 0.9; 0 for plain SGD (no buffer kept).
    - `nesterov`: Nesterov's momentum instead of heavy ball. Default `False`.
    - `weight_decay`: $\lambda \geq 0$, decoupled. Default 0.
    """

    learning_rate: LearningRate
    momentum: RealScalarLike
    nesterov: bool = eqx.field(static=True)
    weight_decay: RealScalarLike

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        momentum: RealScalarLike = 0.9,
        nesterov: bool = False,
        weight_decay: RealScalarLike = 0.0,
    ):
        if not isinstance(nesterov, bool):
            raise TypeError(f"`nesterov` must be True or False, not {nesterov!r}.")
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
