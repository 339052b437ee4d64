r"""SOAP: Adam in the eigenbasis of Shampoo's statistics, the basis refreshed every k steps."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int, PyTree

from .._linalg.eigh import eigh_failed, retry_failed, to_retry
from .._misc import (
    check_hyperparameter,
    check_positive_int,
    matmul,
    RealScalarLike,
    shown,
)
from ._blocking import (
    adam_ratio,
    apply_grouped,
    bias_correction,
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
from .shampoo import accumulation_dtype


_Factors = tuple[Array | None, ...] | None  # per dimension (None: not rotated)


class _SOAPStats(eqx.Module):
    statistics: tuple[_Factors, ...]  # L_i per leaf, [1, s, s] (None: a vector)
    bases: tuple[_Factors, ...]  # Q_i, eigenvectors of L_i, largest eigenvalue first
    first: tuple[Array, ...]  # M, Adam's first moment, in the rotated space
    second: tuple[Array, ...]  # V, Adam's second moment, in the rotated space


def _layout(x: Array) -> Layout | None:
    if x.ndim < 2:
        return None
    layout = make_layout(x.shape, None, None)  # size-1 dimensions dropped, one block
    return layout if layout.merged else None


def _eigenbasis(matrix: Array) -> Array:
    """Eigenvectors of a symmetric matrix, largest eigenvalue first."""
    _, vectors = jnp.linalg.eigh(matrix)
    return vectors[:, ::-1]


def _checked_eigh(matrix: Array) -> tuple[Array, Array, Array]:
    """`jnp.linalg.eigh` and whether it failed (see `eqx_curv.eigh_with_retry`)."""
    values, vectors = jnp.linalg.eigh(matrix)
    return values, vectors, eigh_failed(matrix, values, vectors)


def _eigenbases_with_retry(matrices: Array) -> tuple[Array, Array]:
    """`_eigenbasis` of a stack, the failed ones recomputed in float64; and which
    were. The decompositions and checks go through `map_matrices`; the retry is
    one `lax.cond` on the whole stack, so that it runs only if some matrix failed
    (under a `vmap` it would run every time)."""
    values, vectors, failed = map_matrices(_checked_eigh, matrices)
    result = retry_failed(matrices, values, vectors, failed, True)
    return result.eigenvectors[..., ::-1], to_retry(matrices, failed, True)


def _power_qr(matrix: Array, basis: Array) -> tuple[Array, Array]:
    """One power-iteration step and a QR, after sorting the columns of `basis` by
    their Rayleigh quotients (largest first); returns the new basis and the sort."""
    product = matmul(matrix, basis)
    estimates = jnp.sum(basis * product, axis=0)
    order = jnp.argsort(-estimates, stable=True)
    q, _ = jnp.linalg.qr(product[:, order])
    return q, order


class AbstractSOAP(AbstractGradientOptimizer[_SOAPStats]):
    """SOAP; see [`eqx_curv.SOAP`][]."""

    learning_rate: AbstractVar[LearningRate]
    momentum: AbstractVar[RealScalarLike]
    decay: AbstractVar[RealScalarLike]
    epsilon: AbstractVar[RealScalarLike]
    weight_decay: AbstractVar[RealScalarLike]
    refresh_every: AbstractVar[int]
    max_precond_dim: AbstractVar[int]
    refresh: AbstractVar[Literal["qr", "eigh"]]
    eigh_retry: AbstractVar[bool]

    def __check_init__(self):
        check_positive_int(self.refresh_every, "refresh_every", "steps between bases")
        check_positive_int(
            self.max_precond_dim,
            "max_precond_dim",
            "the largest dimension that gets a statistic",
        )
        b1, b2 = self.momentum, self.decay
        check_hyperparameter(
            (b1 >= 0) & (b1 < 1),
            f"`momentum` must lie in [0, 1), but is {shown(b1)}. Use e.g. 0.95.",
        )
        check_hyperparameter(
            (b2 > 0) & (b2 < 1),
            f"`decay` must lie in (0, 1), but is {shown(b2)}. Use e.g. 0.95.",
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
        if self.refresh not in ("qr", "eigh"):
            raise ValueError(
                "`refresh` must be 'qr' (one power-iteration step and a QR) or 'eigh' "
                f"(an exact eigendecomposition), not {self.refresh!r}."
            )
        if not isinstance(self.eigh_retry, bool):
            raise TypeError(
                "`eigh_retry` must be a Python bool, not "
                f"{type(self.eigh_retry).__name__}."
            )

    def init_stats(self, params: PyTree[Array]) -> _SOAPStats:
        leaves = jax.tree.leaves(params)
        statistics, bases = [], []
        for x in leaves:
            layout = _layout(x)
            if layout is None:
                statistics.append(None)
                bases.append(None)
                continue
            dtype = accumulation_dtype(x)
            sides = [s if s <= self.max_precond_dim else None for s in layout.block]
            statistics.append(
                tuple(None if s is None else jnp.zeros((1, s, s), dtype) for s in sides)
            )
            bases.append(
                tuple(
                    None if s is None else jnp.eye(s, dtype=dtype)[None] for s in sides
                )
            )
        first = tuple(jnp.zeros(x.shape, accumulation_dtype(x)) for x in leaves)
        second = tuple(jnp.zeros(x.shape, accumulation_dtype(x)) for x in leaves)
        return _SOAPStats(tuple(statistics), tuple(bases), first, second)

    def _refresh(self, statistics, bases, second, first, layouts, first_time):
        """New bases from the statistics; V follows the sort of the columns, M is
        rotated into the new basis. Also the number of eigendecompositions
        recomputed in float64 (`eigh_retry`)."""
        items = [
            ((f.shape[-1], f.dtype), (f, q))
            for stats, qs in zip(statistics, bases)
            if stats is not None and qs is not None
            for f, q in zip(stats, qs)
            if f is not None and q is not None
        ]

        def new_basis(key, stacked):
            del key
            matrices, old = stacked

            no_retries = jnp.zeros(old.shape[:-2], bool)

            def by_eigh():
                # The ranks of the eigenvalues are V's coordinates: kept as they are.
                order = jnp.broadcast_to(jnp.arange(old.shape[-1]), old.shape[:-1])
                if self.eigh_retry:
                    q, retried = _eigenbases_with_retry(matrices)
                    return q, order, retried
                return map_matrices(_eigenbasis, matrices), order, no_retries

            def by_power_qr():
                q, order = map_matrices(lambda mq: _power_qr(*mq), (matrices, old))
                return q, order, no_retries

            if self.refresh == "eigh":
                return by_eigh()
            return jax.lax.cond(first_time, by_eigh, by_power_qr)

        results = apply_grouped(new_basis, items)
        retries = sum(
            (jnp.sum(retried, dtype=jnp.int32) for _, _, retried in results),
            jnp.zeros((), jnp.int32),
        )
        results = iter(results)
        new_bases, new_second, new_first = [], [], []
        for stats, qs, v, m, layout in zip(statistics, bases, second, first, layouts):
            if stats is None or qs is None or layout is None:
                new_bases.append(qs)
                new_second.append(v)
                new_first.append(m)
                continue
            v_blocks = to_blocks(v, layout)
            # M back to parameter space with the old bases (into the new ones below).
            m_blocks = to_blocks(m, layout)
            for axis, q in enumerate(qs):
                if q is not None:
                    m_blocks = mode_product(m_blocks, q, axis)
            factors = []
            for axis, (f, q) in enumerate(zip(stats, qs)):
                if f is None or q is None:
                    factors.append(q)
                    continue
                q, order, _ = next(results)
                m_blocks = mode_product(m_blocks, q, axis, transpose=True)
                # Permute V along this axis as the columns of Q were sorted.
                shape = [1] * v_blocks.ndim
                shape[0], shape[axis + 1] = order.shape
                v_blocks = jnp.take_along_axis(
                    v_blocks, order.reshape(shape), axis=axis + 1
                )
                factors.append(q)
            new_bases.append(tuple(factors))
            new_second.append(from_blocks(v_blocks, layout))
            new_first.append(from_blocks(m_blocks, layout))
        return tuple(new_bases), tuple(new_second), tuple(new_first), retries

    # -- the protocol --------------------------------------------------------------

    def uses_params(self) -> bool:
        return not is_zero(self.weight_decay)

    def direction(
        self,
        grads: PyTree[Array],
        aux: None,
        params: PyTree[Array],
        stats: _SOAPStats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _SOAPStats, dict[str, Array]]:
        del aux
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        layouts = [_layout(g) for g in g_leaves]
        t = count + 1

        statistics = []
        for g, layout, old in zip(g_leaves, layouts, stats.statistics):
            if layout is None or old is None:
                statistics.append(None)
                continue
            blocks = to_blocks(g.astype(accumulation_dtype(g)), layout)
            statistics.append(
                tuple(
                    None if f is None else ema(self.decay, f, mode_gram(blocks, axis))
                    for axis, f in enumerate(old)
                )
            )
        statistics = tuple(statistics)

        # The basis from the statistics that include this gradient: a full eigh at
        # step 0, then every `refresh_every` steps one power step and a QR.
        refresh = count % self.refresh_every == 0
        bases, second, first, retries = jax.lax.cond(
            refresh,
            lambda s, q, v, m: self._refresh(s, q, v, m, layouts, count == 0),
            lambda s, q, v, m: (q, v, m, jnp.zeros((), jnp.int32)),
            statistics,
            stats.bases,
            stats.second,
            stats.first,
        )

        def rotate(x, layout, qs, back):
            blocks = to_blocks(x, layout)
            for axis, q in enumerate(qs):
                if q is not None:
                    blocks = mode_product(blocks, q, axis, transpose=not back)
            return from_blocks(blocks, layout)

        # M and V live in the rotated space: the gradient is the only thing rotated
        # in at every step, and the normalised step the only thing rotated out.
        new_first, new_second, updates = [], [], []
        for g, m, v, p, layout, qs in zip(
            g_leaves, first, second, p_leaves, layouts, bases
        ):
            dtype = v.dtype
            g = g.astype(dtype)
            if layout is not None and qs is not None:
                g = rotate(g, layout, qs, False)
            m = ema(self.momentum, m, g)
            v = ema(self.decay, v, jnp.square(g))
            new_first.append(m)
            new_second.append(v)
            m_hat = m / bias_correction(self.momentum, t, dtype)
            n = adam_ratio(
                m_hat, v, bias_correction(self.decay, t, dtype), self.epsilon
            )
            if layout is not None and qs is not None:
                n = rotate(n, layout, qs, True)
            n = n.astype(p.dtype)
            lr = cast_like(learning_rate, p)
            if is_zero(self.weight_decay):
                updates.append(-lr * n)
            else:
                updates.append(-lr * (n + cast_like(self.weight_decay, p) * p))

        new_stats = _SOAPStats(statistics, bases, tuple(new_first), tuple(new_second))
        info = {"basis_refreshed": refresh}
        if self.eigh_retry:
            info["eigh_retries"] = retries
        return jax.tree.unflatten(treedef, updates), new_stats, info


class SOAP(AbstractSOAP):
    r"""SOAP: Adam run in the eigenbasis of Shampoo's statistics.

    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, "SOAP:
    improving and stabilizing Shampoo using Adam", 2024. For a parameter tensor with
    gradient $G_t$, one statistic per dimension $i$ (as in [`eqx_curv.Shampoo`][]),
    $L_i \leftarrow \beta_2 L_i + (1 - \beta_2) G_{(i)} G_{(i)}^\top$, with
    eigenvectors $Q_i$ (largest eigenvalue first). With $R(X) = X \times_1 Q_1^\top
    \cdots \times_k Q_k^\top$ the rotation into that basis:

    $$M_t = \beta_1 M_{t-1} + (1 - \beta_1) G_t,\qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2) R(G_t)^2,$$

    $$N_t = \frac{R(M_t) / (1 - \beta_1^t)}{\sqrt{V_t / (1 - \beta_2^t)} + \epsilon},
    \qquad \theta_{t+1} = \theta_t - \eta_t \big(R^{-1}(N_t) + \lambda \theta_t\big).$$

    $M$ and $V$ are kept in the rotated space ($R(M_t) = \beta_1 R(M_{t-1}) +
    (1 - \beta_1) R(G_t)$ while the basis stays), so that a step rotates the gradient
    in and the normalised step out, and nothing else; when the basis changes, $M$ is
    rotated back with the old $Q_i$ and into the new ones (exactly the $M$ of the
    formula above). For a matrix, Shampoo's $L^{-1/4} G R^{-1/4}$ is this update with Adam's
    $V$ replaced by the products of the eigenvalues of $L$ and $R$; SOAP keeps an
    Adam second moment per rotated coordinate instead, which tracks the diagonal of
    the rotated Fisher between refreshes of the basis.

    **Refreshing the basis.** Step 0 computes the $Q_i$ by a full `eigh` of the
    statistics (which include that step's gradient); then every `refresh_every`
    steps (under `jax.lax.cond`, so other steps pay nothing) the columns of each
    $Q_i$ are sorted by their Rayleigh quotients $\mathrm{diag}(Q_i^\top L_i Q_i)$,
    largest first, and one power-iteration step and a QR give the new basis,
    $Q_i \leftarrow \mathrm{qr}(L_i Q_i)$. $V$ is carried into the new basis as the
    paper does: its coordinates are permuted with the sort, not rotated. With
    `refresh="eigh"` every refresh is a full eigendecomposition (then $V$ keeps its
    coordinates by eigenvalue rank). All statistics of one size go through one
    batched call.

    **One-sided.** A dimension larger than `max_precond_dim` gets no statistic (it
    is not rotated), so an embedding `(50000, 512)` is preconditioned on its 512
    side only. Size-1 dimensions are dropped; vectors and scalars take Adam.

    It needs only the gradient: `as_optax()` gives the same updates.

    **Arguments:**

    - `learning_rate`: $\eta$, a number or a schedule `count -> rate`. Default 1e-2
        (the paper's language models use 3e-3; rotated coordinates concentrate the
        gradient, so that Adam's normalised step is shorter than in the parameter
        basis while few coordinates carry it).
    - `momentum`: $\beta_1 \in [0, 1)$. Default 0.95.
    - `decay`: $\beta_2 \in (0, 1)$, of $V$ and of the statistics. Default 0.95.
    - `epsilon`: Adam's $\epsilon > 0$. Default 1e-8.
    - `weight_decay`: $\lambda \ge 0$, decoupled. Default 0.
    - `refresh_every`: the steps between refreshes of the basis. Default 10.
    - `max_precond_dim`: the largest dimension that gets a statistic. Default 10000.
    - `refresh`: `"qr"` (default) or `"eigh"`, as above.
    - `eigh_retry`: recompute in float64 the statistics whose float32
        eigendecomposition (step 0's, or every one with `refresh="eigh"`) fails:
        non-finite, or a reconstruction residual above $64\sqrt{n}\,\varepsilon$
        (see [`eqx_curv.eigh_with_retry`][]). `info.stats["eigh_retries"]` counts
        them on each step (0 where the basis was not refreshed by `eigh`). Refreshes
        where nothing fails pay only the check. Default `False`.
    """

    learning_rate: LearningRate
    momentum: RealScalarLike
    decay: RealScalarLike
    epsilon: RealScalarLike
    weight_decay: RealScalarLike
    refresh_every: int = eqx.field(static=True)
    max_precond_dim: int = eqx.field(static=True)
    refresh: Literal["qr", "eigh"] = eqx.field(static=True)
    eigh_retry: bool = eqx.field(static=True)

    def __init__(
        self,
        learning_rate: LearningRate = 1e-2,
        momentum: RealScalarLike = 0.95,
        decay: RealScalarLike = 0.95,
        epsilon: RealScalarLike = 1e-8,
        weight_decay: RealScalarLike = 0.0,
        refresh_every: int = 10,
        max_precond_dim: int = 10000,
        refresh: Literal["qr", "eigh"] = "qr",
        eigh_retry: bool = False,
    ):
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.decay = decay
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.refresh_every = refresh_every
        self.max_precond_dim = max_precond_dim
        self.refresh = refresh
        self.eigh_retry = eigh_retry
