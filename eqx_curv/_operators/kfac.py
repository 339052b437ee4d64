r"""K-FAC: Kronecker-factored curvature for layers found by type, diagonals elsewhere.

For a registered layer whose parameters read as an $m \times n$ matrix $W$ per group
(the bias as a last column, multiplying an input of ones), the curvature block is
$A \otimes B$ with $A$ from the output gradients and $B$ from the inputs (see
`eqx_curv/_layers.py` for how both are captured). Every other floating-point
parameter gets a diagonal block. Factors are estimated from the same backward passes
as the diagonal blocks:

| `fisher_type` | cotangents of the outputs, per example | estimates |
| --- | --- | --- |
| `"type2"` | the columns of the loss Hessian's square root, $S_n$ with $S_n S_n^\top = H_n$ | the GGN (exactly, per block, where the factorisation is exact) |
| `"mc"` | $\nabla_o \ell(o_n, \tilde y)$ at targets sampled from the model | the Fisher (= GGN for eqx_curv's losses) |
| `"empirical"` | $\nabla_o \ell(o_n, y_n)$ at the data targets | the empirical Fisher |

The diagonal blocks are the diagonal of the same matrix: $\frac1N \sum_n \sum_c
(J_n^\top s_{nc})^2$ over the same cotangents $s_{nc}$, from per-example gradients
of those parameters only (the GGN's diagonal for `"type2"`).
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real

from .._layers import (
    analyse,
    Approximation,
    Layout,
    linearise,
    Site,
    Statistics,
    usable_layout,
)
from .._linalg.eigh import eigh_with_retry
from .._losses import AbstractLoss
from .._misc import check_positive_int, HIGHEST
from .base import AbstractCurvatureOperator, check_damping
from .ggn import _batched_model, _check_targets, _per_example_gradients


FisherType = Literal["type2", "mc", "empirical"]
DampingMethod = Literal["exact", "factored"]


def check_fisher_type(fisher_type) -> None:
    if fisher_type not in ("type2", "mc", "empirical"):
        raise ValueError(
            f'`fisher_type` must be "type2" (exact, through the loss Hessian\'s '
            f'square root), "mc" (sampled targets, with a `key`) or "empirical" '
            f"(the data targets), not {fisher_type!r}."
        )


def factor_dtype(params: PyTree[Array]) -> Any:
    """Float32 at least: factors of a bfloat16 model accumulate in float32."""
    wide = any(
        jnp.dtype(jnp.result_type(x)).itemsize > 4 for x in jax.tree.leaves(params)
    )
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


class Factors(eqx.Module):
    """Per site `left` $A$ `[blocks, m, m]` and `right` $B$ (`[blocks, n, n]`, or
    `[blocks, n]` for a diagonal input factor); per diagonal leaf its diagonal."""

    left: tuple[Array, ...]
    right: tuple[Array, ...]
    diagonal: tuple[Array, ...]


def _per_block(site: Site, x: Array, trailing: int) -> Array:
    return x.reshape(site.blocks, *x.shape[x.ndim - trailing :])


def factors_from(
    layout: Layout,
    inputs: Statistics,
    outputs: Statistics,
    batch: int,
    weight: Float[Array, ""] | float,
) -> Factors:
    r"""The factors from a pass's input statistics and the output statistics of
    `S` passes (leading axis), each output-side sum weighted by `weight` (e.g.
    $\frac{1}{NS}$)."""
    lefts, rights = [], []
    for site, inp, out in zip(layout.sites, inputs.probes, outputs.probes):
        count = inp.count
        assert count is not None
        count = jnp.broadcast_to(count[..., None], (*count.shape, site.groups))
        count = count.reshape(site.blocks)
        safe = jnp.where(count > 0, count, 1)
        right_ndim = 1 if site.diagonal_input else 2
        if layout.approximation == "expand":
            assert inp.input_moment is not None and out.output_moment is not None
            right = _per_block(site, inp.input_moment, right_ndim)
            right = right / safe.reshape(-1, *(1,) * right_ndim)
            # The moments are already the totals over the S passes (see
            # `eqx_curv._layers._moment`): one copy per pass.
            left = _per_block(site, out.output_moment[0], 2) * weight
        else:
            assert inp.input_sum is not None and out.output_sum is not None
            means = inp.input_sum.reshape(batch, site.blocks, site.columns)
            rows_per_example = (safe / batch).reshape(1, -1, 1)
            means = means / rows_per_example
            if site.diagonal_input:
                right = jnp.mean(means * means, axis=0)
            else:
                right = jnp.einsum("nki,nkj->kij", means, means, precision=HIGHEST)
                right = right / batch
            sums = out.output_sum.reshape(-1, site.blocks, site.rows)
            left = jnp.einsum("ski,skj->kij", sums, sums, precision=HIGHEST) * weight
        lefts.append(left)
        rights.append(right)
    diagonal = tuple(
        jnp.sum(jnp.square(g), axis=(0, 1)) * weight for g in outputs.diagonal
    )
    return Factors(tuple(lefts), tuple(rights), diagonal)


def output_cotangents(
    loss: AbstractLoss,
    outputs: Array,
    targets: Any,
    fisher_type: FisherType,
    key: PRNGKeyArray | None,
    num_samples: int,
) -> tuple[Array, float]:
    """`[S, *outputs.shape]` cotangents for the output statistics, and their weight
    relative to $\\frac{1}{NS}$ (the positions of a per-token loss, for MC)."""
    if fisher_type == "type2":
        roots = loss.hessian_sqrt(outputs, targets=targets)  # [N, dim, dim]
        columns = jnp.moveaxis(roots, -1, 0)  # [dim, N, dim]
        return columns.reshape(columns.shape[0], *outputs.shape), 1.0
    if fisher_type == "empirical":
        return _per_example_gradients(loss, outputs, targets)[None], 1.0
    assert key is not None
    keys = jax.random.split(key, num_samples)
    sampled = jax.vmap(lambda k: loss.sample(k, outputs))(keys)
    cotangents = jax.vmap(lambda y: _per_example_gradients(loss, outputs, y))(sampled)
    # A loss that is the mean over T positions has E[r r^T] = H / T (see
    # `FisherOperator`): scale the outer products by T.
    return cotangents, float(loss.num_positions(outputs))


def estimate_factors(
    layout: Layout,
    params: PyTree[Array],
    static: PyTree,
    inputs: PyTree[Array],
    targets: Any,
    model_key: PRNGKeyArray | None,
    dtype: Any,
    loss: AbstractLoss,
    fisher_type: FisherType,
    key: PRNGKeyArray | None,
    num_samples: int,
) -> Factors:
    """One batch's factors: one forward pass through the taps and its backward passes
    from the cotangents of `fisher_type` (one pass where there is one cotangent)."""
    outputs, pullback = linearise(layout, params, static, inputs, model_key, dtype)
    cotangents, scale = output_cotangents(
        loss, outputs, targets, fisher_type, key, num_samples
    )
    batch = outputs.shape[0]
    if cotangents.shape[0] == 1:
        # The input statistics do not depend on the cotangent: one pass gives both.
        input_stats = pullback(cotangents[0])
        output_stats = jax.tree.map(lambda x: x[None], input_stats)
    else:
        input_stats = pullback(cotangents[0])
        output_stats = jax.vmap(pullback)(cotangents)
    if fisher_type == "type2":
        weight = 1.0 / batch  # the columns of one square root: a sum, not a mean
    else:
        weight = scale / (batch * cotangents.shape[0])
    return factors_from(layout, input_stats, output_stats, batch, weight)


# Compiled as one program: op by op, every primitive compiles alone.
_estimate = eqx.filter_jit(estimate_factors)


# ---------------------------------------------------------------------------------------
# Products and spectral functions of the blocks.


def site_matrix(site: Site, leaves: list, dtype: Any) -> Array:
    weight = leaves[site.weight_index].astype(dtype)
    bias = None if site.bias_index is None else leaves[site.bias_index].astype(dtype)
    return site.matrix(weight, bias)


def put_site(site: Site, leaves: list, matrix: Array, like: list) -> None:
    weight, bias = site.parameters(matrix)
    leaves[site.weight_index] = weight.astype(like[site.weight_index].dtype)
    if site.bias_index is not None:
        assert bias is not None
        leaves[site.bias_index] = bias.astype(like[site.bias_index].dtype)


def _kron_mv(left: Array, right: Array, x: Array) -> Array:
    y = jnp.matmul(left, x, precision=HIGHEST)
    if right.ndim == 2:  # diagonal input factor
        return y * right[:, None, :]
    return jnp.matmul(y, jnp.swapaxes(right, -1, -2), precision=HIGHEST)


class Eigen(eqx.Module):
    """Eigendecompositions of one site's factors (`right_vectors` None if diagonal)."""

    left_values: Array  # [blocks, m]
    left_vectors: Array  # [blocks, m, m]
    right_values: Array  # [blocks, n]
    right_vectors: Array | None  # [blocks, n, n]
    retries: Array  # int32 scalar: factors recomputed in float64 (`eigh_retry`)


def eigen(left: Array, right: Array, retry: bool = False) -> Eigen:
    """Both factors' eigendecompositions; rounding-negative eigenvalues clipped to 0.

    With `retry`, those whose float32 result fails are recomputed in float64
    ([`eqx_curv.eigh_with_retry`][])."""

    def decompose(factor):
        symmetric = 0.5 * (factor + jnp.swapaxes(factor, -1, -2))
        if not retry:
            w, q = jnp.linalg.eigh(symmetric)
            return w, q, jnp.zeros((), jnp.int32)
        result = eigh_with_retry(symmetric)
        return result.eigenvalues, result.eigenvectors, result.retries

    wa, qa, retries = decompose(left)
    if right.ndim == 2:
        return Eigen(jnp.maximum(wa, 0), qa, jnp.maximum(right, 0), None, retries)
    wb, qb, more = decompose(right)
    return Eigen(jnp.maximum(wa, 0), qa, jnp.maximum(wb, 0), qb, retries + more)


def spectral_values(
    e: Eigen, damping: Array, exponent: int | float, method: DampingMethod
) -> Array:
    r"""`[blocks, m, n]`: $(a_i b_j + \lambda)^q$ (`"exact"`) or the $\pi$-adjusted
    $((a_i + \pi\sqrt\lambda)(b_j + \sqrt\lambda / \pi))^q$ (`"factored"`)."""
    wa, wb = e.left_values, e.right_values
    damping = damping.astype(wa.dtype)
    if method == "exact":
        values = wa[:, :, None] * wb[:, None, :] + damping
    else:
        mean_a = jnp.mean(wa, axis=-1, keepdims=True)
        mean_b = jnp.mean(wb, axis=-1, keepdims=True)
        # pi balances the factors' scales (Martens and Grosse, section 6.3); a zero
        # factor (a layer with no signal yet) falls back to pi = 1.
        ok = (mean_a > 0) & (mean_b > 0)
        pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_b, 1)), 1)
        root = jnp.sqrt(damping)
        values = (wa + pi * root)[:, :, None] * (wb + root / pi)[:, None, :]
    return values**exponent


class FactoredInverse(eqx.Module):
    r"""$(A + \pi\gamma I)^{-1}$ and $(B + \gamma/\pi I)^{-1}$ of one site (the right one
    `[blocks, n]` for a diagonal input factor)."""

    left: Array
    right: Array


def factored_inverse(left: Array, right: Array, damping: Array) -> FactoredInverse:
    r"""The $\pi$-adjusted damped inverses of both factors, $\gamma = \sqrt\lambda$
    (Martens and Grosse, section 6.3): one LU inversion each, far cheaper than an
    eigendecomposition on a CPU."""
    m, n = left.shape[-1], right.shape[-1]
    trace_b = right if right.ndim == 2 else jnp.diagonal(right, axis1=-2, axis2=-1)
    mean_a = jnp.trace(left, axis1=-2, axis2=-1) / m
    mean_b = jnp.sum(trace_b, axis=-1) / n
    ok = (mean_a > 0) & (mean_b > 0)
    pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_b, 1)), 1)
    root = jnp.sqrt(damping.astype(left.dtype))
    eye_m = jnp.eye(m, dtype=left.dtype)[None]
    symmetric = 0.5 * (left + jnp.swapaxes(left, -1, -2))
    left_inverse = jnp.linalg.inv(symmetric + (pi * root)[:, None, None] * eye_m)
    if right.ndim == 2:
        return FactoredInverse(left_inverse, 1 / (right + (root / pi)[:, None]))
    eye_n = jnp.eye(n, dtype=left.dtype)[None]
    symmetric = 0.5 * (right + jnp.swapaxes(right, -1, -2))
    right_inverse = jnp.linalg.inv(symmetric + (root / pi)[:, None, None] * eye_n)
    return FactoredInverse(left_inverse, right_inverse)


def factored_inverse_mv(f: FactoredInverse, x: Array) -> Array:
    return _kron_mv(f.left, f.right, x)


def eigen_mv(e: Eigen, values: Array, x: Array) -> Array:
    """$Q_A ((Q_A^\\top X Q_B) \\odot V) Q_B^\\top$ for every block."""
    qa, qb = e.left_vectors, e.right_vectors
    y = jnp.matmul(jnp.swapaxes(qa, -1, -2), x, precision=HIGHEST)
    if qb is not None:
        y = jnp.matmul(y, qb, precision=HIGHEST)
    y = jnp.matmul(qa, y * values, precision=HIGHEST)
    if qb is not None:
        y = jnp.matmul(y, jnp.swapaxes(qb, -1, -2), precision=HIGHEST)
    return y


def blockwise(
    layout: Layout,
    vector: PyTree[Array],
    site_fn: Callable[[int, Array], Array],
    diagonal_fn: Callable[[int, Array], Array],
    dtype: Any,
) -> PyTree[Array]:
    """Apply `site_fn(i, matrix)` to each site's parameters, `diagonal_fn(j, leaf)`
    to each diagonal leaf; each result in its leaf's dtype."""
    leaves = jax.tree.leaves(vector)
    out = list(leaves)
    for i, site in enumerate(layout.sites):
        put_site(site, out, site_fn(i, site_matrix(site, leaves, dtype)), leaves)
    for j, index in enumerate(layout.diagonal_indices):
        leaf = leaves[index]
        out[index] = diagonal_fn(j, leaf.astype(dtype)).astype(leaf.dtype)
    return jax.tree.unflatten(layout.treedef, out)


def diagonal_values(d: Array, damping: Array, exponent: int | float) -> Array:
    return (d + damping.astype(d.dtype)) ** exponent


# ---------------------------------------------------------------------------------------
# The operators.


class _AbstractKFACBlocks(AbstractCurvatureOperator):
    layout: eqx.AbstractVar[Layout]
    shapes: eqx.AbstractVar[tuple[jax.ShapeDtypeStruct, ...]]

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return jax.tree.unflatten(self.layout.treedef, list(self.shapes))


class KFACOperator(_AbstractKFACBlocks):
    r"""K-FAC: block-diagonal Kronecker factors for layers found by Equinox type.

    For each registered layer ([`eqx_curv.register_kfac_layer`][]; built in:
    `eqx.nn.Linear`, including the projections inside `eqx.nn.MultiheadAttention`,
    `eqx.nn.Conv` of any dimension, stride, padding, dilation and groups, and
    `eqx.nn.Embedding`), the block of its (weight, bias) pair, read as an
    $m \times n$ matrix $[W \mid b]$ per group, is $A \otimes B$ with

    $$A = \frac1N \sum_n \sum_c g_{nc} g_{nc}^\top, \qquad
    B = \frac1N \sum_n a_n a_n^\top,$$

    $a_n$ the layer's input with a 1 appended (the bias column), $g_{nc}$ the gradient
    with respect to its output of the cotangent $c$ of example $n$ (see the table in
    the module docstring; `fisher_type`). A layer applied $R$ times per example
    (tokens, patches, tied weights) uses the `approximation` "expand" or "reduce" of
    Eschenhagen et al., NeurIPS 2023. Every other floating-point parameter
    (normalisation layers, class tokens, layers of unregistered types) gets a
    diagonal block: the diagonal of the same curvature estimate. The operator is
    symmetric positive semidefinite; `in_structure()` is the whole model's
    parameter PyTree, `eqx.filter(model, eqx.is_inexact_array)`.

    For a deep linear network with squared error and `fisher_type="type2"`, each
    block equals the GGN's block exactly (Martens and Grosse, "Optimizing neural
    networks with Kronecker-factored approximate curvature", ICML 2015).

    Damped inverses and powers are blockwise: `damped_power`, `damped_inverse` (e.g.
    a preconditioner for `lineax.CG` on the GGN).

    **Arguments:**

    - `model`: an Equinox module mapping ONE example to outputs.
    - `loss`: an eqx_curv loss.
    - `inputs`: the batch, with a leading batch axis.
    - `targets`: the data targets; needed for `"empirical"` (and where the loss's
        Hessian depends on them).
    - `fisher_type`: `"type2"` (default), `"mc"` or `"empirical"`.
    - `key`: the operator's own randomness, for `"mc"` (required there).
    - `num_samples`: sampled targets per example for `"mc"`. Default 1.
    - `model_key`: for models that take a `key=` (dropout), split per example.
    - `approximation`: `"expand"` (default) or `"reduce"`.
    - `unregistered`: `"diagonal"` (default) puts parameters of unregistered layers
        on diagonal blocks; `"error"` refuses any matrix-shaped parameter outside a
        registered layer (or a normalisation layer), naming its module.
    """

    layout: Layout
    shapes: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    factors: Factors

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        targets: ArrayLike | None = None,
        *,
        fisher_type: FisherType = "type2",
        key: PRNGKeyArray | None = None,
        num_samples: int = 1,
        model_key: PRNGKeyArray | None = None,
        approximation: Approximation = "expand",
        unregistered: Literal["diagonal", "error"] = "diagonal",
    ):
        check_fisher_type(fisher_type)
        if fisher_type == "mc" and key is None:
            raise ValueError(
                '`fisher_type="mc"` samples targets from the model and needs a `key`: '
                'pass `key=jax.random.key(...)`, or use `fisher_type="type2"` for '
                "the exact factors."
            )
        if fisher_type == "empirical" and targets is None:
            raise ValueError(
                '`fisher_type="empirical"` uses the data targets: pass `targets`.'
            )
        check_positive_int(num_samples, "num_samples", "targets drawn per example")
        batched, outputs_shape = _batched_model(
            model, loss, inputs, model_key, None, eqx.is_inexact_array
        )
        if targets is not None:
            targets = _check_targets(loss, outputs_shape, targets)
        elif fisher_type == "type2" and loss.hessian_depends_on_targets:
            raise ValueError(
                f"`targets` are needed: the output Hessian of `{type(loss).__name__}` "
                "depends on them. Pass the batch's targets."
            )
        params = batched.params
        static = batched.rest
        inputs = batched.inputs
        dtype = factor_dtype(params)
        layout = analyse(model, approximation, unregistered)
        layout = usable_layout(layout, params, static, inputs, model_key, dtype)
        self.factors = _estimate(
            layout, params, static, inputs, targets, model_key, dtype, loss,
            fisher_type, key, num_samples,
        )  # fmt: skip
        self.layout = layout
        self.shapes = tuple(
            jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
            for x in jax.tree.leaves(params)
        )

    def _mv(self, vector):
        f = self.factors
        dtype = f.left[0].dtype if f.left else f.diagonal[0].dtype
        return blockwise(
            self.layout,
            vector,
            lambda i, x: _kron_mv(f.left[i], f.right[i], x),
            lambda j, v: f.diagonal[j] * v,
            dtype,
        )

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])

    def damped_power(
        self,
        damping: Real[ArrayLike, ""],
        exponent: int | float,
        *,
        method: DampingMethod = "exact",
    ) -> "KFACSpectralOperator":
        r"""$(K + \lambda I)^q$ block by block.

        - `method="exact"`: each Kronecker block through its factors'
            eigendecompositions, $(Q_A \otimes Q_B)(\Lambda_A \otimes \Lambda_B +
            \lambda)^q (Q_A \otimes Q_B)^\top$.
        - `method="factored"`: the $\pi$-adjusted factored Tikhonov damping,
            $(A + \pi\sqrt\lambda I)^q \otimes (B + \frac{\sqrt\lambda}{\pi} I)^q$
            (Martens and Grosse, ICML 2015, section 6.3).

        Diagonal blocks are $(d + \lambda)^q$ either way.

        **Arguments:**

        - `damping`: $\lambda \ge 0$ (positive for negative powers of a singular
            operator), a scalar; may be traced.
        - `exponent`: $q$, e.g. `-1`.
        - `method`: `"exact"` (default) or `"factored"`.
        """
        if method not in ("exact", "factored"):
            raise ValueError(f'`method` must be "exact" or "factored", not {method!r}.')
        damping = check_damping(damping)
        f = self.factors
        eigens = tuple(eigen(a, b) for a, b in zip(f.left, f.right))
        values = tuple(spectral_values(e, damping, exponent, method) for e in eigens)
        diagonal = tuple(diagonal_values(d, damping, exponent) for d in f.diagonal)
        return KFACSpectralOperator(self.layout, self.shapes, eigens, values, diagonal)

    def damped_inverse(
        self, damping: Real[ArrayLike, ""], *, method: DampingMethod = "exact"
    ) -> "KFACSpectralOperator":
        r"""$(K + \lambda I)^{-1}$ block by block: `damped_power(damping, -1, method=method)`."""
        return self.damped_power(damping, -1, method=method)


class KFACSpectralOperator(_AbstractKFACBlocks):
    r"""A function of a [`eqx_curv.KFACOperator`][]'s blocks, in their eigenbases:
    what `KFACOperator.damped_power` returns. Symmetric positive semidefinite."""

    layout: Layout
    shapes: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    eigens: tuple[Eigen, ...]
    values: tuple[Array, ...]
    diagonal: tuple[Array, ...]

    def __init__(
        self,
        layout: Layout,
        shapes: tuple[jax.ShapeDtypeStruct, ...],
        eigens: tuple[Eigen, ...],
        values: tuple[Array, ...],
        diagonal: tuple[Array, ...],
    ):
        self.layout = layout
        self.shapes = shapes
        self.eigens = eigens
        self.values = values
        self.diagonal = diagonal

    def _mv(self, vector):
        dtype = self.values[0].dtype if self.values else self.diagonal[0].dtype
        return blockwise(
            self.layout,
            vector,
            lambda i, x: eigen_mv(self.eigens[i], self.values[i], x),
            lambda j, v: self.diagonal[j] * v,
            dtype,
        )

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])
