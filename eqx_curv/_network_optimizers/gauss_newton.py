r"""Damped Gauss-Newton and natural-gradient steps, matrix-free, for networks.

One step solves $(C + \lambda I)\, d = -g$ for the curvature $C$ of the mean loss on
the batch (the generalised Gauss-Newton, or a Fisher) and moves along $d$. The batched
model is linearised once per step (`jax.linearize`): the gradient is the transpose of
that linearisation applied to the loss's output gradient, and every curvature product
is its tangent map, the output-space curvature and its transpose, without a second
forward pass.
"""

from collections.abc import Callable
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from equinox import AbstractVar
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from .._linalg.cg import CG
from .._losses import AbstractLoss
from .._misc import (
    check_hyperparameter,
    check_positive_int,
    HIGHEST,
    RealScalarLike,
    shown,
    structure_of,
)
from .._operators.base import linearised
from .._operators.damped import DampedOperator
from .._operators.ggn import (
    _per_example_gradients,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    sample_targets,
)
from .._operators.woodbury import WoodburyOperator
from .base import (
    AbstractNetworkOptimizer,
    cast_like,
    is_zero,
    LearningRate,
    Objective,
    promoted_dtype,
    Proposal,
)
from .fisher_adam import levenberg_marquardt


Fisher = Literal["exact", "mc", "empirical"]
# Which curvature: GaussNewton's GGN, or one of NaturalGradient's Fishers.
CurvatureKind = Literal["ggn", "exact", "mc", "empirical"]
Solver = lx.AbstractLinearSolver | Literal["cg", "woodbury"]
# What is stored: "cg" becomes the default CG solver.
_StoredSolver = lx.AbstractLinearSolver | Literal["woodbury"]

# The default parameter-space solver: a truncated solve, as in Hessian-free
# optimisation (Martens, "Deep learning via Hessian-free optimization", ICML 2010).
DEFAULT_CG_STEPS = 10


def default_solver() -> CG:
    """`solver="cg"`: eqx_curv's CG, at most `DEFAULT_CG_STEPS` steps, rtol 1e-4."""
    return CG(rtol=1e-4, atol=0.0, max_steps=DEFAULT_CG_STEPS)


class _GaussNewtonStats(eqx.Module):
    damping: Float[Array, ""]  # lambda, adapted where `adaptive_damping`
    velocity: PyTree[Array] | None  # the last update applied (None without momentum)
    solution: PyTree[Array] | None  # the last solve's d, CG's start (`warm_start`)


class _Curvature(eqx.Module):
    """The curvature of one step, on the model linearised at the parameters.

    `operator` is $C$, PSD-tagged; `factor` is $V$ with $C = V V^\top$, from a small
    space (examples times outputs, or sampled residuals) to the parameters, for the
    batch-space solver (None otherwise).
    """

    operator: lx.AbstractLinearOperator
    factor: lx.AbstractLinearOperator | None


def _dot(a: PyTree[Array], b: PyTree[Array], dtype) -> Array:
    parts = [
        jnp.vdot(x, y, precision=HIGHEST).astype(dtype)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    return sum(parts[1:], parts[0])


def _scaled(scale: Array, tree: PyTree[Array]) -> PyTree[Array]:
    return jax.tree.map(lambda x: cast_like(scale, x) * x, tree)


def _add(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jax.tree.map(lambda x, y: x + y, a, b)


class AbstractGaussNewton(AbstractNetworkOptimizer[_GaussNewtonStats, _Curvature]):
    """The damped Gauss-Newton / natural-gradient step; see [`eqx_curv.GaussNewton`][]
    and [`eqx_curv.NaturalGradient`][]."""

    learning_rate: AbstractVar[LearningRate]
    damping: AbstractVar[RealScalarLike]
    solver: AbstractVar[_StoredSolver]
    adaptive_damping: AbstractVar[bool]
    damping_factor: AbstractVar[RealScalarLike]
    adaptive_learning_rate: AbstractVar[bool]
    momentum: AbstractVar[RealScalarLike]
    warm_start: AbstractVar[bool]
    fisher: AbstractVar[CurvatureKind]
    num_samples: AbstractVar[int]

    def __check_init__(self):
        check_hyperparameter(
            (self.damping > 0) & (self.damping < jnp.inf),
            f"`damping` must be a finite positive number, but is "
            f"{shown(self.damping)}: the curvature of a network is singular, so an "
            "undamped solve has no unique answer. Use e.g. 1.0 (it adapts by default).",
        )
        check_hyperparameter(
            self.damping_factor > 1,
            f"`damping_factor` must be greater than 1, but is "
            f"{shown(self.damping_factor)}. Use e.g. 1.5.",
        )
        check_hyperparameter(
            (self.momentum >= 0) & (self.momentum < 1),
            f"`momentum` must lie in [0, 1), but is {shown(self.momentum)}. Use e.g. "
            "0.9, or 0 for none.",
        )
        for name in ("adaptive_damping", "adaptive_learning_rate", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"`{name}` must be True or False, not {getattr(self, name)!r}."
                )
        solver = self.solver
        if isinstance(solver, str):
            if solver != "woodbury":
                raise ValueError(
                    f"`solver` must be 'cg' (conjugate gradients in parameter space), "
                    f"'woodbury' (a dense solve in batch space) or a lineax solver "
                    f"such as `eqx_curv.CG(rtol=1e-4, atol=0.0, max_steps=20)`, not "
                    f"{solver!r}."
                )
            if self.warm_start:
                raise ValueError(
                    "`warm_start=True` needs an iterative solver: the batch-space "
                    "solve (`solver='woodbury'`) is direct and has no starting point. "
                    "Pass `warm_start=False`, or `solver='cg'`."
                )
        elif not isinstance(solver, lx.AbstractLinearSolver):
            raise TypeError(
                "`solver` must be 'cg', 'woodbury' or a `lineax.AbstractLinearSolver` "
                f"(e.g. `eqx_curv.CG(...)`), not {type(solver).__name__}."
            )
        check_positive_int(self.num_samples, "num_samples", "labels drawn per example")

    # -- the protocol --------------------------------------------------------------

    def init_stats(self, params: PyTree[Array]) -> _GaussNewtonStats:
        zeros = jax.tree.map(jnp.zeros_like, params)
        velocity = None if is_zero(self.momentum) else zeros
        solution = zeros if self.warm_start else None
        damping = jnp.asarray(self.damping).astype(promoted_dtype(params))
        return _GaussNewtonStats(damping, velocity, solution)

    def check_loss(self, loss: Callable) -> None:
        if not isinstance(loss, AbstractLoss):
            raise TypeError(
                "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
                "`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()` or a subclass of "
                f"`AbstractLoss`), not {type(loss).__name__}: {type(self).__name__} "
                "needs the loss's curvature in output space (its Hessian, square root "
                "or sampler). For any other loss use a first-order optimizer such as "
                "`eqx_curv.SGD`."
            )

    def needs_key(self) -> bool:
        return self.fisher == "mc"

    def uses_params(self) -> bool:
        return False

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], _Curvature]:
        loss = objective.loss
        assert isinstance(loss, AbstractLoss)  # `step` checked it (`check_loss`)
        model = eqx.combine(params, objective.static)
        inputs, targets, model_key = (
            objective.inputs,
            objective.targets,
            objective.model_key,
        )
        if self.fisher == "ggn":
            op = GGNOperator(model, loss, inputs, targets, model_key=model_key)
        elif self.fisher in ("exact", "mc"):
            op = FisherOperator(
                model,
                loss,
                inputs,
                key=key if self.fisher == "mc" else None,
                num_samples=self.num_samples,
                model_key=model_key,
            )
        else:
            op = EmpiricalFisherOperator(
                model, loss, inputs, targets, model_key=model_key
            )
        # The one forward pass of the step; J v and J^T w are its tangent map and the
        # transpose of that map.
        outputs, jvp_fn = jax.linearize(op.batched, params)
        transpose = jax.linear_transpose(jvp_fn, params)
        value, output_grad = jax.value_and_grad(loss)(outputs, targets)
        (grads,) = transpose(output_grad)
        output_map = op._output_map(outputs)

        def product(vector):
            (out,) = transpose(output_map(jvp_fn(vector)))
            return out

        structure = structure_of(params)
        operator = linearised(product, structure, op.tags)
        factor = None
        if isinstance(self.solver, str):  # "woodbury": C = V V^T, V = J^T Phi
            phi, coefficients = self._output_factor(loss, outputs, targets, key)

            def factor_fn(a):
                (out,) = transpose(phi(a))
                return out

            factor = lx.FunctionLinearOperator(factor_fn, coefficients)
        return value, grads, _Curvature(operator, factor)

    def _output_factor(
        self, loss: AbstractLoss, outputs: Array, targets, key: PRNGKeyArray | None
    ) -> tuple[Callable[[Array], Array], jax.ShapeDtypeStruct]:
        r"""$\Phi$ with $M = \Phi \Phi^\top$ in output space, and its input's structure.

        The GGN (and exact Fisher): $\Phi a = S_i a_i / \sqrt N$ per example, $S_i S_i^\top
        = H_i$ (`loss.hessian_sqrt`), on $N \times$ outputs coefficients. The sampled
        and empirical Fisher: $\Phi a = \sqrt{c / (NS)} \sum_s a_{si} r_{si}$ on
        $S \times N$ coefficients, $r_{si}$ the per-example output gradients at the
        sampled (data) labels and $c$ the positions per example, as `FisherOperator`.
        """
        n = outputs.shape[0]
        dtype = outputs.dtype
        if self.fisher in ("ggn", "exact"):
            # The exact Fisher was checked to be the output Hessian (`FisherOperator`).
            roots = loss.hessian_sqrt(outputs, targets=targets)
            scale = 1 / jnp.sqrt(jnp.asarray(n, dtype))

            def phi(a):
                out = jnp.einsum("nij,nj->ni", roots, a, precision=HIGHEST)
                return (out * scale).reshape(outputs.shape)

            return phi, jax.ShapeDtypeStruct(roots.shape[:2], dtype)
        if self.fisher == "mc":
            assert key is not None  # `step` asked for one (`needs_key`)
            sampled = sample_targets(loss, key, self.num_samples, outputs)
            residuals = jax.vmap(lambda y: _per_example_gradients(loss, outputs, y))(
                sampled
            )
            positions = loss.num_positions(outputs)
        else:
            residuals = _per_example_gradients(loss, outputs, targets)[None]
            positions = 1
        samples = residuals.shape[0]
        scale = jnp.sqrt(jnp.asarray(positions / (samples * n), dtype))

        def phi(a):
            a = a.reshape(a.shape + (1,) * (residuals.ndim - 2))
            return jnp.sum(a * residuals, axis=0) * scale

        return phi, jax.ShapeDtypeStruct((samples, n), dtype)

    def _galerkin(self) -> bool:
        """Whether the solve's d is a Galerkin solution (CG from zero, or exact)."""
        return not self.warm_start and isinstance(self.solver, (str, CG, lx.CG))

    def _solve(
        self, curvature: _Curvature, grads: PyTree[Array], stats: _GaussNewtonStats
    ) -> tuple[PyTree[Array], dict[str, Array]]:
        """$d = -(C + \\lambda I)^{-1} g$, and what the solver reports."""
        # The operator acts in the model's dtype (a 16-bit model's too); the
        # gradient and the solution are float32 there (`base.widened`).
        structure = curvature.operator.in_structure()
        rhs = _like(jax.tree.map(jnp.negative, grads), structure)
        damping = stats.damping
        if isinstance(self.solver, str):  # "woodbury"
            assert curvature.factor is not None
            inverse = WoodburyOperator(damping, curvature.factor).inverse()
            return _like(inverse.mv(rhs), grads), {}
        operator = DampedOperator(curvature.operator, damping)
        options = {}
        if stats.solution is not None:
            options = {"y0": _like(stats.solution, structure)}
        solution = lx.linear_solve(
            operator, rhs, self.solver, options=options, throw=False
        )
        info = {"solver_converged": solution.result == lx.RESULTS.successful}
        for name, reported in (
            ("num_steps", "solver_steps"),
            ("residual_norm", "solver_residual"),
        ):
            if name in solution.stats:
                info[reported] = jnp.asarray(solution.stats[name])
        return _like(solution.value, grads), info

    def direction(
        self,
        grads: PyTree[Array],
        aux: _Curvature,
        params: PyTree[Array],
        stats: _GaussNewtonStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _GaussNewtonStats, dict[str, Array]]:
        del params, count
        damping = stats.damping
        dtype = damping.dtype
        d, info = self._solve(aux, grads, stats)
        info["damping"] = damping
        scale = learning_rate.astype(dtype)
        damped_d = None  # d.(C + lambda)d, the damped model's curvature along d
        if self.adaptive_learning_rate or self.adaptive_damping:
            if self._galerkin():
                # d minimises the damped model over a space that holds d (a CG
                # iterate from zero, or the exact solve), so d.(C + lambda)d = -g.d:
                # no product needed (and alpha* = 1).
                damped_d = -_dot(grads, d, dtype)
            else:
                damped_d = _dot(d, _mv(aux.operator, d), dtype)
                damped_d = damped_d + damping * _dot(d, d, dtype)
        if self.adaptive_learning_rate:
            # The minimiser of the damped model along d (Martens and Grosse 2015,
            # section 6.4): alpha = -g.d / d.(C + lambda)d.
            assert damped_d is not None
            positive = damped_d > 0
            alpha = jnp.where(
                positive, -_dot(grads, d, dtype) / jnp.where(positive, damped_d, 1), 1
            )
            info["step_length"] = alpha
            scale = scale * alpha
        updates = _scaled(scale, d)
        if stats.velocity is not None:
            updates = _add(
                updates, _scaled(cast_like(self.momentum, damping), stats.velocity)
            )
        if self.adaptive_damping:
            # The model whose minimiser the step is, as FisherAdam's:
            # q(u) = g.u + 1/2 u.(C + lambda)u / eta; for u = eta alpha d its second
            # term is eta alpha^2 d.(C + lambda)d (no division by a zero eta).
            assert damped_d is not None
            lr = learning_rate.astype(dtype)
            if stats.velocity is None:
                curvature = scale * scale * damped_d / jnp.where(lr > 0, lr, 1)
            else:
                damped_u = _dot(updates, _mv(aux.operator, updates), dtype)
                damped_u = damped_u + damping * _dot(updates, updates, dtype)
                # With momentum and eta = 0 the model is a wall: no decrease
                # predicted, and the rule keeps the damping.
                curvature = jnp.where(
                    lr > 0, damped_u / jnp.where(lr > 0, lr, 1), jnp.inf
                )
            predicted = _dot(grads, updates, dtype) + curvature / 2
            info["predicted_change"] = predicted
        solution = None if stats.solution is None else d
        new_stats = _GaussNewtonStats(
            damping, updates if stats.velocity is not None else None, solution
        )
        return updates, new_stats, info

    def adapt(
        self,
        objective: Objective,
        params: PyTree[Array],
        proposal: Proposal[_GaussNewtonStats],
    ) -> Proposal[_GaussNewtonStats]:
        if not self.adaptive_damping:
            return proposal
        stats, info = proposal.stats, dict(proposal.info)
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
        # Momentum carries the update applied: none after a rejected step.
        velocity = None if stats.velocity is None else updates
        new_stats = _GaussNewtonStats(new_damping, velocity, stats.solution)
        return Proposal(proposal.loss, proposal.grads, updates, new_stats, info)

    def gradient_only_aux(self, grads: PyTree[Array]) -> _Curvature:
        del grads
        raise ValueError(
            f"`{type(self).__name__}` has no optax form: it solves against the "
            "curvature of the model on the batch, which needs the model, not only the "
            "gradient. Use `step`."
        )


def _like(tree: PyTree[Array], like: PyTree) -> PyTree[Array]:
    """`tree` in the dtypes of `like`'s leaves (arrays or `jax.ShapeDtypeStruct`s)."""
    return jax.tree.map(lambda x, s: x.astype(s.dtype), tree, like)


def _mv(operator: lx.AbstractLinearOperator, v: PyTree[Array]) -> PyTree[Array]:
    """`operator.mv(v)` in the operator's dtype, returned in `v`'s."""
    return _like(operator.mv(_like(v, operator.in_structure())), v)


def _solver(solver: Solver) -> _StoredSolver:
    if isinstance(solver, str) and solver == "cg":
        return default_solver()
    return solver


class GaussNewton(AbstractGaussNewton):
    r"""Damped (Levenberg-Marquardt) Gauss-Newton, matrix-free.

    $C = G = \frac1N \sum_i J_i^\top H_i J_i$ is the generalised Gauss-Newton matrix of
    the MEAN loss on the batch ($J_i$ the Jacobian of the model's outputs on example
    $i$, $H_i$ the loss's Hessian in output space; Schraudolph, "Fast curvature
    matrix-vector products for second-order gradient descent", Neural Computation
    14(7), 2002). For the eqx_curv losses it is also the exact Fisher, so this is
    the natural gradient too (see [`eqx_curv.NaturalGradient`][]).

    With the mini-batch gradient $g$, the damping $\lambda$ and the learning rate
    $\eta$ (from the schedule), one step solves

    $$(C + \lambda I)\, d = -g,$$

    and updates $\theta \leftarrow \theta + u$ with $u = \eta\, \alpha\, d + \mu\,
    u_\text{prev}$, where $\alpha = 1$, or the minimiser of the damped quadratic
    model along $d$, $\alpha^* = -g^\top d / d^\top (C + \lambda I) d$ (with
    `adaptive_learning_rate`, as K-FAC does: Martens and Grosse, "Optimizing neural
    networks with Kronecker-factored approximate curvature", ICML 2015, section 6.4),
    and $\mu\, u_\text{prev}$ is heavy-ball momentum on the last update applied.

    **The solve.** The batched model is linearised once per step (`jax.linearize`):
    the gradient is the transpose of that linearisation, and each product $G v$ is
    its tangent map (a forward-mode pass), the loss's Hessian in output space, and
    its transpose (a reverse-mode pass), without another forward pass.

    - `solver="cg"` (default): conjugate gradients in parameter space,
        `eqx_curv.CG(rtol=1e-4, atol=0.0, max_steps=10)`: a truncated solve of at
        most 10 products with $G$ (Martens, "Deep learning via Hessian-free
        optimization", ICML 2010). Any lineax solver for positive semidefinite
        operators may be passed instead, e.g. `eqx_curv.CG(rtol=1e-6, atol=0.0,
        max_steps=50)`; it solves against `DampedOperator(G, lambda)`.
    - `solver="woodbury"`: exactly, in batch space. With $G = V V^\top$, $V =
        J^\top \Phi$ and $\Phi = \mathrm{blockdiag}(H_i^{1/2}) / \sqrt N$ (the
        $1/\sqrt N$ of the mean loss), the Woodbury identity
        ([`eqx_curv.WoodburyOperator`][]) turns the solve into a dense one of
        size $k = N \times$ outputs: $(\lambda I + V V^\top)^{-1} g = (g - V(\lambda
        I + V^\top V)^{-1} V^\top g) / \lambda$. Forming $V^\top V$ takes $k$
        products with $J^\top$ and $J$, batched by `jax.vmap` (memory $k$ times the
        parameter count while it runs); the Jacobian itself is never formed. Exact,
        and cheaper than CG when $k$ is below a few tens (small batches, few
        outputs) or on accelerators where the batched products run in parallel.

    **Damping.** $\lambda > 0$ keeps the solve well posed ($G$ of a network is
    singular). By default it adapts by the Levenberg-Marquardt rule (Moré, "The
    Levenberg-Marquardt algorithm: implementation and theory", 1978): after each step
    the loss on the same batch (and dropout masks) is evaluated at the new
    parameters, and the reduction ratio $\rho$ of the actual change to the change
    $q(u) = g^\top u + \frac{1}{2\eta} u^\top (G + \lambda I) u$ predicted by the
    damped quadratic model whose minimiser the step is (without momentum) sets
    $\lambda \leftarrow \lambda / c$ where $\rho > 3/4$ and $\lambda \leftarrow c
    \lambda$ where $\rho < 1/4$; a step that raises the batch loss is rejected. The
    same rule as [`eqx_curv.FisherAdam`][]'s. It costs one forward pass per step,
    and one product with $G$ where $d^\top (G + \lambda I) d$ is not known already:
    a CG iterate from zero and the exact batch-space solve minimise the model over a
    space holding $d$, so there $d^\top (G + \lambda I) d = -g^\top d$ (for the same
    reason $\alpha^* = 1$ there); warm starts, other solvers and momentum pay it.

    `info.stats` reports `damping` (this step's $\lambda$), `solver_steps`,
    `solver_residual` and `solver_converged` (parameter-space solvers that report
    them), `step_length` ($\alpha^*$, with `adaptive_learning_rate`), and with
    adaptive damping `predicted_change` ($q(u)$), `reduction_ratio` and `accepted`.

    **Arguments:**

    - `learning_rate`: $\eta$, a non-negative number or a schedule `count -> rate`.
        Default 1 (the full Gauss-Newton step; the damping sets its length).
    - `damping`: the (initial) $\lambda > 0$. Default 1.
    - `solver`: `"cg"` (default), `"woodbury"` or a lineax solver, as above.
    - `adaptive_damping`: adapt $\lambda$ by the reduction ratio. Default `True`.
    - `damping_factor`: $c > 1$ of the adaptation. Default 1.5.
    - `adaptive_learning_rate`: scale the step by $\alpha^*$. Default `False`. It is
        1 for a CG solve from zero and for `"woodbury"`; it matters with `warm_start`
        or a solver that is not conjugate gradients (one more product with $G$).
    - `momentum`: $\mu \in [0, 1)$. Default 0 (no buffer kept).
    - `warm_start`: start each CG solve from the previous step's $d$ (Martens
        2010), instead of zero. Default `False`.
    """

    learning_rate: LearningRate
    damping: RealScalarLike
    solver: _StoredSolver
    adaptive_damping: bool = eqx.field(static=True)
    damping_factor: RealScalarLike
    adaptive_learning_rate: bool = eqx.field(static=True)
    momentum: RealScalarLike
    warm_start: bool = eqx.field(static=True)
    # A ClassVar may implement an `eqx.AbstractVar` (Equinox allows it; pyright does not know).
    fisher: ClassVar[CurvatureKind] = "ggn"  # pyright: ignore[reportIncompatibleVariableOverride]
    num_samples: ClassVar[int] = 1  # pyright: ignore[reportIncompatibleVariableOverride]

    def __init__(
        self,
        learning_rate: LearningRate = 1.0,
        damping: RealScalarLike = 1.0,
        solver: Solver = "cg",
        adaptive_damping: bool = True,
        damping_factor: RealScalarLike = 1.5,
        adaptive_learning_rate: bool = False,
        momentum: RealScalarLike = 0.0,
        warm_start: bool = False,
    ):
        self.learning_rate = learning_rate
        self.damping = damping
        self.solver = _solver(solver)
        self.adaptive_damping = adaptive_damping
        self.damping_factor = damping_factor
        self.adaptive_learning_rate = adaptive_learning_rate
        self.momentum = momentum
        self.warm_start = warm_start


class NaturalGradient(AbstractGaussNewton):
    r"""The natural gradient: the damped step with the Fisher, matrix-free.

    $C = F$, the Fisher information of the model's predictive distribution on the
    batch (Amari, "Natural gradient works efficiently in learning", Neural
    Computation 10(2), 1998; Martens, "New insights and perspectives on the natural
    gradient method", JMLR 21(146), 2020), in one of three forms:

    - `fisher="exact"`: the expectation in closed form. For the eqx_curv losses
        (canonical links) it is the output Hessian, so $F = G$ and the step is
        [`eqx_curv.GaussNewton`][]'s.
    - `fisher="mc"`: labels drawn from the model, `num_samples` per example
        ([`eqx_curv.FisherOperator`][] with a key); an unbiased estimate of $F$ of
        rank at most `N * num_samples`. Needs a `key`.
    - `fisher="empirical"`: the data labels, $\frac1N \sum_i g_i g_i^\top$ with
        per-example gradients ([`eqx_curv.EmpiricalFisherOperator`][]). Not a
        curvature of the loss in general (Kunstner, Balles and Hennig, "Limitations
        of the empirical Fisher approximation for natural gradient descent", NeurIPS
        2019); rank at most $N$.

    With the mini-batch gradient $g$, the damping $\lambda$ and the learning rate
    $\eta$ (from the schedule), one step solves

    $$(C + \lambda I)\, d = -g,$$

    and updates $\theta \leftarrow \theta + u$ with $u = \eta\, \alpha\, d + \mu\,
    u_\text{prev}$, where $\alpha = 1$, or the minimiser of the damped quadratic
    model along $d$, $\alpha^* = -g^\top d / d^\top (C + \lambda I) d$ (with
    `adaptive_learning_rate`, as K-FAC does: Martens and Grosse, "Optimizing neural
    networks with Kronecker-factored approximate curvature", ICML 2015, section 6.4),
    and $\mu\, u_\text{prev}$ is heavy-ball momentum on the last update applied.

    The solve, the damping and `info.stats` are those of [`eqx_curv.GaussNewton`][].
    With `solver="woodbury"` the batch space has $k = N \times$ outputs dimensions for
    the exact Fisher, $N \times$ `num_samples` for the sampled one and $N$ for the
    empirical one. Needs an eqx_curv loss.

    **Arguments:**

    - `learning_rate`: $\eta$, as in [`eqx_curv.GaussNewton`][]. Default 1.
    - `fisher`: `"exact"` (default), `"mc"` or `"empirical"`, as above.
    - `num_samples`: labels drawn per example for `fisher="mc"`. Default 1.
    - `damping`, `solver`, `adaptive_damping`, `damping_factor`,
        `adaptive_learning_rate`, `momentum`, `warm_start`: as in
        [`eqx_curv.GaussNewton`][], with the same defaults.
    """

    learning_rate: LearningRate
    damping: RealScalarLike
    solver: _StoredSolver
    adaptive_damping: bool = eqx.field(static=True)
    damping_factor: RealScalarLike
    adaptive_learning_rate: bool = eqx.field(static=True)
    momentum: RealScalarLike
    warm_start: bool = eqx.field(static=True)
    fisher: CurvatureKind = eqx.field(static=True)
    num_samples: int = eqx.field(static=True)

    def __init__(
        self,
        learning_rate: LearningRate = 1.0,
        fisher: Fisher = "exact",
        num_samples: int = 1,
        damping: RealScalarLike = 1.0,
        solver: Solver = "cg",
        adaptive_damping: bool = True,
        damping_factor: RealScalarLike = 1.5,
        adaptive_learning_rate: bool = False,
        momentum: RealScalarLike = 0.0,
        warm_start: bool = False,
    ):
        if fisher not in ("exact", "mc", "empirical"):
            raise ValueError(
                "`fisher` must be 'exact' (the Gauss-Newton matrix), 'mc' (labels "
                "sampled from the model) or 'empirical' (the data labels), not "
                f"{fisher!r}."
            )
        self.learning_rate = learning_rate
        self.fisher = fisher
        self.num_samples = num_samples
        self.damping = damping
        self.solver = _solver(solver)
        self.adaptive_damping = adaptive_damping
        self.damping_factor = damping_factor
        self.adaptive_learning_rate = adaptive_learning_rate
        self.momentum = momentum
        self.warm_start = warm_start
