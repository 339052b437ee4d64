r"""K-FAC for networks: Kronecker-factored natural gradient with the quadratic model."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from .._layers import analyse, Approximation, Layout, usable_layout
from .._losses import AbstractLoss
from .._misc import check_hyperparameter, check_positive_int, RealScalarLike, shown
from .._operators.ggn import batch_size
from .._operators.kfac import (
    blockwise,
    check_fisher_type,
    DampingMethod,
    diagonal_values,
    Eigen,
    eigen,
    eigen_mv,
    estimate_factors,
    factor_dtype,
    factored_inverse,
    factored_inverse_mv,
    FactoredInverse,
    Factors,
    FisherType,
    spectral_values,
)
from .._sharding.context import (
    mean_over_shards,
    num_shards,
    spread_calls,
    sum_over_shards,
)
from .base import (
    AbstractNetworkOptimizer,
    cast_like,
    LearningRate,
    Objective,
    promoted_dtype,
    Proposal,
)
from .fisher_adam import levenberg_marquardt


class _KFACStats(eqx.Module):
    factors: Factors  # exponential averages (not yet bias-corrected), float32 at least
    # At the last refresh: eigendecompositions of the corrected factors ("exact"),
    # or their pi-adjusted damped inverses ("factored").
    preconditioner: tuple[Eigen | FactoredInverse, ...]
    # The damping the factored inverses were built with: the diagonal blocks use it
    # too, so that the preconditioner stays one consistently damped matrix until the
    # next refresh (a current damping on some blocks only destabilised training).
    refreshed_damping: Float[Array, ""]
    damping: Float[Array, ""]  # lambda
    previous: PyTree[Array]  # delta_0, the last update (for momentum)
    # (alpha, mu) of the last quadratic-model step, before the learning-rate scale
    # and after the KL shrink, and the K-FAC norm^2 of its preconditioned part
    # (alpha Delta): reused on the steps in between (`adaptive_every`).
    coefficients: Float[Array, "3"]


class _KFACAux(eqx.Module):
    # The part of the batch the factors are estimated from, and the key of the
    # sampled targets: the factors themselves are computed in `direction`, which
    # knows the step count (`statistics_every`).
    sub: Objective
    key: PRNGKeyArray | None
    layout: Layout = eqx.field(static=True)


def _sub_batch_size(statistics_batch: int | float, batch: int) -> int:
    if isinstance(statistics_batch, float):
        return max(1, min(batch, round(statistics_batch * batch)))
    return min(batch, statistics_batch)


def _sub_objective(objective: Objective, size: int) -> Objective:
    """The same objective on the first `size` examples of the batch (a minibatch
    is already a random sample, so its first examples are one too)."""
    first = lambda x: x[:size]  # noqa: E731
    return Objective(
        objective.static,
        objective.loss,
        jax.tree.map(first, objective.inputs),
        jax.tree.map(first, objective.targets),
        objective.model_key,
    )


def _dot(a: PyTree[Array], b: PyTree[Array], dtype) -> Array:
    return sum(
        (jnp.sum(x.astype(dtype) * y.astype(dtype)) for x, y in zip(
            jax.tree.leaves(a), jax.tree.leaves(b)
        )),
        jnp.zeros((), dtype),
    )  # fmt: skip


def _combine(alpha: Array, x: PyTree[Array], mu: Array, y: PyTree[Array]):
    return jax.tree.map(
        lambda a, b: cast_like(alpha, a) * a + cast_like(mu, b) * b, x, y
    )


def _shrink_within(value: Array, bound: Array) -> Array:
    """The factor that scales a step whose squared size is `value` to at most `bound`
    (1 where it is already within; the step scales with its square root)."""
    return jnp.where(value > bound, jnp.sqrt(bound / jnp.where(value > 0, value, 1)), 1)


def _solve_2x2(a11, a12, a22, b1, b2):
    r"""$(\alpha, \mu)$ minimising $\frac12 [\alpha\ \mu] A [\alpha\ \mu]^\top +
    b_1\alpha + b_2\mu$ for a PSD $A$; along the first direction alone where the
    second is zero or parallel to it (the first step, or a rejected one)."""
    eps = jnp.finfo(a11.dtype).eps
    det = a11 * a22 - a12 * a12
    both = (a22 > 0) & (det > 100 * eps * a11 * a22)
    safe_det = jnp.where(both, det, 1)
    alpha2 = (-b1 * a22 + b2 * a12) / safe_det
    mu2 = (-b2 * a11 + b1 * a12) / safe_det
    ok1 = a11 > 0
    alpha1 = jnp.where(ok1, -b1 / jnp.where(ok1, a11, 1), 0)
    return jnp.where(both, alpha2, alpha1), jnp.where(both, mu2, 0)


class AbstractKFAC(AbstractNetworkOptimizer[_KFACStats, _KFACAux]):
    """K-FAC; see [`eqx_curv.KFAC`][]."""

    learning_rate: AbstractVar[LearningRate]
    fisher_type: AbstractVar[FisherType]
    approximation: AbstractVar[Approximation]
    factor_decay: AbstractVar[RealScalarLike]
    inverse_every: AbstractVar[int]
    damping: AbstractVar[RealScalarLike]
    damping_bounds: AbstractVar[tuple[RealScalarLike, RealScalarLike]]
    damping_every: AbstractVar[int]
    damping_method: AbstractVar[DampingMethod]
    max_kl: AbstractVar[RealScalarLike | None]
    statistics_batch: AbstractVar[int | float]
    statistics_every: AbstractVar[int]
    adaptive_every: AbstractVar[int]
    eigh_retry: AbstractVar[bool]

    def __check_init__(self):
        check_fisher_type(self.fisher_type)
        if not isinstance(self.eigh_retry, bool):
            raise TypeError(
                "`eigh_retry` must be a Python bool, not "
                f"{type(self.eigh_retry).__name__}."
            )
        if self.eigh_retry and self.damping_method != "exact":
            raise ValueError(
                '`eigh_retry=True` needs `damping_method="exact"`: only that method '
                'eigendecomposes the factors ("factored" inverts them by LU). Set '
                '`damping_method="exact"`, or leave `eigh_retry` False.'
            )
        if self.approximation not in ("expand", "reduce"):
            raise ValueError(
                f'`approximation` must be "expand" or "reduce", not '
                f"{self.approximation!r}."
            )
        if self.damping_method not in ("exact", "factored"):
            raise ValueError(
                f'`damping_method` must be "factored" (pi-adjusted, per factor) or '
                f'"exact" (in the factors\' eigenbasis), not {self.damping_method!r}.'
            )
        check_positive_int(self.inverse_every, "inverse_every", "steps")
        check_positive_int(self.damping_every, "damping_every", "steps")
        check_positive_int(self.statistics_every, "statistics_every", "steps")
        check_positive_int(
            self.adaptive_every,
            "adaptive_every",
            "every how many steps the quadratic model sets the learning rate and "
            "momentum; 1 for every step",
        )
        size = self.statistics_batch
        if isinstance(size, float):
            if not 0 < size <= 1:
                raise ValueError(
                    "`statistics_batch` as a float is the fraction of each batch that "
                    "the factors and the quadratic model are estimated on, in (0, 1], "
                    f"but is {size!r}. Use e.g. 0.25, or an int number of examples."
                )
        else:
            check_positive_int(
                size, "statistics_batch", "examples, or a float fraction of the batch"
            )
        decay = self.factor_decay
        check_hyperparameter(
            (decay >= 0) & (decay < 1),
            f"`factor_decay` must lie in [0, 1), but is {shown(decay)}. Use e.g. 0.95.",
        )
        low, high = self.damping_bounds
        check_hyperparameter(
            (low > 0) & (low < jnp.inf),
            f"`damping_bounds` must be two finite positive numbers (lowest, highest), "
            f"but the lowest is {shown(low)}. A zero floor lets the damping collapse "
            "as the loss nears zero and the steps blow up; use e.g. 1e-4.",
        )
        check_hyperparameter(
            (high >= low) & (high < jnp.inf),
            f"`damping_bounds` must be (lowest, highest) with lowest <= highest, both "
            f"finite, but are ({shown(low)}, {shown(high)}). Use e.g. (1e-4, 1e4).",
        )
        check_hyperparameter(
            (self.damping >= low) & (self.damping <= high),
            f"`damping` (the initial damping) must lie within `damping_bounds` "
            f"({shown(low)}, {shown(high)}), but is {shown(self.damping)}.",
        )
        if self.max_kl is not None:
            check_hyperparameter(
                self.max_kl > 0,
                f"`max_kl` must be positive (or None for no constraint), but is "
                f"{shown(self.max_kl)}. Use e.g. 1e-2.",
            )

    # -- the protocol --------------------------------------------------------------

    def _layout(self, params: PyTree[Array]) -> Layout:
        # `params` keeps the model's modules (arrays filtered to the floating-point
        # ones), so the layers are found by type from it.
        return analyse(params, self.approximation)

    def _judge_every(self) -> int:
        # The damping is judged on steps that run the quadratic model (its
        # predicted change is the reduction ratio's denominator).
        return math.lcm(self.damping_every, self.adaptive_every)

    def _statistics_size(self, objective: Objective) -> int:
        wanted = self.statistics_batch
        if isinstance(wanted, int):
            # A number of examples of the whole batch: each device takes its share
            # in a data-parallel step.
            wanted = -(-wanted // num_shards())
        return _sub_batch_size(wanted, batch_size(objective.inputs))

    def _refresh_site(
        self, left: Array, right: Array, damping: Array
    ) -> Eigen | FactoredInverse:
        if self.damping_method == "exact":
            return eigen(left, right, self.eigh_retry)
        return factored_inverse(left, right, damping)

    def init_stats(self, params: PyTree[Array]) -> _KFACStats:
        layout = self._layout(params)
        leaves = jax.tree.leaves(params)
        dtype = factor_dtype(params)
        lefts, rights, eigens = [], [], []
        damping = jnp.asarray(self.damping).astype(promoted_dtype(params))
        for site in layout.sites:
            k, m, n = site.blocks, site.rows, site.columns
            right = (k, n) if site.diagonal_input else (k, n, n)
            lefts.append(jnp.zeros((k, m, m), dtype))
            rights.append(jnp.zeros(right, dtype))
            eigens.append(self._refresh_site(lefts[-1], rights[-1], damping))
        diagonal = tuple(
            jnp.zeros(jnp.shape(leaves[i]), dtype) for i in layout.diagonal_indices
        )
        factors = Factors(tuple(lefts), tuple(rights), diagonal)
        previous = jax.tree.map(jnp.zeros_like, params)
        coefficients = jnp.zeros((3,), damping.dtype)
        return _KFACStats(
            factors, tuple(eigens), damping, damping, previous, coefficients
        )

    def check_loss(self, loss: Callable) -> None:
        if not isinstance(loss, AbstractLoss):
            raise TypeError(
                "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
                "`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()` or a subclass of "
                f"`AbstractLoss`), not {type(loss).__name__}: K-FAC needs its output "
                "Hessian (the quadratic model) and its sampler or square root (the "
                "factors)."
            )

    def needs_key(self) -> bool:
        return self.fisher_type == "mc"

    def uses_params(self) -> bool:
        return False

    def gradient_only_aux(self, grads: PyTree[Array]) -> _KFACAux:
        raise ValueError(
            "`KFAC` has no optax form: its factors come from the layers' inputs and "
            "output gradients, which need the model and the batch, not only the "
            "gradient. Use `step`."
        )

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], _KFACAux]:
        dtype = factor_dtype(params)
        layout = self._layout(params)
        args = (params, objective.static, objective.inputs, objective.model_key, dtype)
        usable = usable_layout(layout, *args)
        if usable.sites != layout.sites:
            missing = [s for s in layout.sites if s not in usable.sites]
            raise ValueError(
                f"The model never calls the layer at "
                f"`model{jax.tree_util.keystr(missing[0].path)}` (it reads its "
                "parameters directly, or does not use it), so K-FAC cannot see its "
                "inputs and output gradients. Call the layer as a module (e.g. "
                "`jax.vmap(layer)(x)` over tokens), or freeze it; "
                "`eqx_curv.KFACOperator` puts such layers on diagonal blocks."
            )
        # The gradient on the whole batch, as any first-order method computes it;
        # the factors (in `direction`) and the quadratic model's products (in
        # `adapt`) on the first `statistics_batch` examples.
        value, grads = jax.value_and_grad(objective.value)(params)
        sub = _sub_objective(objective, self._statistics_size(objective))
        return value, grads, _KFACAux(sub, key, layout)

    def direction(
        self,
        grads: PyTree[Array],
        aux: _KFACAux,
        params: PyTree[Array],
        stats: _KFACStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _KFACStats, dict[str, Array]]:
        layout = aux.layout
        decay = self.factor_decay
        loss = aux.sub.loss
        assert isinstance(loss, AbstractLoss)  # `step` checked it (`check_loss`)

        def average(old: Factors) -> Factors:
            # This batch's factors: one forward pass through the taps on the
            # sub-batch, and one backward pass from the sampled targets ("mc"), the
            # data targets ("empirical") or per column of the loss Hessian's root
            # ("type2"), plus one for the inputs' statistics there.
            sub = aux.sub
            new = estimate_factors(
                layout, params, sub.static, sub.inputs, sub.targets, sub.model_key,
                factor_dtype(params), loss, self.fisher_type, aux.key, 1,
            )  # fmt: skip
            # This device's averages; in a data-parallel step, averaged across.
            new = mean_over_shards(new)
            # Exponential averages with Adam's bias correction (zero-initialised).
            return jax.tree.map(
                lambda o, n: cast_like(decay, n) * o + (1 - cast_like(decay, n)) * n,
                old,
                new,
            )

        every = self.statistics_every
        if every == 1:
            factors = average(stats.factors)
        else:
            # Under `lax.cond`: the steps in between do not run the passes at all.
            factors = jax.lax.cond(
                count % every == 0, average, lambda old: old, stats.factors
            )
        first = jax.tree.leaves(factors)[0]
        averaged = (count // every + 1).astype(first.dtype)  # updates so far
        correction = 1 - cast_like(decay, first) ** averaged
        corrected = jax.tree.map(lambda f: f / correction, factors)

        damping = stats.damping

        def refresh(f: Factors):
            # Shared out over the devices in a data-parallel step (one site each).
            sites = [(a, b, damping) for a, b in zip(f.left, f.right)]
            costs = [
                float(a.size * a.shape[-1] + b.size * b.shape[-1]) for a, b, _ in sites
            ]
            return tuple(spread_calls(self._refresh_site, sites, costs)), damping

        if self.inverse_every == 1:
            preconditioner, refreshed = refresh(corrected)
        else:
            # Amortised: the inverses or eigendecompositions run only on every k-th
            # step.
            # "factored" builds the damping into the inverses, so they are also
            # rebuilt when the Levenberg-Marquardt rule has changed it: a stale
            # damping there destabilised training (digits, one seed in three).
            due = count % self.inverse_every == 0
            if self.damping_method == "factored":
                due = due | (damping != stats.refreshed_damping)
            preconditioner, refreshed = jax.lax.cond(
                due,
                refresh,
                lambda _: (stats.preconditioner, stats.refreshed_damping),
                corrected,
            )
        # "exact" applies the current damping in the eigenbases every step.
        diagonal_damping = damping if self.damping_method == "exact" else refreshed
        dtype = jnp.result_type(first)

        def site_fn(i, x):
            p = preconditioner[i]
            if isinstance(p, FactoredInverse):
                return factored_inverse_mv(p, x)
            values = spectral_values(p, damping, -1, "exact")
            return eigen_mv(p, values, x)

        precondition = blockwise(
            layout,
            grads,
            site_fn,
            lambda j, v: (
                v * diagonal_values(corrected.diagonal[j], diagonal_damping, -1)
            ),
            dtype,
        )
        direction = jax.tree.map(jnp.negative, precondition)
        info = {
            "damping": damping,
            "adapt_damping": count % self._judge_every() == 0,
            "quadratic_model": count % self.adaptive_every == 0,
            # The schedule scales the quadratic model's step (`adapt`).
            "scale": learning_rate.astype(damping.dtype),
        }
        if self.eigh_retry:
            # The factors recomputed in float64 at the last refresh.
            info["eigh_retries"] = sum(
                (p.retries for p in preconditioner if isinstance(p, Eigen)),
                jnp.zeros((), jnp.int32),
            )
        new_stats = _KFACStats(
            factors, preconditioner, refreshed, damping, stats.previous,
            stats.coefficients,
        )  # fmt: skip
        return direction, new_stats, info

    def adapt(
        self,
        objective: Objective,
        params: PyTree[Array],
        proposal: Proposal[_KFACStats],
    ) -> Proposal[_KFACStats]:
        stats, info = proposal.stats, dict(proposal.info)
        loss = objective.loss
        assert isinstance(loss, AbstractLoss)
        dtype = stats.damping.dtype
        damping = stats.damping
        grads, delta = proposal.grads, proposal.updates
        # The last update is kept in float32 (a 16-bit model's steps in its dtype).
        previous = jax.tree.map(lambda p, d: p.astype(d.dtype), stats.previous, delta)
        lr = info.pop("scale")

        def quadratic_model(_):
            # The exact quadratic model on the whole batch (Martens and Grosse 2015,
            # section 7): J delta and J delta_0 by forward mode, one pass for both
            # directions. Not on the statistics' sub-batch: with its curvature there
            # (and its gradient from the whole batch or from the sub-batch alike),
            # the steps blew up on digits (a quarter of a 64-example batch, one seed
            # in three or all three): the sub-batch sees too little of the
            # curvature along the rest's directions.
            tangents = jax.tree.map(lambda a, b: jnp.stack([a, b]), delta, previous)
            outputs, jv = jax.vmap(
                lambda t: jax.jvp(objective.outputs, (params,), (t,)),
                out_axes=(None, 0),
            )(tangents)
            hv = jax.vmap(lambda t: loss.hvp(outputs, t, targets=objective.targets))(jv)

            def inner(a, b):
                return jnp.sum(a.astype(dtype) * b.astype(dtype))

            m11, m12, m22 = sum_over_shards(  # over the devices' examples, if split
                (inner(jv[0], hv[0]), inner(jv[0], hv[1]), inner(jv[1], hv[1]))
            )
            d11, d12 = _dot(delta, delta, dtype), _dot(delta, previous, dtype)
            d22 = _dot(previous, previous, dtype)
            b1, b2 = _dot(grads, delta, dtype), _dot(grads, previous, dtype)
            alpha, mu = _solve_2x2(
                m11 + damping * d11, m12 + damping * d12, m22 + damping * d22, b1, b2
            )
            shrink = jnp.ones((), dtype)
            if self.max_kl is not None:
                # KL(p_old || p_new) ~ 1/2 u.F u on the batch (F = the GGN for
                # eqx_curv's losses): shrink the update to keep it below `max_kl`.
                a, m = lr * alpha, lr * mu
                kl = jnp.maximum(a * a * m11 + 2 * a * m * m12 + m * m * m22, 0) / 2
                bound = cast_like(self.max_kl, damping)
                shrink = _shrink_within(kl, bound)
            # The step's (alpha, mu) as the steps in between compute them, so that
            # they reuse them bitwise; and the K-FAC norm^2 of its alpha Delta part,
            # delta^T (F + lambda) delta = -alpha^2 g^T Delta, free: the steps in
            # between stay within it.
            scaled = lr * shrink * alpha
            coefficients = jnp.stack(
                [shrink * alpha, shrink * mu, -scaled * scaled * b1]
            )
            alpha, mu = lr * coefficients[0], lr * coefficients[1]
            linear = alpha * b1 + mu * b2
            curvature = alpha * alpha * m11 + 2 * alpha * mu * m12 + mu * mu * m22
            predicted = linear + jnp.maximum(curvature, 0) / 2
            return coefficients, coefficients, predicted, shrink

        def reuse(_):
            # The last model step's alpha, scaled to this step's learning rate;
            # no momentum: a reused mu (it ranged over [-1.5, 2] on digits, fitted
            # to one pair of directions) made every run blow up, even every second
            # step. The KL bound with the K-FAC curvature in place of G, free here:
            # delta^T (F + lambda) delta = -alpha^2 g^T Delta.
            alpha = stats.coefficients[0]
            a = lr * alpha
            norm2 = -a * a * _dot(grads, delta, dtype)

            # A trust region from the last model step: no larger a step, in the
            # K-FAC norm, than the one the exact model chose. Without it a batch
            # whose gradient is larger than the model step's (the norm grows with
            # the gradient squared at a fixed alpha) took a step the model would
            # have cut, and runs blew up once the loss was small (digits, 3 seeds).
            shrink = _shrink_within(norm2, stats.coefficients[2])
            if self.max_kl is not None:
                bound = cast_like(self.max_kl, damping)
                shrink = jnp.minimum(shrink, _shrink_within(norm2 / 2, bound))
            used = jnp.stack([shrink * alpha, jnp.zeros((), dtype), norm2])
            return used, stats.coefficients, jnp.full((), jnp.nan, dtype), shrink

        model_step = info.pop("quadratic_model")
        if self.adaptive_every == 1:
            used, coefficients, predicted, shrink = quadratic_model(None)
        else:
            # Under `lax.cond`: the steps in between skip the forward-mode pass.
            used, coefficients, predicted, shrink = jax.lax.cond(
                model_step, quadratic_model, reuse, None
            )
        alpha, mu = lr * used[0], lr * used[1]
        updates = _combine(alpha, delta, mu, previous)

        def judge(updates):
            new_damping, updates, judged = levenberg_marquardt(
                objective,
                params,
                proposal.loss,
                updates,
                predicted,
                damping,
                (20 / 19) ** self._judge_every(),
            )
            return new_damping, updates, judged["reduction_ratio"]

        def keep(updates):
            return damping, updates, jnp.full((), jnp.nan, dtype)

        new_damping, updates, rho = jax.lax.cond(
            info["adapt_damping"], judge, keep, updates
        )
        low, high = self.damping_bounds
        new_damping = jnp.clip(
            new_damping, cast_like(low, damping), cast_like(high, damping)
        )
        info.update(
            alpha=alpha,
            momentum=mu,
            predicted_change=predicted,
            reduction_ratio=rho,
        )
        if self.max_kl is not None:
            info["kl_shrink"] = shrink
        new_stats = _KFACStats(
            stats.factors,
            stats.preconditioner,
            stats.refreshed_damping,
            new_damping,
            jax.tree.map(lambda u, p: u.astype(p.dtype), updates, stats.previous),
            coefficients,
        )
        return Proposal(proposal.loss, grads, updates, new_stats, info)


class KFAC(AbstractKFAC):
    r"""K-FAC: natural-gradient steps preconditioned by Kronecker factors per layer.

    Martens and Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. Each step, on the batch:

    1. **Factors.** The gradient $g$ of the whole batch, as a first-order method
        computes it. On the first `statistics_batch` examples of the batch (a
        quarter by default; Martens and Grosse, section 8, estimate the statistics
        on a subset of the minibatch), one forward pass through the taps and one
        backward pass from sampled targets give, for every registered layer (found
        by Equinox type, see [`eqx_curv.KFACOperator`][] and
        [`eqx_curv.register_kfac_layer`][]), this batch's factors $A$, $B$; every
        other parameter gets a diagonal. They enter exponential averages with decay
        `factor_decay` (Adam's bias correction), accumulated in float32 at least
        (float64 for a float64 model), every `statistics_every` steps (under
        `jax.lax.cond`: the steps in between do not run those passes).
    2. **Preconditioning.** $\Delta = -(\hat F + \lambda)^{-1} g$ blockwise.
        `damping_method="factored"` (default) is the $\pi$-adjusted Tikhonov damping
        $(A + \pi\sqrt\lambda)^{-1} \otimes (B + \sqrt\lambda/\pi)^{-1}$ (section
        6.3), the two inverses computed (by LU) every `inverse_every` steps and
        whenever the damping has changed since, under `jax.lax.cond`: the other steps
        do not pay. `"exact"` is $(A \otimes B + \lambda)^{-1}$, exact in the
        Kronecker eigenbasis: the factors are eigendecomposed every `inverse_every`
        steps and the current damping applied every step (an eigendecomposition
        costs far more than an inverse on a CPU). Diagonal blocks: $g / (d +
        \lambda)$.
    3. **Learning rate and momentum** from the exact quadratic model on the whole
        batch (section 7): with the previous update $\delta_0$ and the batch's GGN $G$
        (one forward-mode pass for $J\Delta$ and $J\delta_0$, the loss's output
        Hessian between), $(\alpha, \mu)$ minimise
        $M(\delta) = g^\top\delta + \frac12 \delta^\top (G + \lambda)\delta$ over
        $\delta = \alpha\Delta + \mu\delta_0$ (a 2x2 solve), and
        $\delta = \eta_t (\alpha\Delta + \mu\delta_0)$ with $\eta_t$ the
        `learning_rate` (a scale, default 1). The model runs on every
        `adaptive_every`-th step (10 by default; under `jax.lax.cond`), like the
        inverses: its forward-mode pass costs about one gradient. The steps in
        between take $\delta = \eta_t \alpha \Delta$ with the last model step's
        $\alpha$ and no momentum, inside a trust region: no larger in the K-FAC
        norm ($\delta^\top (\hat F + \lambda) \delta = -\eta_t^2\alpha^2
        g^\top\Delta$, free) than the model step's $\alpha\Delta$, and under
        the KL bound below with the K-FAC curvature in place of $G$.
    4. **KL constraint.** If $\frac12 \delta^\top G \delta$ (the KL divergence
        between the model's predictive distributions before and after, to second
        order) exceeds `max_kl`, $\delta$ is shrunk to meet it.
    5. **Damping** (Levenberg-Marquardt, section 6.5), every `damping_every` steps:
        the batch loss at $\theta + \delta$ (one more forward pass) gives the
        reduction ratio $\rho$ against $q(\delta) = g^\top\delta + \frac12
        \delta^\top G \delta$; $\lambda \leftarrow \omega\lambda$ where $\rho > 3/4$,
        $\lambda \leftarrow \lambda/\omega$ where $\rho < 1/4$,
        $\omega = (19/20)^k$, kept within `damping_bounds`; $k$ is `damping_every`,
        or its least common multiple with `adaptive_every` (the damping is judged
        on steps that run the model).
        A step that raises the batch loss there is rejected. The lower bound is
        what keeps training stable as the loss nears zero: the curvature vanishes
        there, $\rho$ stays near 1 and the damping keeps falling; a floor of
        $10^{-8}$ lets the steps blow up.

    `info.stats` reports `damping`, `alpha`, `momentum`, `predicted_change`,
    `reduction_ratio` (NaN on steps that do not adapt the damping), `kl_shrink`,
    `adapt_damping` and, with `eigh_retry`, `eigh_retries`.

    Every registered layer of the model must be called as a module (a model that
    reads a layer's weight itself is refused, naming it). Needs an eqx_curv loss;
    needs a `key` for `fisher_type="mc"`.

    **Arguments:**

    - `learning_rate`: $\eta_t$, a scale on the quadratic model's step, or a
        schedule. Default 1.
    - `fisher_type`: how the factors are estimated: `"mc"` (default; targets
        sampled from the model, one backward pass more), `"type2"` (exact, one
        backward pass per output dimension) or `"empirical"` (the data targets, no
        extra pass; not a curvature, see [`eqx_curv.EmpiricalFisherOperator`][]).
    - `approximation`: `"expand"` (default) or `"reduce"`, for layers applied
        several times per example.
    - `factor_decay`: the averages' decay in [0, 1). Default 0.95.
    - `inverse_every`: rebuild the inverses (or eigendecompositions) every this many
        steps. Default 10.
    - `damping`: the initial $\lambda$. Default 1e-2.
    - `damping_bounds`: `(lowest, highest)` for $\lambda$, both positive.
        Default `(1e-4, 1e4)`.
    - `damping_every`: adapt $\lambda$ every this many steps. Default 5.
    - `damping_method`: `"factored"` (default) or `"exact"`.
    - `max_kl`: the KL bound, or `None` for none. Default 0.1.
    - `statistics_batch`: the examples the factors are estimated from: a float in
        (0, 1], the fraction of each batch (rounded, at least one example), or an
        int, a number of examples (at most the batch); the first ones of the batch.
        Default 0.25. The quadratic model always uses the whole batch: with the
        curvature of a part of it, the steps blew up on digits.
    - `statistics_every`: update the factors' averages every this many steps.
        Default 2.
    - `adaptive_every`: run the quadratic model (learning rate, momentum, KL bound,
        damping judgement) every this many steps; the steps in between reuse its
        $\alpha$ within its trust region. Default 10. `adaptive_every=1,
        statistics_every=1` is Martens and Grosse's every-step schedule, about
        1.8 times the default's step time; on digits (3 seeds) the default
        reached a loss of 1e-4 in as few steps (see the K-FAC page). Without the
        trust region, the reused $\alpha$ blew runs up once the loss was small;
        reusing $\mu$ as well blew up.
    - `eigh_retry`: with `damping_method="exact"`, recompute in float64 the
        factors whose float32 eigendecomposition fails (non-finite, or a
        reconstruction residual above $64\sqrt{n}\,\varepsilon$; see
        [`eqx_curv.eigh_with_retry`][]); `info.stats["eigh_retries"]` counts them
        at the last refresh. Steps where nothing fails pay only the check.
        Default `False`.
    """

    learning_rate: LearningRate
    fisher_type: FisherType = eqx.field(static=True)
    approximation: Approximation = eqx.field(static=True)
    factor_decay: RealScalarLike
    inverse_every: int = eqx.field(static=True)
    damping: RealScalarLike
    damping_bounds: tuple[RealScalarLike, RealScalarLike]
    damping_every: int = eqx.field(static=True)
    damping_method: DampingMethod = eqx.field(static=True)
    max_kl: RealScalarLike | None
    statistics_batch: int | float = eqx.field(static=True)
    statistics_every: int = eqx.field(static=True)
    adaptive_every: int = eqx.field(static=True)
    eigh_retry: bool = eqx.field(static=True)

    def __init__(
        self,
        learning_rate: LearningRate = 1.0,
        *,
        fisher_type: FisherType = "mc",
        approximation: Approximation = "expand",
        factor_decay: RealScalarLike = 0.95,
        inverse_every: int = 10,
        damping: RealScalarLike = 1e-2,
        damping_bounds: tuple[RealScalarLike, RealScalarLike] = (1e-4, 1e4),
        damping_every: int = 5,
        damping_method: DampingMethod = "factored",
        max_kl: RealScalarLike | None = 0.1,
        statistics_batch: int | float = 0.25,
        statistics_every: int = 2,
        adaptive_every: int = 10,
        eigh_retry: bool = False,
    ):
        self.learning_rate = learning_rate
        self.fisher_type = fisher_type
        self.approximation = approximation
        self.factor_decay = factor_decay
        self.inverse_every = inverse_every
        self.damping = damping
        self.damping_bounds = tuple(damping_bounds)  # pyright: ignore
        self.damping_every = damping_every
        self.damping_method = damping_method
        self.max_kl = max_kl
        self.statistics_batch = statistics_batch
        self.statistics_every = statistics_every
        self.adaptive_every = adaptive_every
        self.eigh_retry = eigh_retry
