r"""AdaHessian: Adam with the squared gradient replaced by a Hutchinson Hessian diagonal."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._misc import check_hyperparameter, check_positive_int, RealScalarLike, shown
from .base import (
    AbstractNetworkOptimizer,
    cast_like,
    is_zero,
    LearningRate,
    Objective,
    promoted_dtype,
    Proposal,
)
from .hutchinson import (
    bias_corrected,
    check_decay,
    check_non_negative,
    check_power,
    conv_spatial_dims,
    ema,
    gradient_and_diagonal,
    spatially_averaged,
    tree_mean,
)


class _AdaHessianStats(eqx.Module):
    momentum: PyTree[Array] | None  # m, the EMA of gradients (None without momentum)
    hessian: PyTree[Array]  # v, the EMA of the squared Hessian diagonal estimate


def _power(x: Array, power: RealScalarLike) -> Array:
    if isinstance(power, (int, float)) and float(power) == 1:
        return x
    return jnp.power(x, cast_like(power, x))


class AbstractAdaHessian(AbstractNetworkOptimizer[_AdaHessianStats, PyTree[Array]]):
    """AdaHessian; see [`eqx_curv.AdaHessian`][]."""

    learning_rate: AbstractVar[LearningRate]
    momentum: AbstractVar[RealScalarLike]
    hessian_decay: AbstractVar[RealScalarLike]
    hessian_power: AbstractVar[RealScalarLike]
    damping: AbstractVar[RealScalarLike]
    weight_decay: AbstractVar[RealScalarLike]
    num_probes: AbstractVar[int]
    spatial_averaging: AbstractVar[bool]

    def __check_init__(self):
        check_decay(self.momentum, "momentum", "0.9, or 0 for none")
        check_decay(self.hessian_decay, "hessian_decay", "0.999")
        check_power(self.hessian_power, "hessian_power")
        check_hyperparameter(
            (self.damping > 0) & (self.damping < jnp.inf),
            f"`damping` must be a finite positive number, but is {shown(self.damping)}: "
            "it keeps the step finite where the Hessian diagonal vanishes. Use e.g. "
            "1e-4.",
        )
        check_non_negative(self.weight_decay, "weight_decay", "Use 0 for none.")
        check_positive_int(self.num_probes, "num_probes", "Hutchinson probes per step")
        if not isinstance(self.spatial_averaging, bool):
            raise TypeError(
                "`spatial_averaging` must be True or False, not "
                f"{self.spatial_averaging!r}."
            )

    def init_stats(self, params: PyTree[Array]) -> _AdaHessianStats:
        zeros = jax.tree.map(jnp.zeros_like, params)
        momentum = None if is_zero(self.momentum) else zeros
        return _AdaHessianStats(momentum, zeros)

    def check_loss(self, loss: Callable) -> None:
        del loss  # the Hessian of any scalar loss will do

    def needs_key(self) -> bool:
        return True

    def uses_params(self) -> bool:
        return not is_zero(self.weight_decay)

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
        assert key is not None  # `step` asked for one (`needs_key`)
        value, grads, diagonal = gradient_and_diagonal(
            objective, params, key, self.num_probes
        )
        if self.spatial_averaging:
            diagonal = spatially_averaged(diagonal, conv_spatial_dims(params))
        return value, grads, diagonal

    def direction(
        self,
        grads: PyTree[Array],
        aux: PyTree[Array],
        params: PyTree[Array],
        stats: _AdaHessianStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _AdaHessianStats, dict[str, Array]]:
        hessian = jax.tree.map(
            lambda v, d: ema(self.hessian_decay, v, jnp.square(d)), stats.hessian, aux
        )
        if stats.momentum is None:
            momentum = None
            first = grads
        else:
            momentum = jax.tree.map(
                lambda m, g: ema(self.momentum, m, g), stats.momentum, grads
            )
            first = jax.tree.map(
                lambda m: bias_corrected(self.momentum, count, m), momentum
            )

        def denominator(v):
            # (sqrt(v_hat))^k + eps: the root-mean-square diagonal, to the power k.
            rms = jnp.sqrt(bias_corrected(self.hessian_decay, count, v))
            return _power(rms, self.hessian_power) + cast_like(self.damping, v)

        denominators = jax.tree.map(denominator, hessian)

        def update(m, d, p):
            lr = cast_like(learning_rate, p)
            if is_zero(self.weight_decay):
                return -lr * (m / d)
            return -lr * (m / d + cast_like(self.weight_decay, p) * p)

        updates = jax.tree.map(update, first, denominators, params)
        dtype = promoted_dtype(params)
        info = {
            "hessian_diagonal": tree_mean(jax.tree.map(jnp.abs, aux), dtype),
            "denominator": tree_mean(denominators, dtype),
        }
        return updates, _AdaHessianStats(momentum, hessian), info

    def adapt(
        self,
        objective: Objective,
        params: PyTree[Array],
        proposal: Proposal[_AdaHessianStats],
    ) -> Proposal[_AdaHessianStats]:
        del objective, params
        return proposal

    def gradient_only_aux(self, grads: PyTree[Array]) -> PyTree[Array]:
        raise ValueError(
            f"`{type(self).__name__}` has no optax form: its Hutchinson estimate of "
            "the Hessian diagonal needs Hessian-vector products of the loss, not only "
            "the gradient. Use `step`."
        )


class AdaHessian(AbstractAdaHessian):
    r"""AdaHessian: Adam whose second moment is a Hutchinson Hessian diagonal.

    Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, "ADAHESSIAN: an adaptive second
    order optimizer for machine learning", AAAI 2021 (Algorithm 1). Each step draws
    Rademacher probes $z_s$ (entries $\pm 1$, from the step's key) and estimates the
    Hessian diagonal of the mini-batch loss by Hutchinson's method,

    $$D_t = \frac1S \sum_{s=1}^S z_s \odot H_t z_s, \qquad
    \mathbb{E}[D_t] = \mathrm{diag}(H_t),$$

    where $H_t z_s$ and the gradient $g_t$ come out of ONE forward-over-reverse pass
    (`jax.jvp` of `jax.value_and_grad`), at the same dropout masks. Then, with
    momentum $\beta_1$, Hessian decay $\beta_2$, Hessian power $k$, damping
    $\epsilon$, weight decay $\lambda$ and learning rate $\eta_t$, elementwise:

    $$m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) \bar D_t^2,$$

    $$\theta_{t+1} = \theta_t - \eta_t \left(
    \frac{m_t / (1 - \beta_1^t)}{\left(\sqrt{v_t / (1 - \beta_2^t)}\right)^k + \epsilon}
    + \lambda \theta_t \right),$$

    with $m_0 = v_0 = 0$. $\bar D_t$ is $D_t$, except on convolution kernels with
    `spatial_averaging` (the paper's section 3.3): there $|D_t|$ is averaged over the
    kernel's spatial axes, one value per (output, input) channel pair. Kernels are found
    by module type: the `weight` of every `eqx.nn.Conv` (`Conv1d`, `Conv2d`,
    `Conv3d`) and `eqx.nn.ConvTranspose` in the model, shaped `(out, in / groups,
    *kernel)`; not by the number of axes (the paper's code averages every 4-D
    array, which misses 1-D and 3-D convolutions and would average any other 4-D
    parameter). A kernel held as a raw array in a custom module is not averaged.

    Squaring $D_t$ makes the sign of the curvature irrelevant: a negative diagonal
    entry never turns the step uphill. With $k = 1$ the step is a diagonal Newton
    step $\hat m / |\mathrm{diag}\, H|$ in the root-mean-square sense; $k = 1/2$ is
    gentler. The weight decay is decoupled (multiplied by $\eta_t$, never divided by
    the curvature), as in the paper's code.

    Cost: one gradient-returning Hessian-vector product per probe (for $S > 1$, one
    `jax.linearize` and $S$ tangent passes), plus elementwise work.
    `info.stats` reports `hessian_diagonal` (the mean of $|\bar D_t|$) and
    `denominator` (the mean of $(\sqrt{\hat v_t})^k + \epsilon$).

    **Arguments:**

    - `learning_rate`: $\eta$, a non-negative number or a schedule `count -> rate`.
        Default 0.15, the paper's for image classification. It also trains a small
        MLP on sklearn's digits stably (batch 64, 3 seeds: full-data loss 0.11 after
        150 steps, 0.001 after 2,000; 0.015, the rate the page this project
        reproduces used on its vision transformer, reaches only 0.6 and 0.16 after
        150 and 500 steps there). With $k = 1$ the step is Newton-like, so the rate
        is a fraction of a Newton step rather than a gradient step size; for a
        transformer, with noisier curvature, start near 0.015.
    - `momentum`: $\beta_1 \in [0, 1)$. Default 0.9; 0 for none (no buffer kept).
    - `hessian_decay`: $\beta_2 \in [0, 1)$. Default 0.999.
    - `hessian_power`: $k \in (0, 1]$. Default 1.
    - `damping`: $\epsilon > 0$, added to the denominator. Default 1e-4 (the paper's
        code).
    - `weight_decay`: $\lambda \geq 0$, decoupled. Default 0.
    - `num_probes`: $S$, Hutchinson probes per step (a positive int). Default 1.
    - `spatial_averaging`: average $|D|$ over convolution kernels' spatial axes, as
        above. Default `True`.
    """

    learning_rate: LearningRate
    momentum: RealScalarLike
    hessian_decay: RealScalarLike
    hessian_power: RealScalarLike
    damping: RealScalarLike
    weight_decay: RealScalarLike
    num_probes: int = eqx.field(static=True)
    spatial_averaging: bool = eqx.field(static=True)

    def __init__(
        self,
        learning_rate: LearningRate = 0.15,
        momentum: RealScalarLike = 0.9,
        hessian_decay: RealScalarLike = 0.999,
        hessian_power: RealScalarLike = 1.0,
        damping: RealScalarLike = 1e-4,
        weight_decay: RealScalarLike = 0.0,
        num_probes: int = 1,
        spatial_averaging: bool = True,
    ):
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.hessian_decay = hessian_decay
        self.hessian_power = hessian_power
        self.damping = damping
        self.weight_decay = weight_decay
        self.num_probes = num_probes
        self.spatial_averaging = spatial_averaging
