r"""Tensor dimensions as Kronecker factors: merging, blocking, mode products, grouping.

Shared by [`eqx_curv.Shampoo`][] and [`eqx_curv.SOAP`][], which keep one statistic
$L_i = G_{(i)} G_{(i)}^\top$ per dimension $i$ of a parameter tensor $G$ ($G_{(i)}$ its
mode-$i$ unfolding: dimension $i$ as rows, all others as columns).

- **Merging.** Size-1 dimensions are dropped, and adjacent dimensions are merged while
    their product stays at most a limit: a `(3, 4)` weight becomes one dimension of
    12 (one full-matrix statistic), a `(64, 3, 3, 3)` kernel `(64, 27)`.
- **Blocking.** A merged dimension $d$ above the block size $s$ is cut into
    $b = \lceil d / s\rceil$ blocks of $\lceil d / b\rceil$ (the last one shorter, padded
    with zeros). Padding is exact: padded rows of $G$ are zero, so they add nothing to
    the statistics and their preconditioned entries are zero.
- **Grouping.** Matrices of the same size, from every block, dimension and parameter,
    go through one `jax.vmap`-ed call (a root, an eigendecomposition).
"""

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import HIGHEST
from .._sharding.context import spread_map


class Layout(NamedTuple):
    """How one parameter tensor is cut into blocks (static, from its shape)."""

    shape: tuple[int, ...]  # the parameter's own shape
    merged: tuple[int, ...]  # after dropping size-1 dimensions and merging small ones
    grid: tuple[int, ...]  # the number of blocks along each merged dimension
    block: tuple[int, ...]  # one block's shape

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)


def merge_dims(shape: Sequence[int], limit: int) -> tuple[int, ...]:
    """Drop size-1 dimensions; merge adjacent ones while their product is <= `limit`."""
    merged: list[int] = []
    for d in shape:
        if d == 1:
            continue
        if merged and merged[-1] * d <= limit:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged)


def make_layout(
    shape: Sequence[int], block_size: int | None, merge_limit: int | None
) -> Layout:
    """The layout of a tensor of `shape`: merged up to `merge_limit` (no merging but
    dropping size-1 dimensions for `None`), blocked by `block_size` (`None`: one block)."""
    merged = merge_dims(shape, 1 if merge_limit is None else merge_limit)
    if block_size is None:
        grid = (1,) * len(merged)
    else:
        grid = tuple(-(-d // block_size) for d in merged)
    block = tuple(-(-d // b) for d, b in zip(merged, grid))
    return Layout(tuple(shape), merged, grid, block)


def to_blocks(x: Array, layout: Layout) -> Array:
    """`x` of `layout.shape` as blocks, `[num_blocks, *layout.block]`."""
    k = len(layout.merged)
    x = x.reshape(layout.merged)
    padding = [
        (0, b * s - d) for d, b, s in zip(layout.merged, layout.grid, layout.block)
    ]
    if any(after for _, after in padding):
        x = jnp.pad(x, padding)
    x = x.reshape([n for pair in zip(layout.grid, layout.block) for n in pair])
    x = x.transpose([*range(0, 2 * k, 2), *range(1, 2 * k, 2)])
    return x.reshape((layout.num_blocks, *layout.block))


def from_blocks(blocks: Array, layout: Layout) -> Array:
    """The inverse of `to_blocks`: `[num_blocks, *block]` back to `layout.shape`."""
    k = len(layout.merged)
    x = blocks.reshape((*layout.grid, *layout.block))
    x = x.transpose([i for j in range(k) for i in (j, k + j)])
    x = x.reshape([b * s for b, s in zip(layout.grid, layout.block)])
    x = x[tuple(slice(0, d) for d in layout.merged)]
    return x.reshape(layout.shape)


def mode_gram(blocks: Array, axis: int) -> Array:
    r"""$G_{(i)} G_{(i)}^\top$ for every block: `[num_blocks, s_i, s_i]` for `axis` $= i$."""
    x = jnp.moveaxis(blocks, axis + 1, 1)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return jnp.einsum("bij,bkj->bik", x, x, precision=HIGHEST)


def mode_product(
    blocks: Array, matrices: Array, axis: int, *, transpose: bool = False
) -> Array:
    r"""Multiply every block along `axis` by its matrix: $G \times_i M$ (or $M^\top$).

    `blocks` is `[num_blocks, *block]` and `matrices` `[num_blocks, s_i, s_i]`; entry
    $(\ldots, a, \ldots)$ of the result is $\sum_c M_{ac} G_{\ldots c \ldots}$.
    """
    x = jnp.moveaxis(blocks, axis + 1, -1)
    spec = "b...c,bca->b...a" if transpose else "b...c,bac->b...a"
    y = jnp.einsum(spec, x, matrices.astype(x.dtype), precision=HIGHEST)
    return jnp.moveaxis(y, -1, axis + 1)


def block_norms(blocks: Array) -> Array:
    """The Euclidean norm of each block, `[num_blocks]`."""
    return jnp.sqrt(jnp.sum(jnp.square(blocks), axis=tuple(range(1, blocks.ndim))))


def map_matrices(fn: Callable, matrices: Any):
    """`fn` on each of a stack of matrices (leading axis), in one call.

    On accelerators one `jax.vmap`-ed call. On CPU a `jax.lax.map` (one compiled
    loop over the stack): XLA:CPU runs batched products of small matrices far slower
    than one at a time (40 inverse 4th roots of 128 x 128: 2.2 s vmapped, 0.2 s
    mapped), and under `vmap` the eigendecomposition fallback of
    `eqx_curv.inverse_pth_root` runs for every matrix (its `lax.cond` becomes a
    select), where mapped it runs only for the roots that need it.

    The same holds for the eigendecomposition roots of `eqx_curv.Shampoo`'s CPU
    path: vmapped inside a `lax.cond`, eight roots each of sides 10, 128 and 256
    by `eigh` never returned from their first execution (jax 0.10.1); mapped
    they took 30 ms.

    In a data-parallel step ([`eqx_curv.data_parallel`][]) the stack is shared out
    over the devices of the data axis and the results gathered.
    """
    return spread_map(fn, matrices, _map_here)


def _map_here(fn: Callable, matrices: Any):
    if jax.default_backend() == "cpu":
        return jax.lax.map(fn, matrices)
    return jax.vmap(fn)(matrices)


def apply_grouped(
    fn: Callable[[Hashable, Any], Any], items: Sequence[tuple[Hashable, Any]]
) -> list[Any]:
    """`fn(key, stacked)` once per distinct `key`, on the items of that key stacked.

    Each item is `(key, tree)`: a PyTree of arrays with a common leading axis; trees
    with equal keys must agree in structure and past the leading axis, and are
    concatenated along it. `fn` returns a PyTree whose leaves have the stacked
    leading axis; the result lists, for every item, its own slice of that.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, (key, _) in enumerate(items):
        groups.setdefault(key, []).append(index)
    results: list[Any] = [None] * len(items)
    for key, indices in groups.items():
        trees = [items[i][1] for i in indices]
        if len(trees) == 1:
            stacked = trees[0]
        else:
            stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)
        out = fn(key, stacked)
        start = 0
        for i, tree in zip(indices, trees):
            part = slice(start, start + jax.tree.leaves(tree)[0].shape[0])
            results[i] = jax.tree.map(lambda leaf, part=part: leaf[part], out)
            start = part.stop
    return results


# -- moments shared by Shampoo, SOAP and Muon -------------------------------------------


def ema(decay: Any, average: Array, new: Array) -> Array:
    r"""$\beta a + (1 - \beta) x$ for a decay $\beta < 1$; the sum $a + x$ for $\beta = 1$
    (the AdaGrad form)."""
    decay = jnp.asarray(decay).astype(average.dtype)
    weight = jnp.where(decay == 1, jnp.ones_like(decay), 1 - decay)
    return decay * average + weight * new.astype(average.dtype)


def bias_correction(decay: Any, t: Array, dtype: Any) -> Array:
    r"""$1 - \beta^t$ of an exponential average after $t \ge 1$ terms; 1 for sums."""
    decay = jnp.asarray(decay).astype(dtype)
    correction = 1 - decay ** t.astype(dtype)
    return jnp.where(decay == 1, jnp.ones_like(correction), correction)


def adam_ratio(first: Array, second: Array, correction: Array, epsilon: Any) -> Array:
    r"""$m / (\sqrt{v / c} + \epsilon)$: Adam's normalised step for a corrected $v$."""
    dtype = first.dtype
    root = jnp.sqrt(second.astype(dtype) / correction.astype(dtype))
    return first / (root + jnp.asarray(epsilon).astype(dtype))
