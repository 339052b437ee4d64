r"""Shampoo: one Kronecker factor per tensor dimension, roots every k steps, grafting."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PyTree

from .._linalg.roots import inverse_pth_root, ridged_eigh_inverse_pth_root
from .._misc import check_hyperparameter, check_positive_int, RealScalarLike, shown
from ._blocking import (
    adam_ratio,
    apply_grouped,
    bias_correction,
    block_norms,
    ema,
    from_blocks,
    Layout,
    make_layout,
    map_matrices,
    mode_gram,
    mode_product,
    to_blocks,
)
from .base import (
    AbstractGradientOptimizer,
    cast_like,
    is_zero,
    LearningRate,
)


# Adam's epsilon for the grafted diagonal method (added to the root of v).
GRAFT_EPSILON = 1e-8

_Factors = tuple[Array, ...] | None  # one [num_blocks, s, s] array per dimension


class _ShampooStats(eqx.Module):
    statistics: tuple[_Factors, ...]  # L_i per parameter leaf (None: a vector)
    roots: tuple[_Factors, ...]  # L_i^{-1/p}, from the last refresh
    graft: tuple[Array, ...] | None  # v, the grafted method's second moment
    momentum: tuple[Array, ...] | None  # the momentum buffer (None without)
    failures: Int[Array, ""]  # roots that failed so far (the previous one was kept)


def accumulation_dtype(x: Array):
    """Statistics accumulate in float32 at least (also for 16-bit parameters)."""
    dtype = jnp.result_type(x)
    return dtype if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(jnp.float32)


def _layout(x: Array, block_size: int) -> Layout | None:
    """Blocks of a tensor of order >= 2, merged and blocked by `block_size`; `None`
    for vectors and scalars (and tensors whose dimensions are all 1)."""
    if x.ndim < 2:
        return None
    layout = make_layout(x.shape, block_size, block_size)
    return layout if layout.merged else None


class AbstractShampoo(AbstractGradientOptimizer[_ShampooStats]):
    """Shampoo; see [`eqx_curv.Shampoo`][]."""

    learning_rate: AbstractVar[LearningRate]
    block_size: AbstractVar[int]
    root_every: AbstractVar[int]
    start_step: AbstractVar[int]
    root_exponent: AbstractVar[int | None]
    decay: AbstractVar[RealScalarLike]
    epsilon: AbstractVar[RealScalarLike]
    grafting: AbstractVar[Literal["adam", "rmsprop", "sgd", "none"]]
    root_method: AbstractVar[Literal["auto", "eigh", "newton"]]
    momentum: AbstractVar[RealScalarLike]
    nesterov: AbstractVar[bool]
    weight_decay: AbstractVar[RealScalarLike]

    def __check_init__(self):
        check_positive_int(
            self.block_size, "block_size", "the largest side of a statistic's block"
        )
        check_positive_int(self.root_every, "root_every", "steps between roots")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int):
            raise ValueError(
                f"`start_step` must be a non-negative Python int, not "
                f"{self.start_step!r}."
            )
        if self.start_step < 0:
            raise ValueError(
                f"`start_step` must be non-negative, but is {self.start_step}."
            )
        if self.root_exponent is not None:
            check_positive_int(
                self.root_exponent,
                "root_exponent",
                "the p of the inverse p-th roots; None for 2 x the tensor's order",
            )
        decay, mu = self.decay, self.momentum
        check_hyperparameter(
            (decay > 0) & (decay <= 1),
            f"`decay` must lie in (0, 1], but is {shown(decay)}. Use e.g. 0.999 for "
            "exponential averages, or 1 for sums (the AdaGrad form).",
        )
        check_hyperparameter(
            (self.epsilon > 0) & (self.epsilon < jnp.inf),
            f"`epsilon` must be a finite positive number, but is {shown(self.epsilon)}. "
            "It is relative to each statistic's largest eigenvalue: use e.g. 1e-6.",
        )
        check_hyperparameter(
            (mu >= 0) & (mu < 1),
            f"`momentum` must lie in [0, 1), but is {shown(mu)}. Use e.g. 0.9, or 0 "
            "for none.",
        )
        check_hyperparameter(
            self.weight_decay >= 0,
            f"`weight_decay` must be non-negative, but is {shown(self.weight_decay)}. "
            "Use 0 for none.",
        )
        if self.grafting not in ("adam", "rmsprop", "sgd", "none"):
            raise ValueError(
                "`grafting` must be 'adam', 'rmsprop', 'sgd' or 'none', not "
                f"{self.grafting!r}."
            )
        if self.root_method not in ("auto", "eigh", "newton"):
            raise ValueError(
                "`root_method` must be 'auto' (eigh on CPU, Newton elsewhere), "
                f"'eigh' or 'newton', not {self.root_method!r}."
            )

    # -- the statistics ------------------------------------------------------------

    def _root_method(self) -> Literal["eigh", "newton"]:
        if self.root_method == "auto":
            return "eigh" if jax.default_backend() == "cpu" else "newton"
        return self.root_method

    def _p(self, layout: Layout) -> int:
        if self.root_exponent is not None:
            return self.root_exponent
        return 2 * len(layout.merged)

    def init_stats(self, params: PyTree[Array]) -> _ShampooStats:
        leaves = jax.tree.leaves(params)
        statistics, roots = [], []
        for x in leaves:
            layout = _layout(x, self.block_size)
            if layout is None:
                statistics.append(None)
                roots.append(None)
                continue
            dtype = accumulation_dtype(x)
            b = layout.num_blocks
            statistics.append(tuple(jnp.zeros((b, s, s), dtype) for s in layout.block))
            roots.append(
                tuple(
                    jnp.broadcast_to(jnp.eye(s, dtype=dtype), (b, s, s))
                    for s in layout.block
                )
            )
        graft = None
        if self.grafting != "sgd":
            graft = tuple(jnp.zeros(x.shape, accumulation_dtype(x)) for x in leaves)
        momentum = None
        if not is_zero(self.momentum):
            momentum = tuple(jnp.zeros_like(x) for x in leaves)
        return _ShampooStats(
            tuple(statistics), tuple(roots), graft, momentum, jnp.zeros((), jnp.int32)
        )

    def _refresh(
        self,
        statistics: tuple[_Factors, ...],
        roots: tuple[_Factors, ...],
        layouts: list[Layout | None],
        correction: Array,
    ) -> tuple[tuple[_Factors, ...], Int[Array, ""]]:
        """New roots of every statistic, one vmapped call per (size, p, dtype)."""
        items = []
        for stats, layout in zip(statistics, layouts):
            if stats is None or layout is None:
                continue
            p = self._p(layout)
            for factor in stats:
                items.append(((factor.shape[-1], p, factor.dtype), factor))

        def roots_of(key, stacked):
            _, p, dtype = key
            matrices = stacked / correction.astype(dtype)
            epsilon = self.epsilon
            if self._root_method() == "eigh":
                root, valid = map_matrices(
                    lambda m: ridged_eigh_inverse_pth_root(m, p, epsilon), matrices
                )
            else:
                result = map_matrices(
                    lambda m: inverse_pth_root(m, p, ridge_epsilon=epsilon), matrices
                )
                root, valid = result.root, result.valid
            # A zero statistic (a block that never had a gradient) has no root and
            # needs none: it keeps the previous one without counting as a failure.
            seen = jnp.trace(stacked, axis1=-2, axis2=-1) > 0
            return root, valid, seen

        results = iter(apply_grouped(roots_of, items))
        new_roots, failures = [], jnp.zeros((), jnp.int32)
        for stats, old in zip(statistics, roots):
            if stats is None or old is None:
                new_roots.append(None)
                continue
            factors = []
            for previous in old:
                root, valid, seen = next(results)
                keep = ~valid
                failures = failures + jnp.sum(keep & seen, dtype=jnp.int32)
                factors.append(jnp.where(keep[:, None, None], previous, root))
            new_roots.append(tuple(factors))
        return tuple(new_roots), failures

    # -- the protocol --------------------------------------------------------------

    def uses_params(self) -> bool:
        return not is_zero(self.weight_decay)

    def direction(
        self,
        grads: PyTree[Array],
        aux: None,
        params: PyTree[Array],
        stats: _ShampooStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _ShampooStats, dict[str, Array]]:
        del aux
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        layouts = [_layout(g, self.block_size) for g in g_leaves]
        t = count + 1  # the number of gradients in the averages after this step

        # The grafted diagonal method: its direction, and v.
        if stats.graft is None:
            graft = None
            diagonal = list(g_leaves)
        else:
            graft = tuple(
                ema(self.decay, v, jnp.square(g)) for v, g in zip(stats.graft, g_leaves)
            )
            diagonal = []
            for g, v in zip(g_leaves, graft):
                if self.grafting == "rmsprop":
                    correction = jnp.ones((), v.dtype)
                else:
                    correction = bias_correction(self.decay, t, v.dtype)
                diagonal.append(adam_ratio(g, v, correction, GRAFT_EPSILON))

        # The statistics L_i <- beta L_i + (1 - beta) G_(i) G_(i)^T, per block.
        statistics = []
        for g, layout, old in zip(g_leaves, layouts, stats.statistics):
            if layout is None or old is None:
                statistics.append(None)
                continue
            blocks = to_blocks(g.astype(old[0].dtype), layout)
            statistics.append(
                tuple(
                    ema(self.decay, factor, mode_gram(blocks, axis))
                    for axis, factor in enumerate(old)
                )
            )
        statistics = tuple(statistics)

        # Roots at the start step and every `root_every` steps after step 0, under a
        # cond: other steps reuse the stored ones and pay nothing for them.
        start = self.start_step
        refresh = (count >= start) & ((count % self.root_every == 0) | (count == start))
        dtypes = [f[0].dtype for f in statistics if f is not None]
        correction = bias_correction(
            self.decay, t, dtypes[0] if dtypes else jnp.float32
        )
        roots, failures = jax.lax.cond(
            refresh,
            lambda s, r, c: self._refresh(s, r, layouts, c),
            lambda s, r, c: (r, jnp.zeros((), jnp.int32)),
            statistics,
            stats.roots,
            correction,
        )
        preconditioned = count >= start

        directions = []
        for g, d, layout, factors in zip(g_leaves, diagonal, layouts, roots):
            if layout is None or factors is None:
                directions.append(d.astype(g.dtype))
                continue
            blocks = to_blocks(g.astype(factors[0].dtype), layout)
            for axis, root in enumerate(factors):
                blocks = mode_product(blocks, root, axis)
            if self.grafting != "none":
                # Each block takes the grafted method's norm.
                target = block_norms(to_blocks(d.astype(blocks.dtype), layout))
                norm = block_norms(blocks)
                safe = jnp.where(norm > 0, norm, 1)
                scale = jnp.where(norm > 0, target / safe, 0)
                blocks = blocks * scale.reshape((-1,) + (1,) * (blocks.ndim - 1))
            shampoo = from_blocks(blocks, layout).astype(g.dtype)
            if start == 0:  # every step is preconditioned: no select to pay for
                directions.append(shampoo)
            else:
                directions.append(jnp.where(preconditioned, shampoo, d.astype(g.dtype)))

        if stats.momentum is None:
            momentum = None
            steps = directions
        else:
            momentum = tuple(
                ema(self.momentum, m, d) for m, d in zip(stats.momentum, directions)
            )
            if self.nesterov:
                steps = [ema(self.momentum, m, d) for m, d in zip(momentum, directions)]
            else:
                steps = list(momentum)

        def update(d, p):
            lr = cast_like(learning_rate, p)
            if is_zero(self.weight_decay):
                return -lr * d
            return -lr * (d + cast_like(self.weight_decay, p) * p)

        updates = jax.tree.unflatten(
            treedef, [update(d, p) for d, p in zip(steps, p_leaves)]
        )
        new_stats = _ShampooStats(
            statistics, roots, graft, momentum, stats.failures + failures
        )
        info = {"roots_refreshed": refresh, "root_failures": failures}
        return updates, new_stats, info


class Shampoo(AbstractShampoo):
    r"""Shampoo: a Kronecker-factored AdaGrad/Adam, one factor per tensor dimension.

    For a parameter tensor $W$ of order $k$ with gradient $G_t$, Shampoo (Gupta, Koren
    and Singer, "Shampoo: preconditioned stochastic tensor optimization", ICML 2018)
    keeps one statistic per dimension, with $G_{(i)}$ the mode-$i$ unfolding:

    $$L_i \leftarrow \beta L_i + (1 - \beta)\, G_{(i)} G_{(i)}^\top,\qquad
    P_t = G_t \times_1 \bar L_1^{-1/p} \times_2 \cdots \times_k \bar L_k^{-1/p},$$

    with $\bar L_i = L_i / (1 - \beta^t) + \epsilon \lambda_{\max} I$ (bias-corrected,
    ridged relative to its own largest eigenvalue) and $p = 2k$: for a matrix
    $L^{-1/4} G R^{-1/4}$. $\bar L_1^{-1/p} \otimes \cdots \otimes \bar L_k^{-1/p}$
    approximates the inverse square root of the full-matrix AdaGrad statistic
    $\mathbb{E}[g g^\top]$ (the empirical Fisher). $\beta = 1$ gives sums, the
    AdaGrad form of the paper.

    **Amortised roots.** The inverse roots are computed at step `start_step` and at
    every step $t$ that is a multiple of `root_every` after it; step $t$ uses the roots of step
    $\max(\text{start}, k\lfloor t / k\rfloor)$. The computation is under
    `jax.lax.cond`, so the other steps do not pay for it, and all matrices of one
    size go through one `jax.vmap`-ed call. A root that fails (not finite, or a
    statistic that is not positive definite after the ridge) keeps the previous one;
    `info.stats["root_failures"]` counts them per step (the state keeps the total)
    and `info.stats["roots_refreshed"]` says whether this step recomputed them.

    **Root method.** `"newton"`: [`eqx_curv.inverse_pth_root`][] (the coupled
    Newton iteration, right for every $p$, about $10^{-3}$ relative error in float32
    at the ridge's condition number $10^6$, and an eigendecomposition where it does
    not converge). `"eigh"`: one `jnp.linalg.eigh` per statistic, the same relative
    ridge on its eigenvalues (negative ones, rounding of a PSD statistic, count as
    zero), about $10^{-2}$ relative error there: float32 eigenvalues are accurate to
    about $\text{eps}\,\lambda_{\max}$, so the error sits in the directions whose
    eigenvalues are within a few times the ridge, where the ridge (a chosen
    regulariser) already decides the root. On CPU an `eigh` is five to eight times
    cheaper than the Newton steps that a statistic near the ridge's condition number
    needs (15-20 steps of four products); on GPUs the products are cheap and the
    batched `eigh` is not. `"auto"` (default) takes `"eigh"` when JAX's default
    backend is the CPU and `"newton"` otherwise.

    **Blocks.** Size-1 dimensions are dropped and adjacent dimensions merged while
    their product is at most `block_size` (a `(3, 4)` weight is one dimension of 12,
    with one full-matrix statistic); a dimension above `block_size` is cut into
    $b = \lceil d / \text{block\_size}\rceil$ blocks of $\lceil d / b\rceil$, each block
    with statistics of its own (Anil et al., "Scalable second order optimization for
    deep learning", 2020). Vectors and scalars take the grafted diagonal method.

    **Grafting** (Agarwal, Anil, Hazan, Koren and Zhang, "Disentangling adaptive
    gradient methods from learning rates", 2020): each block of $P_t$ is rescaled to
    the Euclidean norm of the same block of the grafted method's direction $D_t$:
    `"adam"`, $D_t = G_t / (\sqrt{v_t / (1 - \beta^t)} + 10^{-8})$ with
    $v_t = \beta v_{t-1} + (1 - \beta) G_t^2$ (Adam without momentum; AdaGrad for
    $\beta = 1$); `"rmsprop"`, the same without the bias correction; `"sgd"`,
    $D_t = G_t$; `"none"` keeps $P_t$ as it is (vectors then take `"adam"`). Before
    `start_step` the step is $D_t$ itself.

    **Momentum and weight decay.** With the direction $d_t$ (grafted $P_t$),
    momentum $\mu$, learning rate $\eta_t$ and weight decay $\lambda$:

    $$m_t = \mu m_{t-1} + (1 - \mu) d_t,\qquad
    \theta_{t+1} = \theta_t - \eta_t \big(\hat d_t + \lambda \theta_t\big),$$

    with $\hat d_t = m_t$, or $\mu m_t + (1 - \mu) d_t$ for Nesterov; the decay is
    decoupled (Loshchilov and Hutter, ICLR 2019).

    It needs only the gradient: `as_optax()` gives the same updates.

    **Arguments:**

    - `learning_rate`: $\eta$, a number or a schedule `count -> rate`. Default 3e-3.
    - `block_size`: the largest side of a statistic. Default 256.
    - `root_every`: $k$, the steps between roots. Default 10.
    - `start_step`: the first step preconditioned (0-based). Default 0.
    - `root_exponent`: $p$ for every statistic, any integer $\ge 1$; `None`
        (default) for $2k$, twice the order of the (merged) tensor.
    - `decay`: $\beta \in (0, 1]$ of the statistics and of the grafted method's
        second moment; 1 for sums. Default 0.999.
    - `epsilon`: the ridge relative to the largest eigenvalue. Default 1e-6.
    - `grafting`: `"adam"` (default), `"rmsprop"`, `"sgd"` or `"none"`.
    - `root_method`: `"auto"` (default), `"eigh"` or `"newton"`, as above.
    - `momentum`: $\mu \in [0, 1)$. Default 0.9.
    - `nesterov`: Nesterov's form of the momentum. Default `False`.
    - `weight_decay`: $\lambda \ge 0$, decoupled. Default 0.
    """

    learning_rate: LearningRate
    block_size: int = eqx.field(static=True)
    root_every: int = eqx.field(static=True)
    start_step: int = eqx.field(static=True)
    root_exponent: int | None = eqx.field(static=True)
    decay: RealScalarLike
    epsilon: RealScalarLike
    grafting: Literal["adam", "rmsprop", "sgd", "none"] = eqx.field(static=True)
    root_method: Literal["auto", "eigh", "newton"] = eqx.field(static=True)
    momentum: RealScalarLike
    nesterov: bool = eqx.field(static=True)
    weight_decay: RealScalarLike

    def __init__(
        self,
        learning_rate: LearningRate = 3e-3,
        block_size: int = 256,
        root_every: int = 10,
        start_step: int = 0,
        root_exponent: int | None = None,
        decay: RealScalarLike = 0.999,
        epsilon: RealScalarLike = 1e-6,
        grafting: Literal["adam", "rmsprop", "sgd", "none"] = "adam",
        momentum: RealScalarLike = 0.9,
        nesterov: bool = False,
        weight_decay: RealScalarLike = 0.0,
        root_method: Literal["auto", "eigh", "newton"] = "auto",
    ):
        if not isinstance(nesterov, bool):
            raise TypeError(f"`nesterov` must be True or False, not {nesterov!r}.")
        self.learning_rate = learning_rate
        self.block_size = block_size
        self.root_every = root_every
        self.start_step = start_step
        self.root_exponent = root_exponent
        self.decay = decay
        self.epsilon = epsilon
        self.grafting = grafting
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.root_method = root_method
