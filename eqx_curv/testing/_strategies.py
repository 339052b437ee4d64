"""hypothesis strategies for curvature code.

Every strategy draws its sizes, dtypes and conditions from small fixed sets and its
values from a drawn integer seed, so that a property compiles once per shape however
many examples it runs, and a failing example is reproduced by its seed.
"""

from collections.abc import Sequence
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import structure_of
from ._models import LOSS_NAMES, MODEL_KINDS, model_problem, ModelProblem


_SEEDS = st.integers(0, 2**32 - 1)


def _check_choices(values: Sequence, name: str) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"`{name}` must hold at least one choice; it is empty.")
    return values


def spd_matrix(
    size: int, condition: float | int, seed: int, *, nullity: int = 0
) -> np.ndarray:
    r"""A float64 symmetric matrix $Q \operatorname{diag}(\lambda) Q^\top$ with a random
    orthogonal $Q$ and eigenvalues log-spaced from $1$ down to $1/\kappa$, exactly
    symmetric.

    **Arguments:**

    - `size`: the number of rows $n$.
    - `condition`: the condition number $\kappa \ge 1$ of the non-zero spectrum.
    - `seed`: the NumPy seed of $Q$.
    - `nullity`: how many of the smallest eigenvalues are set to zero (a positive
        semidefinite matrix of rank $n - $ `nullity`).

    **Returns:**

    The matrix, a float64 NumPy array of shape `(size, size)`.
    """
    if condition < 1:
        raise ValueError(f"`condition` must be at least 1, not {condition}.")
    if not 0 <= nullity < size:
        raise ValueError(
            f"`nullity` must lie in [0, size), but is {nullity} with size {size}."
        )
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    w = np.logspace(0, -np.log10(condition), size)
    if nullity:
        w[size - nullity :] = 0.0
    matrix = (q * w) @ q.T
    # Exactly symmetric (the product is so only up to rounding).
    return 0.5 * (matrix + matrix.T)


def spd_matrices(
    sizes: Sequence[int] = (2, 4, 8),
    conditions: Sequence[float | int] = (1.0, 1e2, 1e4),
    dtypes: Sequence[Any] = (jnp.float64,),
) -> st.SearchStrategy[Array]:
    r"""Symmetric positive definite matrices of chosen sizes, condition numbers and dtypes.

    Eigenvalues are log-spaced in $[1/\kappa, 1]$, eigenvectors a random orthogonal
    matrix (see [`eqx_curv.testing.spd_matrix`][]).

    **Arguments:**

    - `sizes`: the sizes to draw from.
    - `conditions`: the condition numbers $\kappa$ to draw from.
    - `dtypes`: the floating-point dtypes to draw from.

    **Returns:**

    A strategy of JAX arrays.
    """
    sizes = _check_choices(sizes, "sizes")
    conditions = _check_choices(conditions, "conditions")
    dtypes = _check_choices(dtypes, "dtypes")

    @st.composite
    def draw_matrix(draw):
        n = draw(st.sampled_from(sizes))
        cond = draw(st.sampled_from(conditions))
        dtype = draw(st.sampled_from(dtypes))
        return jnp.asarray(spd_matrix(n, cond, draw(_SEEDS)), dtype)

    return draw_matrix()


def psd_matrices(
    sizes: Sequence[int] = (2, 4, 8),
    conditions: Sequence[float | int] = (1.0, 1e2),
    dtypes: Sequence[Any] = (jnp.float64,),
    nullities: Sequence[int] = (1,),
) -> st.SearchStrategy[Array]:
    r"""Singular symmetric positive semidefinite matrices: as
    [`eqx_curv.testing.spd_matrices`][], with the smallest `nullity` eigenvalues zero.

    **Arguments:**

    - `sizes`, `conditions`, `dtypes`: as for `spd_matrices` (`conditions` is that of
        the non-zero eigenvalues).
    - `nullities`: how many eigenvalues are zero, drawn from these (each clipped to
        `size - 1`).

    **Returns:**

    A strategy of JAX arrays.
    """
    sizes = _check_choices(sizes, "sizes")
    conditions = _check_choices(conditions, "conditions")
    dtypes = _check_choices(dtypes, "dtypes")
    nullities = _check_choices(nullities, "nullities")

    @st.composite
    def draw_matrix(draw):
        n = draw(st.sampled_from(sizes))
        cond = draw(st.sampled_from(conditions))
        dtype = draw(st.sampled_from(dtypes))
        nullity = min(draw(st.sampled_from(nullities)), n - 1)
        matrix = spd_matrix(n, cond, draw(_SEEDS), nullity=nullity)
        return jnp.asarray(matrix, dtype)

    return draw_matrix()


def kronecker_factors(
    shapes: Sequence[tuple[int, int]] = ((1, 1), (2, 3), (4, 4)),
    conditions: Sequence[float | int] = (1.0, 1e2),
    dtypes: Sequence[Any] = (jnp.float64,),
) -> st.SearchStrategy[tuple[Array, Array]]:
    r"""Pairs `(A, B)` of symmetric positive definite Kronecker factors.

    `A` is `m x m` and `B` `n x n` for a drawn `(m, n)`: the factors of a curvature
    block on an `m x n` weight matrix, $A \otimes B$.

    **Arguments:**

    - `shapes`: the `(m, n)` pairs to draw from.
    - `conditions`: the condition number of each factor, drawn independently.
    - `dtypes`: the dtypes to draw from (both factors share one).

    **Returns:**

    A strategy of pairs of JAX arrays.
    """
    shapes = _check_choices(shapes, "shapes")
    conditions = _check_choices(conditions, "conditions")
    dtypes = _check_choices(dtypes, "dtypes")

    @st.composite
    def draw_pair(draw):
        m, n = draw(st.sampled_from(shapes))
        dtype = draw(st.sampled_from(dtypes))
        a = spd_matrix(m, draw(st.sampled_from(conditions)), draw(_SEEDS))
        b = spd_matrix(n, draw(st.sampled_from(conditions)), draw(_SEEDS))
        return jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    return draw_pair()


def secant_pairs(
    sizes: Sequence[int] = (2, 3, 5, 8),
    conditions: Sequence[float | int] = (1e1, 1e2),
    dtypes: Sequence[Any] = (jnp.float64,),
) -> st.SearchStrategy[tuple[Array, Array]]:
    r"""Pairs `(s, y)` with $y^\top s > 0$, as a quasi-Newton method collects them.

    $s$ is a standard normal step and $y = M s$ for a drawn symmetric positive
    definite $M$ (the gradient change along $s$ of the quadratic with Hessian $M$),
    so that $y^\top s = s^\top M s > 0$.

    **Arguments:**

    - `sizes`: the lengths to draw from.
    - `conditions`: the condition numbers of $M$ to draw from.
    - `dtypes`: the dtypes to draw from.

    **Returns:**

    A strategy of pairs of 1-D JAX arrays.
    """
    sizes = _check_choices(sizes, "sizes")
    conditions = _check_choices(conditions, "conditions")
    dtypes = _check_choices(dtypes, "dtypes")

    @st.composite
    def draw_pair(draw):
        n = draw(st.sampled_from(sizes))
        dtype = draw(st.sampled_from(dtypes))
        seed = draw(_SEEDS)
        hessian = spd_matrix(n, draw(st.sampled_from(conditions)), seed)
        s = np.random.default_rng(seed + 1).standard_normal(n)
        return jnp.asarray(s, dtype), jnp.asarray(hessian @ s, dtype)

    return draw_pair()


def vectors(
    structure: lx.AbstractLinearOperator | PyTree[jax.ShapeDtypeStruct | Array],
) -> st.SearchStrategy[PyTree[Array]]:
    """Standard-normal vectors in an operator's `in_structure()`.

    **Arguments:**

    - `structure`: a lineax operator (its `in_structure()` is used), or a PyTree of
        `jax.ShapeDtypeStruct`s or arrays giving the shapes and dtypes.

    **Returns:**

    A strategy of PyTrees of JAX arrays of that structure.
    """
    if isinstance(structure, lx.AbstractLinearOperator):
        structure = structure.in_structure()
    structure = structure_of(structure)
    leaves, treedef = jax.tree.flatten(structure)
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                f"`structure` must hold floating-point leaves, but one has dtype "
                f"{leaf.dtype}. Pass `operator.in_structure()` or the parameters, "
                "`eqx.filter(model, eqx.is_inexact_array)`."
            )

    @st.composite
    def draw_vector(draw):
        keys = jax.random.split(jax.random.key(draw(_SEEDS)), max(len(leaves), 1))
        return jax.tree.unflatten(
            treedef,
            [
                jax.random.normal(k, leaf.shape, leaf.dtype)
                for k, leaf in zip(keys, leaves)
            ],
        )

    return draw_vector()


def model_problems(
    kinds: Sequence[str] = MODEL_KINDS,
    losses: Sequence[str] = LOSS_NAMES,
    batch_sizes: Sequence[int] = (4,),
    dtypes: Sequence[Any] = (jnp.float64,),
) -> st.SearchStrategy[ModelProblem]:
    """Small Equinox models (MLP, convolution, attention) with a batch and targets for
    each loss (see [`eqx_curv.testing.model_problem`][]).

    Shapes are fixed per kind: compilation is bounded by the number of (kind, loss,
    batch size, dtype) combinations, and only the weights and data vary with the draw.

    **Arguments:**

    - `kinds`: model kinds to draw from, among `"mlp"`, `"conv"`, `"attention"`.
    - `losses`: losses to draw from, among `"softmax"`, `"mse"`, `"bce"`.
    - `batch_sizes`: batch sizes to draw from.
    - `dtypes`: dtypes to draw from.

    **Returns:**

    A strategy of [`eqx_curv.testing.ModelProblem`][]s.
    """
    kinds = _check_choices(kinds, "kinds")
    losses = _check_choices(losses, "losses")
    batch_sizes = _check_choices(batch_sizes, "batch_sizes")
    dtypes = _check_choices(dtypes, "dtypes")
    for kind in kinds:
        if kind not in MODEL_KINDS:
            raise ValueError(f"`kinds` must be among {MODEL_KINDS}, not {kind!r}.")
    for loss in losses:
        if loss not in LOSS_NAMES:
            raise ValueError(f"`losses` must be among {LOSS_NAMES}, not {loss!r}.")

    @st.composite
    def draw_problem(draw):
        return model_problem(
            draw(st.sampled_from(kinds)),  # pyright: ignore  # checked above
            draw(st.sampled_from(losses)),  # pyright: ignore  # checked above
            jax.random.key(draw(_SEEDS)),
            batch_size=draw(st.sampled_from(batch_sizes)),
            dtype=draw(st.sampled_from(dtypes)),
        )

    return draw_problem()
