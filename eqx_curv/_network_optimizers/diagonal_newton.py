r"""A stochastic diagonal Newton method for networks, on Hutchinson diagonal estimates."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._losses import AbstractLoss
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
    Curvature,
    ema,
    gradient_and_diagonal,
    tree_mean,
)


class _DiagonalNewtonStats(eqx.Module):
    # The EMA of the (signed) diagonal estimate; None without averaging.
    diagonal: PyTree[Array] | None


def _fraction(trees: list[Array], dtype) -> Array:
    """The fraction of `True` entries over a list of boolean arrays, in `dtype`."""
    return tree_mean([x.astype(dtype) for x in trees], dtype)


class AbstractStochasticDiagonalNewton(
    AbstractNetworkOptimizer[_DiagonalNewtonStats, PyTree[Array]]
):
    """The stochastic diagonal Newton method; see
    [`eqx_curv.StochasticDiagonalNewton`][]."""

    learning_rate: AbstractVar[LearningRate]
    curvature: AbstractVar[Curvature]
    num_probes: AbstractVar[int]
    decay: AbstractVar[RealScalarLike]
    damping: AbstractVar[RealScalarLike]
    min_diagonal: AbstractVar[RealScalarLike | None]
    max_diagonal: AbstractVar[RealScalarLike | None]
    update_clip: AbstractVar[RealScalarLike | None]

    def __check_init__(self):
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(
                "`curvature` must be 'hessian' (the loss's Hessian) or 'ggn' (its "
                f"generalised Gauss-Newton matrix), not {self.curvature!r}."
            )
        check_positive_int(self.num_probes, "num_probes", "Hutchinson probes per step")
        check_decay(self.decay, "decay", "0.9, or 0 for no averaging")
        low, high, clip = self.min_diagonal, self.max_diagonal, self.update_clip
        check_non_negative(
            self.damping, "damping", "It is added to |diagonal|: use e.g. 1e-3."
        )
        if low is not None:
            check_non_negative(low, "min_diagonal", "Use e.g. 1e-3, or None.")
        if is_zero(self.damping) and (low is None or is_zero(low)):
            raise ValueError(
                "`damping` is 0 and `min_diagonal` sets no positive floor, so a zero "
                "curvature estimate (a dead ReLU unit, a parameter the loss ignores) "
                "would be divided by. Pass a positive `damping` (e.g. 1e-3) or a "
                "positive `min_diagonal`."
            )
        if high is not None:
            check_hyperparameter(
                high > 0,
                f"`max_diagonal` must be positive, but is {shown(high)}. Use None for "
                "no upper clip.",
            )
        if low is not None and high is not None:
            check_hyperparameter(
                low <= high,
                f"`min_diagonal` ({shown(low)}) must not exceed `max_diagonal` "
                f"({shown(high)}): the diagonal is clipped to [min_diagonal, "
                "max_diagonal]. Swap them, or pass None for either.",
            )
        if clip is not None:
            check_hyperparameter(
                clip > 0,
                f"`update_clip` must be positive, but is {shown(clip)}: Newton steps "
                "are clipped to [-update_clip, update_clip]. Use e.g. 0.5, or None.",
            )

    def init_stats(self, params: PyTree[Array]) -> _DiagonalNewtonStats:
        if is_zero(self.decay):
            return _DiagonalNewtonStats(None)
        return _DiagonalNewtonStats(jax.tree.map(jnp.zeros_like, params))

    def check_loss(self, loss: Callable) -> None:
        if self.curvature == "ggn" and not isinstance(loss, AbstractLoss):
            raise TypeError(
                "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
                "`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()` or a subclass of "
                f"`AbstractLoss`), not {type(loss).__name__}: "
                "`StochasticDiagonalNewton(curvature='ggn')` needs the loss's "
                "output-space Hessian (`loss.hvp`). Use `curvature='hessian'` for any "
                "other loss."
            )

    def needs_key(self) -> bool:
        return True

    def uses_params(self) -> bool:
        return False

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], PyTree[Array]]:
        assert key is not None  # `step` asked for one (`needs_key`)
        return gradient_and_diagonal(
            objective, params, key, self.num_probes, self.curvature
        )

    def direction(
        self,
        grads: PyTree[Array],
        aux: PyTree[Array],
        params: PyTree[Array],
        stats: _DiagonalNewtonStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _DiagonalNewtonStats, dict[str, Array]]:
        if stats.diagonal is None:
            average = None
            estimate = aux
        else:
            # The EMA of the SIGNED estimate: the probes' noise has mean zero and
            # averages out; bias-corrected, as Adam's moments.
            average = jax.tree.map(
                lambda a, d: ema(self.decay, a, d), stats.diagonal, aux
            )
            estimate = jax.tree.map(
                lambda a: bias_corrected(self.decay, count, a), average
            )

        low, high, clip = self.min_diagonal, self.max_diagonal, self.update_clip

        def clipped(x, lo, hi):
            lo = None if lo is None else cast_like(lo, x)
            hi = None if hi is None else cast_like(hi, x)
            return x if lo is None and hi is None else jnp.clip(x, min=lo, max=hi)

        # |D| + damping: a negative entry is as strong a curvature the other way, and
        # the step stays against the gradient (never uphill).
        damped = jax.tree.map(
            lambda d: jnp.abs(d) + cast_like(self.damping, d), estimate
        )
        divisors = jax.tree.map(lambda c: clipped(c, low, high), damped)
        newton = jax.tree.map(jnp.divide, grads, divisors)
        bound = None if clip is None else -clip
        steps = jax.tree.map(lambda s: clipped(s, bound, clip), newton)
        updates = jax.tree.map(lambda s: -cast_like(learning_rate, s) * s, steps)

        dtype = promoted_dtype(params)

        def changed(a, b):
            return _fraction(jax.tree.leaves(jax.tree.map(jnp.not_equal, a, b)), dtype)

        info = {
            "diagonal": tree_mean(estimate, dtype),
            "negative_fraction": _fraction(
                [d < 0 for d in jax.tree.leaves(estimate)], dtype
            ),
            "curvature": tree_mean(divisors, dtype),
            "diagonal_clipped_fraction": changed(divisors, damped),
            "update_clipped_fraction": changed(steps, newton),
        }
        return updates, _DiagonalNewtonStats(average), info

    def adapt(
        self,
        objective: Objective,
        params: PyTree[Array],
        proposal: Proposal[_DiagonalNewtonStats],
    ) -> Proposal[_DiagonalNewtonStats]:
        del objective, params
        return proposal

    def gradient_only_aux(self, grads: PyTree[Array]) -> PyTree[Array]:
        raise ValueError(
            f"`{type(self).__name__}` has no optax form: its Hutchinson estimate of "
            "the curvature diagonal needs curvature-vector products of the loss, not "
            "only the gradient. Use `step`."
        )


class StochasticDiagonalNewton(AbstractStochasticDiagonalNewton):
    r"""A diagonal Newton method for networks, on Hutchinson diagonal estimates.

    Each step draws Rademacher probes $z_s$ (entries $\pm 1$, from the step's key)
    and estimates the diagonal of the mini-batch loss's curvature $A_t$ (its Hessian,
    or its generalised Gauss-Newton matrix, see `curvature`) by Hutchinson's method,
    $D_t = \frac1S \sum_s z_s \odot A_t z_s$, unbiased for $\mathrm{diag}(A_t)$
    (Bekas, Kokiopoulou and Saad, "An estimator for the diagonal of a matrix", 2007).
    The gradient comes out of the same pass as the products. Then, elementwise, with
    decay $\beta$, damping $\lambda$, the clip bounds $[a, b]$ of the diagonal and
    $c$ of the step, and learning rate $\eta_t$:

    $$\bar D_t = \beta \bar D_{t-1} + (1 - \beta) D_t, \qquad
    \hat D_t = \frac{\bar D_t}{1 - \beta^t}, \qquad
    d_t = \mathrm{clip}\big(|\hat D_t| + \lambda,\ a,\ b\big),$$

    $$\theta_{t+1} = \theta_t - \eta_t\, \mathrm{clip}\big(g_t / d_t,\ -c,\ c\big),$$

    with $\bar D_0 = 0$ (with $\beta = 0$, $\hat D_t = D_t$ and no average is kept).
    This is Becker and LeCun's diagonal approximation ("Improving the convergence
    of back-propagation learning with second order methods", 1988) with an unbiased
    estimate of the true diagonal in place of their Gauss-Newton recursion.

    **Choices.** The average is taken of the signed estimate, before the absolute
    value: the probe noise ($\sum_{k \ne j} A_{jk} z_k z_j$) has mean zero and
    cancels, while averaging $|D|$ would keep it. A negative curvature entry is used
    by its magnitude (as the saddle-free Newton method does with eigenvalues), never
    by its sign: $d_t > 0$ always, so the step is $-\eta\, g / d$ with a positive
    $d$ and can never point uphill. Clipping negative entries to zero instead would
    divide by the bare damping there, a step $1 / \lambda$ times the gradient. The
    damping (or a positive `min_diagonal`) keeps every divisor positive: a dead
    ReLU unit, whose gradient and curvature are both exactly zero, gets a zero step,
    never 0 / 0.

    The curvature's diagonal is estimated, never taken as $A \mathbf{1}$ (the row
    sums, which a reverse-over-reverse product of the gradient with a vector of
    ones gives, and which is not the diagonal). The page this project reproduces
    used the row sums, clipped the diagonal to [0.5, 3] and the step to
    [-0.5, 0.5], with a learning rate of 0.01: pass `min_diagonal=0.5,
    max_diagonal=3.0, update_clip=0.5, learning_rate=0.01` for its configuration.

    `info.stats` reports `diagonal` (the mean of $\hat D_t$, signed),
    `negative_fraction` (of the entries of $\hat D_t$), `curvature` (the mean of
    $d_t$), `diagonal_clipped_fraction` and `update_clipped_fraction` (the fractions
    of entries the clips changed).

    **Arguments:**

    - `learning_rate`: $\eta$, a non-negative number or a schedule `count -> rate`.
        Default 0.1.
    - `curvature`: `"hessian"` (default; any loss) or `"ggn"` (the generalised
        Gauss-Newton matrix $J^\top H_\text{loss} J$, positive semidefinite; needs an
        eqx_curv loss for its output-space Hessian; one forward pass, one
        forward-mode pass and one reverse pass with two cotangents per step).
    - `num_probes`: $S$, Hutchinson probes per step (a positive int). Default 1.
    - `decay`: $\beta \in [0, 1)$. Default 0.9; 0 for the raw estimate.
    - `damping`: $\lambda \geq 0$, added to $|\hat D_t|$. Default 0.01. It may be 0
        only with a positive `min_diagonal`.
    - `min_diagonal`, `max_diagonal`: $a$ and $b$, the bounds $d_t$ is clipped to,
        $0 \le a \le b$; `None` for no bound. Default `None` for both.
    - `update_clip`: $c > 0$, the bound of each entry of the Newton step $g_t / d_t$
        (before the learning rate); `None` for no clip. Default 0.5. A one-probe
        estimate is noisy (on a small tanh MLP about half its entries come out
        negative), and where it lands near zero the unclipped step $g / \lambda$ is
        huge: on sklearn's digits, without the clip, the default learning rate and
        damping end 150 steps ABOVE the initial loss (3.7 and 8.7 against 2.3, two
        seeds); with it, 0.08-0.19 after 150 steps and 2e-4 after 2,000 (3 seeds).
    """

    learning_rate: LearningRate
    curvature: Curvature = eqx.field(static=True)
    num_probes: int = eqx.field(static=True)
    decay: RealScalarLike
    damping: RealScalarLike
    min_diagonal: RealScalarLike | None
    max_diagonal: RealScalarLike | None
    update_clip: RealScalarLike | None

    def __init__(
        self,
        learning_rate: LearningRate = 0.1,
        curvature: Curvature = "hessian",
        num_probes: int = 1,
        decay: RealScalarLike = 0.9,
        damping: RealScalarLike = 0.01,
        min_diagonal: RealScalarLike | None = None,
        max_diagonal: RealScalarLike | None = None,
        update_clip: RealScalarLike | None = 0.5,
    ):
        self.learning_rate = learning_rate
        self.curvature = curvature
        self.num_probes = num_probes
        self.decay = decay
        self.damping = damping
        self.min_diagonal = min_diagonal
        self.max_diagonal = max_diagonal
        self.update_clip = update_clip
