r"""Muon: orthogonalised momentum for hidden matrices, Adam for every other parameter."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PyTree

from .._linalg.newton_schulz import MUON_COEFFICIENTS, newton_schulz
from .._misc import (
    check_hyperparameter,
    check_positive_int,
    checked_hyperparameter,
    RealScalarLike,
    shown,
)
from ._blocking import adam_ratio, apply_grouped, bias_correction, ema
from .base import (
    AbstractGradientOptimizer,
    cast_like,
    is_zero,
    LearningRate,
)


class _MuonStats(eqx.Module):
    momentum: tuple[Array, ...]  # per leaf: Muon's buffer B, or Adam's m
    second: tuple[Array | None, ...]  # Adam's v (None for hidden matrices)


def _is_layer(node) -> bool:
    return isinstance(node, (eqx.nn.Linear, eqx.nn.Conv))


def hidden_matrices(params: PyTree) -> PyTree[bool]:
    """The default rule: which parameters Muon treats as hidden matrices.

    The weights of every `eqx.nn.Linear` (those inside `eqx.nn.MLP`,
    `eqx.nn.MultiheadAttention`, ...) except the output head, taken to be the last
    `eqx.nn.Linear` in the model's PyTree order, and the kernels of every
    `eqx.nn.Conv` (reshaped to `[out, in x kernel]`). Embeddings
    (`eqx.nn.Embedding`), biases, norms and plain arrays are not.

    **Arguments:**

    - `params`: the model's parameters, e.g. `eqx.filter(model, eqx.is_inexact_array)`
        (the module structure is what the rule reads).

    **Returns:**

    A PyTree of bools with the structure of `params`.
    """
    layers = jax.tree.leaves(params, is_leaf=_is_layer)
    linears = [x for x in layers if isinstance(x, eqx.nn.Linear)]
    head = linears[-1] if linears else None

    def mark(node):
        flags = jax.tree.map(lambda _: False, node)
        if _is_layer(node) and node is not head and eqx.is_array(node.weight):
            if node.weight.ndim >= 2:
                flags = eqx.tree_at(lambda n: n.weight, flags, True)
        return flags

    return jax.tree.map(mark, params, is_leaf=_is_layer)


class AbstractMuon(AbstractGradientOptimizer[_MuonStats]):
    """Muon; see [`eqx_curv.Muon`][]."""

    learning_rate: AbstractVar[LearningRate]
    momentum: AbstractVar[RealScalarLike]
    nesterov: AbstractVar[bool]
    ns_steps: AbstractVar[int]
    adam_learning_rate: AbstractVar[LearningRate]
    adam_betas: AbstractVar[tuple[RealScalarLike, RealScalarLike]]
    epsilon: AbstractVar[RealScalarLike]
    weight_decay: AbstractVar[RealScalarLike]
    hidden: AbstractVar[Callable[[PyTree], PyTree[bool]] | None]

    def __check_init__(self):
        check_positive_int(self.ns_steps, "ns_steps", "Newton-Schulz steps")
        mu = self.momentum
        check_hyperparameter(
            (mu >= 0) & (mu < 1),
            f"`momentum` must lie in [0, 1), but is {shown(mu)}. Use e.g. 0.95.",
        )
        lr = self.adam_learning_rate
        if not callable(lr):
            check_hyperparameter(
                lr >= 0,
                f"`adam_learning_rate` must be non-negative, but is {shown(lr)}. Pass "
                "a positive number, or a schedule `count -> learning rate`.",
            )
        if not (isinstance(self.adam_betas, tuple) and len(self.adam_betas) == 2):
            raise ValueError(
                "`adam_betas` must be a pair (beta1, beta2), e.g. (0.9, 0.999), not "
                f"{self.adam_betas!r}."
            )
        for name, b in zip(("beta1", "beta2"), self.adam_betas):
            check_hyperparameter(
                (b >= 0) & (b < 1),
                f"`adam_betas` must lie in [0, 1), but its {name} is {shown(b)}.",
            )
        check_hyperparameter(
            (self.epsilon > 0) & (self.epsilon < jnp.inf),
            f"`epsilon` must be a finite positive number, but is {shown(self.epsilon)}. "
            "Use e.g. 1e-8.",
        )
        check_hyperparameter(
            self.weight_decay >= 0,
            f"`weight_decay` must be non-negative, but is {shown(self.weight_decay)}. "
            "Use 0 for none.",
        )
        if self.hidden is not None and not callable(self.hidden):
            raise TypeError(
                "`hidden` must be None (hidden matrices found by Equinox layer type) "
                "or a callable `params -> PyTree of bools`, not "
                f"{type(self.hidden).__name__}."
            )

    def _mask(self, params: PyTree[Array]) -> list[bool]:
        leaves = jax.tree.leaves(params)
        rule = hidden_matrices if self.hidden is None else self.hidden
        flags = jax.tree.leaves(rule(params))
        if len(flags) != len(leaves) or not all(isinstance(f, bool) for f in flags):
            raise ValueError(
                "`hidden(params)` must return a PyTree of Python bools with the "
                f"structure of the parameters ({len(leaves)} arrays), e.g. "
                "`lambda params: jax.tree.map(lambda x: x.ndim == 2, params)`; it "
                f"returned {len(flags)} leaves."
            )
        for flag, x in zip(flags, leaves):
            if flag and x.ndim < 2:
                raise ValueError(
                    "`hidden(params)` marks an array of shape "
                    f"{x.shape} as a hidden matrix; Muon orthogonalises arrays of at "
                    "least 2 dimensions only. Mark vectors and scalars False."
                )
        return flags

    def init_stats(self, params: PyTree[Array]) -> _MuonStats:
        leaves = jax.tree.leaves(params)
        mask = self._mask(params)
        momentum = tuple(jnp.zeros_like(x) for x in leaves)
        second = tuple(None if h else jnp.zeros_like(x) for h, x in zip(mask, leaves))
        return _MuonStats(momentum, second)

    def uses_params(self) -> bool:
        return not is_zero(self.weight_decay)

    def _adam_schedule(self, count: Int[Array, ""]) -> Array:
        lr = self.adam_learning_rate
        lr = jnp.asarray(lr(count) if callable(lr) else lr)
        if lr.shape != ():
            raise ValueError(
                "The `adam_learning_rate` schedule must return a scalar, but returns "
                f"shape {lr.shape}."
            )
        return checked_hyperparameter(
            lr, lr >= 0, "`adam_learning_rate` must be non-negative."
        )

    def direction(
        self,
        grads: PyTree[Array],
        aux: None,
        params: PyTree[Array],
        stats: _MuonStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _MuonStats, dict[str, Array]]:
        del aux
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        mask = self._mask(grads)
        t = count + 1
        adam_lr = self._adam_schedule(count)
        b1, b2 = self.adam_betas

        momentum = []
        adam_parts: list[tuple[Array, Array] | None] = []
        hidden_items = []
        for h, g, m, v in zip(mask, g_leaves, stats.momentum, stats.second):
            if h:
                buffer = ema(self.momentum, m, g)
                momentum.append(buffer)
                step = ema(self.momentum, buffer, g) if self.nesterov else buffer
                matrix = step.reshape(step.shape[0], -1)
                hidden_items.append(((matrix.shape, matrix.dtype), matrix[None]))
                adam_parts.append(None)
            else:
                assert v is not None
                first = ema(b1, m, g)
                momentum.append(first)
                m_hat = first / bias_correction(b1, t, first.dtype)
                adam_parts.append((m_hat, bias_correction(b2, t, first.dtype)))

        def orthogonalise(key, stacked):
            del key
            return newton_schulz(
                stacked, num_steps=self.ns_steps, coefficients=MUON_COEFFICIENTS
            )

        orthogonal = iter(apply_grouped(orthogonalise, hidden_items))
        second, updates = [], []
        for h, g, v, p, d in zip(mask, g_leaves, stats.second, p_leaves, adam_parts):
            if h:
                o = next(orthogonal)[0]
                rows, cols = o.shape
                # Keller Jordan's scale: orthogonal updates of tall matrices are
                # lengthened so that their RMS per entry does not shrink with the
                # aspect ratio.
                scale = math.sqrt(max(1.0, rows / cols))
                direction = (scale * o).reshape(g.shape)
                lr = cast_like(learning_rate, p)
                second.append(None)
            else:
                assert v is not None and d is not None
                new_v = ema(b2, v, jnp.square(g))
                second.append(new_v)
                m_hat, correction = d
                direction = adam_ratio(m_hat, new_v, correction, self.epsilon)
                lr = cast_like(adam_lr, p)
            if is_zero(self.weight_decay):
                updates.append(-lr * direction)
            else:
                updates.append(-lr * (direction + cast_like(self.weight_decay, p) * p))

        new_stats = _MuonStats(tuple(momentum), tuple(second))
        return jax.tree.unflatten(treedef, updates), new_stats, {}


class Muon(AbstractMuon):
    r"""Muon: momentum orthogonalised by Newton-Schulz, for hidden weight matrices.

    Keller Jordan, Yuchen Jin, Vlado Boza, Jiacheng You, Franz Cesista, Laker
    Newhouse and Jeremy Bernstein, "Muon: an optimizer for hidden layers in neural
    networks", 2024. For a hidden matrix $W \in \mathbb{R}^{m \times n}$ with
    gradient $G_t$, momentum $\mu$ and learning rate $\eta_t$:

    $$B_t = \mu B_{t-1} + (1 - \mu) G_t,\qquad
    S_t = \begin{cases} \mu B_t + (1 - \mu) G_t & \text{Nesterov} \\ B_t \end{cases},$$

    $$W \leftarrow W - \eta_t\Big(\sqrt{\max(1, m / n)}\;
    \mathrm{NS}_5(S_t) + \lambda W\Big),$$

    where $\mathrm{NS}_5$ is five steps of [`eqx_curv.newton_schulz`][] with
    `MUON_COEFFICIENTS`: $S = U \Sigma V^\top \mapsto \approx U V^\top$, every
    singular value pushed into about $[0.68, 1.2]$. The orthogonalised step is the
    steepest descent under the spectral norm (Bernstein and Newhouse, "Old optimizer,
    new norm", 2024): it moves every singular direction of the momentum by about
    the same amount. Matrices of one shape go through one batched call.

    **Which parameters.** By default ([`eqx_curv.hidden_matrices`][]) the weights of
    every `eqx.nn.Linear` except the output head (the last `eqx.nn.Linear` in PyTree
    order) and every `eqx.nn.Conv` kernel (reshaped to `[out, in x kernel]`) are
    hidden matrices; embeddings, biases, norms and the head take Adam with
    `adam_learning_rate` and `adam_betas`,
    $\theta \leftarrow \theta - \eta^{\text{Adam}}_t (\hat m_t / (\sqrt{\hat v_t} +
    \epsilon) + \lambda\theta)$. Pass `hidden`, a callable `params -> PyTree of
    bools`, to choose otherwise.

    It needs only the gradient: `as_optax()` gives the same updates.

    **Arguments:**

    - `learning_rate`: $\eta$ of the hidden matrices, a number or a schedule.
        Default 0.02.
    - `momentum`: $\mu \in [0, 1)$. Default 0.95.
    - `nesterov`: Nesterov's form. Default `True`.
    - `ns_steps`: Newton-Schulz steps. Default 5.
    - `adam_learning_rate`: the learning rate of every other parameter, a number or
        a schedule. Default 3e-3.
    - `adam_betas`: Adam's $(\beta_1, \beta_2)$ for them. Default (0.9, 0.999).
    - `epsilon`: Adam's $\epsilon$. Default 1e-8.
    - `weight_decay`: $\lambda \ge 0$, decoupled, for every parameter. Default 0.
    - `hidden`: `None` (the rule above) or a callable `params -> PyTree of bools`.
    """

    learning_rate: LearningRate
    momentum: RealScalarLike
    nesterov: bool = eqx.field(static=True)
    ns_steps: int = eqx.field(static=True)
    adam_learning_rate: LearningRate
    adam_betas: tuple[RealScalarLike, RealScalarLike]
    epsilon: RealScalarLike
    weight_decay: RealScalarLike
    hidden: Callable[[PyTree], PyTree[bool]] | None = eqx.field(static=True)

    def __init__(
        self,
        learning_rate: LearningRate = 0.02,
        momentum: RealScalarLike = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adam_learning_rate: LearningRate = 3e-3,
        adam_betas: tuple[RealScalarLike, RealScalarLike] = (0.9, 0.999),
        epsilon: RealScalarLike = 1e-8,
        weight_decay: RealScalarLike = 0.0,
        hidden: Callable[[PyTree], PyTree[bool]] | None = None,
    ):
        if not isinstance(nesterov, bool):
            raise TypeError(f"`nesterov` must be True or False, not {nesterov!r}.")
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.ns_steps = ns_steps
        self.adam_learning_rate = adam_learning_rate
        self.adam_betas = adam_betas
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.hidden = hidden
