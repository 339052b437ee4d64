r"""Adam read as a diagonal Fisher preconditioner: exponent 1/2 or 1, empirical or true."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from .._losses import AbstractLoss
from .._misc import check_hyperparameter, is_traced, RealScalarLike, shown
from .base import (
    AbstractNetworkOptimizer,
    cast_like,
    is_zero,
    LearningRate,
    Objective,
    promoted_dtype,
    Proposal,
)


# Levenberg-Marquardt adaptation of the damping (Moré, "The Levenberg-Marquardt
# algorithm: implementation and theory", 1978; Martens and Grosse, "Optimizing neural
# networks with Kronecker-factored approximate curvature", ICML 2015, section 6.5):
# the reduction ratio rho of the step on its own batch decides.
_RHO_LOW, _RHO_HIGH = 0.25, 0.75


def levenberg_marquardt(
    objective: Objective,
    params: PyTree[Array],
    loss: Scalar,
    updates: PyTree[Array],
    predicted: Float[Array, ""],
    damping: Float[Array, ""],
    damping_factor: RealScalarLike,
) -> tuple[Float[Array, ""], PyTree[Array], dict[str, Array]]:
    """The Levenberg-Marquardt rule: judge `updates` by the loss on the same batch.

    One extra evaluation of the loss at `params + updates`; the reduction ratio
    `rho = (L(params + updates) - loss) / predicted` against the quadratic model's
    `predicted` change divides the damping by `damping_factor` where `rho > 3/4` and
    multiplies it where `rho < 1/4` (kept within `[eps^2, 1/eps^2]`). A step that raises
    the batch loss (or makes it non-finite) is rejected: its updates become zeros.

    **Returns:** `(new_damping, updates, info)` with `info` holding `reduction_ratio`
    and `accepted`.
    """
    dtype = damping.dtype
    trial = objective.value(jax.tree.map(lambda p, u: p + u, params, updates))
    actual = (trial - loss).astype(dtype)
    # A model that predicts no decrease (a zero learning rate, or momentum against
    # the gradient) says nothing about the damping: rho = 1/2 keeps it.
    rho = jnp.where(predicted < 0, actual / jnp.where(predicted < 0, predicted, 1), 0.5)
    factor = cast_like(damping_factor, damping)
    scale = jnp.where(
        rho > _RHO_HIGH, 1 / factor, jnp.where(rho >= _RHO_LOW, 1, factor)
    )
    eps = jnp.finfo(dtype).eps
    new_damping = jnp.clip(damping * scale, eps**2, 1 / eps**2)
    accept = trial <= loss
    updates = jax.tree.map(lambda u: jnp.where(accept, u, 0), updates)
    return new_damping, updates, {"reduction_ratio": rho, "accepted": accept}


class _FisherAdamStats(eqx.Module):
    momentum: PyTree[Array] | None  # m, the EMA of gradients (None without momentum)
    fisher: PyTree[Array]  # v, the EMA of squared gradients: the diagonal Fisher
    damping: Float[Array, ""]  # lambda, adapted where `adaptive_damping`


def _power(x: Array, exponent: RealScalarLike) -> Array:
    if not is_traced(exponent) and float(exponent) == 0.5:
        return jnp.sqrt(x)
    if not is_traced(exponent) and float(exponent) == 1:
        return x
    return jnp.power(x, cast_like(exponent, x))


class AbstractFisherAdam(AbstractNetworkOptimizer[_FisherAdamStats, PyTree[Array]]):
    """Adam as a diagonal Fisher; see [`eqx_curv.FisherAdam`][]."""

    learning_rate: AbstractVar[LearningRate]
    exponent: AbstractVar[RealScalarLike]
    fisher: AbstractVar[Literal["empirical", "true"]]
    momentum: AbstractVar[RealScalarLike]
    fisher_decay: AbstractVar[RealScalarLike]
    damping: AbstractVar[RealScalarLike]
    adaptive_damping: AbstractVar[bool]
    damping_factor: AbstractVar[RealScalarLike]

    def __check_init__(self):
        p, b1, b2 = self.exponent, self.momentum, self.fisher_decay
        check_hyperparameter(
            (p > 0) & (p <= 1),
            f"`exponent` must lie in (0, 1], but is {shown(p)}. Use 0.5 for Adam or 1 "
            "for the natural-gradient form.",
        )
        check_hyperparameter(
            (b1 >= 0) & (b1 < 1),
            f"`momentum` must lie in [0, 1), but is {shown(b1)}. Use e.g. 0.9, or 0 "
            "for none.",
        )
        check_hyperparameter(
            (b2 >= 0) & (b2 < 1),
            f"`fisher_decay` must lie in [0, 1), but is {shown(b2)}. Use e.g. 0.999.",
        )
        check_hyperparameter(
            (self.damping > 0) & (self.damping < jnp.inf),
            f"`damping` must be a finite positive number, but is "
            f"{shown(self.damping)}: a zero damping divides by a zero Fisher entry "
            "(a parameter whose gradient vanishes). Use e.g. 1e-8.",
        )
        check_hyperparameter(
            self.damping_factor > 1,
            f"`damping_factor` must be greater than 1, but is "
            f"{shown(self.damping_factor)}. Use e.g. 1.5.",
        )
        if self.fisher not in ("empirical", "true"):
            raise ValueError(
                f"`fisher` must be 'empirical' (squared gradients at the data labels) "
                f"or 'true' (at labels sampled from the model), not {self.fisher!r}."
            )

    def init_stats(self, params: PyTree[Array]) -> _FisherAdamStats:
        zeros = jax.tree.map(jnp.zeros_like, params)
        momentum = None if is_zero(self.momentum) else zeros
        dtype = promoted_dtype(params)
        damping = jnp.asarray(self.damping).astype(dtype)
        return _FisherAdamStats(momentum, zeros, damping)

    def check_loss(self, loss: Callable) -> None:
        if self.fisher == "true" and not isinstance(loss, AbstractLoss):
            raise TypeError(
                "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
                "`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()` or a subclass of "
                f"`AbstractLoss`), not {type(loss).__name__}: `FisherAdam(fisher='true')` "
                "samples labels from the model's predictive distribution with "
                "`loss.sample`. Use `fisher='empirical'` for any other loss."
            )

    def needs_key(self) -> bool:
        return self.fisher == "true"

    def uses_params(self) -> bool:
        return False

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
        if self.fisher == "empirical":
            value, grads = jax.value_and_grad(objective.value)(params)
            return value, grads, grads
        assert key is not None  # `step` asked for one (`needs_key`)
        # One forward pass, two backward passes through it: at the data labels (the
        # gradient) and at labels drawn from the model (the true-Fisher statistics).
        outputs, pullback = jax.vjp(objective.outputs, params)
        loss = objective.loss
        assert isinstance(loss, AbstractLoss)  # `step` checked it (`check_loss`)
        value, output_grad = jax.value_and_grad(loss)(outputs, objective.targets)
        sampled = jax.lax.stop_gradient(loss.sample(key, outputs))
        sampled_output_grad = jax.grad(loss)(outputs, sampled)
        (grads,) = pullback(output_grad)
        (sampled_grads,) = pullback(sampled_output_grad)
        return value, grads, sampled_grads

    def direction(
        self,
        grads: PyTree[Array],
        aux: PyTree[Array],
        params: PyTree[Array],
        stats: _FisherAdamStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _FisherAdamStats, dict[str, Array]]:
        del params
        t = count + 1

        def ema(decay, average, new):
            decay = cast_like(decay, new)
            return decay * average + (1 - decay) * new

        def correction(decay, x):
            return 1 - cast_like(decay, x) ** t.astype(jnp.result_type(x))

        fisher = jax.tree.map(
            lambda v, f: ema(self.fisher_decay, v, jnp.square(f)), stats.fisher, aux
        )
        if stats.momentum is None:
            momentum = None
            first = grads
        else:
            momentum = jax.tree.map(
                lambda m, g: ema(self.momentum, m, g), stats.momentum, grads
            )
            first = jax.tree.map(lambda m: m / correction(self.momentum, m), momentum)

        def preconditioner(v):
            v_hat = v / correction(self.fisher_decay, v)
            return _power(v_hat, self.exponent) + stats.damping.astype(v.dtype)

        diagonal = jax.tree.map(preconditioner, fisher)
        updates = jax.tree.map(
            lambda m, d: -cast_like(learning_rate, m) * m / d, first, diagonal
        )
        info = {"damping": stats.damping}
        if self.adaptive_damping:
            # The quadratic model q(u) = g.u + 1/2 u.(D / lr).u, for which
            # u = -lr D^{-1} g is the minimiser (without momentum); with
            # u = -lr D^{-1} m, its curvature term u.(D / lr).u is -m.u (no second
            # division by D).
            dtype = stats.damping.dtype
            linear = sum(
                jnp.sum(g * u).astype(dtype)
                for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates))
            )
            curvature = -sum(
                jnp.sum(m * u).astype(dtype)
                for m, u in zip(jax.tree.leaves(first), jax.tree.leaves(updates))
            )
            info["predicted_change"] = jnp.asarray(linear + curvature / 2, dtype)
        return updates, _FisherAdamStats(momentum, fisher, stats.damping), info

    def adapt(
        self,
        objective: Objective,
        params: PyTree[Array],
        proposal: Proposal[_FisherAdamStats],
    ) -> Proposal[_FisherAdamStats]:
        if not self.adaptive_damping:
            return proposal
        stats, info = proposal.stats, dict(proposal.info)
        # A rejected step keeps the parameters; the statistics still take in this
        # batch's gradient.
        new_damping, updates, judged = levenberg_marquardt(
            objective,
            params,
            proposal.loss,
            proposal.updates,
            info["predicted_change"],
            stats.damping,
            self.damping_factor,
        )
        info.update(judged)
        new_stats = _FisherAdamStats(stats.momentum, stats.fisher, new_damping)
        return Proposal(proposal.loss, proposal.grads, updates, new_stats, info)

    def gradient_only_aux(self, grads: PyTree[Array]) -> PyTree[Array]:
        if self.fisher == "true":
            raise ValueError(
                "`FisherAdam(fisher='true')` has no optax form: it samples labels from "
                "the model, which needs the model, not only the gradient. Use "
                "`fisher='empirical'`, or `step`."
            )
        if self.adaptive_damping:
            raise ValueError(
                "`FisherAdam(adaptive_damping=True)` has no optax form: adapting the "
                "damping evaluates the loss after the step. Pass "
                "`adaptive_damping=False` (a fixed damping), or use `step`."
            )
        return grads


class FisherAdam(AbstractFisherAdam):
    r"""Adam, read as a diagonal Fisher preconditioner.

    With the mini-batch gradient $g_t$ at the data labels, and $f_t$ the gradient
    whose square estimates the Fisher's diagonal (see `fisher`), momentum $\beta_1$,
    Fisher decay $\beta_2$, exponent $p$, damping $\lambda$ and learning rate $\eta_t$:

    $$m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) f_t^2,$$

    $$\hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t},
    \qquad \theta_{t+1} = \theta_t - \eta_t \frac{\hat m_t}{\hat v_t^{\,p} + \lambda},$$

    elementwise, with $m_0 = v_0 = 0$ and the bias corrections of Kingma and Ba,
    "Adam: a method for stochastic optimization", ICLR 2015. With $p = 1/2$,
    `fisher="empirical"` and no damping adaptation this is exactly Adam, with
    $\lambda$ its $\epsilon$. $\mathrm{diag}(\hat v)$ is read as a diagonal Fisher
    $F$, and $p = 1$ is then the natural-gradient step $F^{-1} g$ with Tikhonov
    damping $\lambda$; $p = 1/2$ its square root.

    **Which Fisher.** Like Adam, $v$ averages the square of the MINI-BATCH gradient,
    never per-example gradients (no extra cost):

    - `fisher="empirical"`: $f_t = g_t$, the gradient at the data labels (Adam's own
        second moment). Its expectation is $\frac1N \mathrm{diag}(F_\text{emp}) +
        (\mathbb{E} g)^2$ for a batch of $N$: the empirical Fisher, which is not a
        curvature of the loss (Kunstner, Balles and Hennig, "Limitations of the
        empirical Fisher approximation for natural gradient descent", NeurIPS 2019).
    - `fisher="true"`: $f_t$ is the mini-batch gradient at labels drawn from the
        model's predictive distribution (`loss.sample`, from the step's key). One
        forward pass serves both gradients (two backward passes through one
        `jax.vjp`). Sampled scores have mean zero and are independent across examples,
        so $\mathbb{E}[f_t^2] = \frac1N \mathrm{diag}(F)$: the true Fisher's diagonal
        divided by the batch size. It is smaller than Adam's statistics (no squared
        mean gradient), so the steps are larger: use a smaller learning rate (about
        10x) than for the empirical form. Needs an eqx_curv loss and a `key`.

    **Damping.** $\lambda$ keeps the step finite where $\hat v$ vanishes, and it must
    be positive. With $p = 1/2$ it is Adam's $\epsilon$ (default 1e-8). With $p = 1$
    the undamped step $\hat m / \hat v \approx 1/g$ grows as the gradient shrinks and
    diverges; there, by default, $\lambda$ adapts by the Levenberg-Marquardt rule
    (Moré 1978; Martens and Grosse, "Optimizing neural networks with
    Kronecker-factored approximate curvature", ICML 2015, section 6.5): after each
    step the loss on the same batch (and dropout masks) is evaluated at the new
    parameters, one extra forward pass, and the reduction ratio
    $\rho = (L(\theta + u) - L(\theta)) / q(u)$ against the quadratic model
    $q(u) = g^\top u + \frac12 u^\top (D/\eta) u$, $D = \hat v^{p} + \lambda$ (for
    which $u = -\eta D^{-1} g$ is the minimiser), sets
    $\lambda \leftarrow \lambda / c$ where $\rho > 3/4$ and $\lambda \leftarrow c
    \lambda$ where $\rho < 1/4$, $c$ = `damping_factor`. A step that raises the
    batch loss is rejected (the parameters stay; the moments take in the gradient;
    `info.stats["accepted"]` says so). When $\lambda$ dominates, the step is SGD
    with learning rate $\eta / \lambda$, so the adaptation finds a stable step size
    on its own. `info.stats` reports `damping` (and, when adapting,
    `reduction_ratio`, `predicted_change`, `accepted`).

    **Momentum.** Default $\beta_1 = 0.9$ (Adam's). The reference page's runs use
    none: pass `momentum=0`, and then $\hat m_t = g_t$ and no buffer is kept.

    `as_optax()` ([`eqx_curv.AbstractNetworkOptimizer.as_optax`][]) gives the same
    updates as an optax transformation for `fisher="empirical"` without damping
    adaptation.

    **Arguments:**

    - `learning_rate`: $\eta$, a non-negative number or a schedule `count -> rate`.
        Default 1e-3.
    - `exponent`: $p \in (0, 1]$. Default 0.5 (Adam); 1 for the natural-gradient form.
    - `fisher`: `"empirical"` (default) or `"true"`, as above.
    - `momentum`: $\beta_1 \in [0, 1)$. Default 0.9.
    - `fisher_decay`: $\beta_2 \in [0, 1)$. Default 0.999.
    - `damping`: the (initial) $\lambda > 0$. Default 1e-8 for $p = 1/2$, 1e-4
        otherwise.
    - `adaptive_damping`: adapt $\lambda$ by the reduction ratio. Default: `True`
        for $p \neq 1/2$, `False` for $p = 1/2$ (exact Adam).
    - `damping_factor`: $c > 1$ of the adaptation. Default 1.5.
    """

    learning_rate: LearningRate
    exponent: RealScalarLike
    fisher: Literal["empirical", "true"] = eqx.field(static=True)
    momentum: RealScalarLike
    fisher_decay: RealScalarLike
    damping: RealScalarLike
    adaptive_damping: bool = eqx.field(static=True)
    damping_factor: RealScalarLike

    def __init__(
        self,
        learning_rate: LearningRate = 1e-3,
        exponent: RealScalarLike = 0.5,
        fisher: Literal["empirical", "true"] = "empirical",
        momentum: RealScalarLike = 0.9,
        fisher_decay: RealScalarLike = 0.999,
        damping: RealScalarLike | None = None,
        adaptive_damping: bool | None = None,
        damping_factor: RealScalarLike = 1.5,
    ):
        is_adam = None if is_traced(exponent) else float(exponent) == 0.5
        if adaptive_damping is None:
            if is_adam is None:
                raise ValueError(
                    "`adaptive_damping` must be given (True or False) when `exponent` "
                    "is traced: its default depends on whether the exponent is 1/2."
                )
            adaptive_damping = not is_adam
        if not isinstance(adaptive_damping, bool):
            raise TypeError(
                f"`adaptive_damping` must be True or False, not {adaptive_damping!r}."
            )
        if damping is None:
            damping = 1e-8 if is_adam else 1e-4
        self.learning_rate = learning_rate
        self.exponent = exponent
        self.fisher = fisher
        self.momentum = momentum
        self.fisher_decay = fisher_decay
        self.damping = damping
        self.adaptive_damping = adaptive_damping
        self.damping_factor = damping_factor
