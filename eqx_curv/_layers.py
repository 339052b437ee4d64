r"""Which parameters K-FAC factors, and how it sees each layer's inputs and gradients.

**Layers by type.** A layer is found by its Equinox type, never by tracing the model:
the registry maps a module class to an [`eqx_curv.AbstractKFACRule`][], which says
where the layer's weight and bias are, how they read as one matrix per group, and how
a call's input and output-gradient become rows of that matrix product. Built in:
`eqx.nn.Linear` (so also the four projections inside `eqx.nn.MultiheadAttention`),
`eqx.nn.Conv` (1-, 2- and 3-D, any stride, padding, dilation and groups) and
`eqx.nn.Embedding` (a diagonal input factor). `register_kfac_layer` adds a type.

**Capture.** Each registered layer of the model is replaced, through `eqx.tree_at`, by
a tapping wrapper that calls the layer and passes its output through a
`jax.custom_vjp` identity, the *tap*. The tap also takes zero-valued *probe* arrays.
Its backward pass returns the output cotangent unchanged, and hands out as the
probes' cotangents the statistics K-FAC needs: $\sum_r a_r a_r^\top$ of the call's
input rows (the input, or a convolution's patches), $\sum_r g_r g_r^\top$ of its
output-gradient rows, their plain sums $\sum_r a_r$, $\sum_r g_r$, and the number of
rows. Cotangents of an argument used several times add up, so a layer that is
vmapped over tokens, applied to several patches or called twice (weight tying) sums
its statistics over every application, and an unbatched probe sums them over the
batch too. This works wherever JAX's autodiff does: under `jax.jit`, the library's
`jax.vmap` over examples, a model's own `jax.vmap` over tokens, and `jax.lax.scan`
over stacked blocks (the probes are stacked like the blocks' weights and sliced by
the scan). The model's outputs and gradients are unchanged.

**Several applications per example.** With $R$ applications of a layer in one
example (inputs $a_{r}$, output gradients $g_{r}$), `"expand"` treats them as $R$
more examples, $B = \frac{1}{NR}\sum_{n,r} a_{nr} a_{nr}^\top$,
$A = \frac1N\sum_{n,r} g_{nr} g_{nr}^\top$; `"reduce"` first sums them,
$B = \frac1N\sum_n \bar a_n \bar a_n^\top$ with $\bar a_n = \frac1R\sum_r a_{nr}$,
$A = \frac1N\sum_n \bar g_n \bar g_n^\top$ with $\bar g_n = \sum_r g_{nr}$
(Eschenhagen, Immer, Turner, Schneider and Hennig, "Kronecker-factored approximate
curvature for modern neural network architectures", NeurIPS 2023). Both are exact
for $R = 1$; expand is exact for a deep linear network applied to each token
separately, reduce when the tokens are pooled right after the layer.
"""

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._misc import HIGHEST
from ._operators.ggn import apply_batched
from ._sharding.context import per_shard


Approximation = Literal["expand", "reduce"]


class AbstractKFACRule(eqx.Module):
    r"""How K-FAC reads one type of layer: a Kronecker factor pair per group.

    A layer computes, for each of its $R$ *rows* per call (one for a dense layer, one
    per output position for a convolution) and each of its $G$ groups, $y = W x$ with
    $W$ an $m \times n$ matrix. A rule says where the parameters are and how the call's
    input and output gradient become those rows. Subclass it and register it with
    [`eqx_curv.register_kfac_layer`][] to have K-FAC factor a layer type of your own:

    ```python
    class Scale(eqx.Module):  # y = weight @ x, with a weight of shape (out, in)
        weight: jax.Array

        def __call__(self, x):
            return self.weight @ x


    class ScaleRule(eqx_curv.AbstractKFACRule):
        def parameter_names(self, layer):
            return "weight", None  # no bias

        def weight_ndim(self, layer):
            return 2

        def to_matrix(self, layer, weight, bias):
            return weight[None]  # one group: (1, out, in)

        def from_matrix(self, layer, matrix):
            return matrix[0], None

        def input_rows(self, layer, x):
            return x.reshape(1, 1, -1)  # one row, one group

        def output_rows(self, layer, cotangent):
            return cotangent.reshape(1, 1, -1)


    eqx_curv.register_kfac_layer(Scale, ScaleRule())
    ```

    The methods see `layer` with its arrays replaced by `None` where they run inside
    the backward pass (`input_rows`, `output_rows`): read only static fields there.
    The layer's first positional argument is its input; it is called as the model
    calls it (further arguments are passed through).
    """

    @abc.abstractmethod
    def parameter_names(self, layer: Any) -> tuple[str, str | None]:
        """The attribute names of the weight and of the bias (`None`: no bias)."""

    @abc.abstractmethod
    def weight_ndim(self, layer: Any) -> int:
        """The number of axes of the weight of one (not stacked) layer."""

    @abc.abstractmethod
    def to_matrix(
        self, layer: Any, weight: Array, bias: Array | None
    ) -> Float[Array, "groups m n"]:
        """The weight (and bias, as a last column) as one matrix per group."""

    @abc.abstractmethod
    def from_matrix(
        self, layer: Any, matrix: Float[Array, "groups m n"]
    ) -> tuple[Array, Array | None]:
        """The inverse of `to_matrix`: `(weight, bias)` in the layer's shapes."""

    @abc.abstractmethod
    def input_rows(self, layer: Any, x: Array) -> Float[Array, "rows groups n"]:
        """The call's input as rows $a_r$ (without the bias's column of ones)."""

    @abc.abstractmethod
    def output_rows(
        self, layer: Any, cotangent: Array
    ) -> Float[Array, "rows groups m"]:
        """The gradient with respect to the call's output as rows $g_r$."""

    # Whether the input factor is kept diagonal (one-hot inputs: embeddings). A
    # class attribute, so that a rule sets it without overriding a method.
    diagonal_input: ClassVar[bool] = False


def _with_bias(matrix: Array, bias: Array | None) -> Array:
    if bias is None:
        return matrix
    return jnp.concatenate([matrix, bias.reshape(*matrix.shape[:2], 1)], axis=-1)


def _split_bias(matrix: Array, has_bias: bool) -> tuple[Array, Array | None]:
    if has_bias:
        return matrix[..., :-1], matrix[..., -1]
    return matrix, None


class LinearRule(AbstractKFACRule):
    """`eqx.nn.Linear`: $y = Wx + b$, one row per call, one group."""

    def parameter_names(self, layer):
        return "weight", "bias"

    def weight_ndim(self, layer):
        return 2

    def to_matrix(self, layer, weight, bias):
        return _with_bias(weight[None], None if bias is None else bias[None])

    def from_matrix(self, layer, matrix):
        weight, bias = _split_bias(matrix[0], layer.use_bias)
        return weight, None if bias is None else bias.reshape(-1)

    def input_rows(self, layer, x):
        return jnp.reshape(x, (1, 1, -1))

    def output_rows(self, layer, cotangent):
        return jnp.reshape(cotangent, (1, 1, -1))


class ConvRule(AbstractKFACRule):
    r"""`eqx.nn.Conv` (any dimension): one row per output position, one factor pair
    per group. The input rows are the patches a filter sees (channels-major, as the
    weight `(out, in / groups, *kernel)` is laid out); with $G$ groups, group $k$'s
    output channels see only its input channels, so its block is its own
    $A_k \otimes B_k$."""

    def parameter_names(self, layer):
        return "weight", "bias"

    def weight_ndim(self, layer):
        return 2 + layer.num_spatial_dims

    def to_matrix(self, layer, weight, bias):
        g = layer.groups
        matrix = weight.reshape(g, weight.shape[0] // g, -1)
        return _with_bias(matrix, None if bias is None else bias.reshape(g, -1))

    def from_matrix(self, layer, matrix):
        weight, bias = _split_bias(matrix, layer.use_bias)
        kernel = tuple(layer.kernel_size)
        in_per_group = layer.in_channels // layer.groups
        weight = weight.reshape(layer.out_channels, in_per_group, *kernel)
        if bias is not None:
            bias = bias.reshape(layer.out_channels, *(1,) * layer.num_spatial_dims)
        return weight, bias

    def input_rows(self, layer, x):
        padding = layer.padding
        if layer.padding_mode != "ZEROS":
            x = layer._nonzero_pad(x)  # the layer's own padding, then a VALID conv
            padding = "VALID"
        patches = jax.lax.conv_general_dilated_patches(
            x[None],
            filter_shape=tuple(layer.kernel_size),
            window_strides=tuple(layer.stride),
            padding=padding,
            rhs_dilation=tuple(layer.dilation),
            precision=HIGHEST,
        )[0]  # [in * prod(kernel), *out_spatial], channel-major features
        rows = patches.reshape(patches.shape[0], -1).T
        return rows.reshape(rows.shape[0], layer.groups, -1)

    def output_rows(self, layer, cotangent):
        rows = cotangent.reshape(cotangent.shape[0], -1).T
        return rows.reshape(rows.shape[0], layer.groups, -1)


class EmbeddingRule(AbstractKFACRule):
    r"""`eqx.nn.Embedding`: $y = W^\top e_x$ for the one-hot $e_x$, so the matrix is
    $W^\top$ (`embedding_size x num_embeddings`) and the input factor
    $\mathbb{E}[e_x e_x^\top]$ is diagonal: the frequency of each index."""

    def parameter_names(self, layer):
        return "weight", None

    def weight_ndim(self, layer):
        return 2

    def to_matrix(self, layer, weight, bias):
        return weight.T[None]

    def from_matrix(self, layer, matrix):
        return matrix[0].T, None

    def input_rows(self, layer, x):
        one_hot = jax.nn.one_hot(x, layer.num_embeddings, dtype=jnp.float32)
        return one_hot.reshape(1, 1, -1)

    def output_rows(self, layer, cotangent):
        return jnp.reshape(cotangent, (1, 1, -1))

    diagonal_input: ClassVar[bool] = True


_RULES: dict[type, AbstractKFACRule] = {
    eqx.nn.Linear: LinearRule(),
    eqx.nn.Conv: ConvRule(),
    eqx.nn.Embedding: EmbeddingRule(),
}

# Modules whose parameters act elementwise: never an "unregistered layer".
_ELEMENTWISE = (
    eqx.nn.LayerNorm,
    eqx.nn.GroupNorm,
    eqx.nn.RMSNorm,
    eqx.nn.BatchNorm,
    eqx.nn.PReLU,
)


def register_kfac_layer(layer_type: type, rule: AbstractKFACRule) -> None:
    """Have K-FAC factor every layer of type `layer_type` (and its subclasses) by `rule`.

    **Arguments:**

    - `layer_type`: an `eqx.Module` subclass.
    - `rule`: an [`eqx_curv.AbstractKFACRule`][] instance for it. Registering a type
        again replaces its rule.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, eqx.Module)):
        raise TypeError(
            f"`layer_type` must be an Equinox module class, not {layer_type!r}."
        )
    if not isinstance(rule, AbstractKFACRule):
        raise TypeError(
            "`rule` must be an instance of a subclass of `eqx_curv.AbstractKFACRule`, "
            f"not {type(rule).__name__}."
        )
    _RULES[layer_type] = rule


def rule_for(layer: Any) -> AbstractKFACRule | None:
    """The rule registered for `layer`'s type or its nearest registered base class."""
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


# ---------------------------------------------------------------------------------------
# Where the layers are: a static description of the model.


class Site(eqx.Module):
    """One registered layer of a model, found at `path` (static)."""

    path: tuple = eqx.field(static=True)
    rule: AbstractKFACRule = eqx.field(static=True)
    skeleton: Any = eqx.field(static=True)  # the layer with its arrays set to None
    weight_index: int = eqx.field(static=True)  # into the parameter leaves
    bias_index: int | None = eqx.field(static=True)
    stack_shape: tuple[int, ...] = eqx.field(static=True)  # lax.scan-stacked layers
    groups: int = eqx.field(static=True)
    rows: int = eqx.field(static=True)  # m
    columns: int = eqx.field(static=True)  # n, the bias column included

    @property
    def blocks(self) -> int:
        """Independent Kronecker blocks: stacked layers times groups."""
        return int(np.prod(self.stack_shape, dtype=int)) * self.groups

    @property
    def diagonal_input(self) -> bool:
        return self.rule.diagonal_input

    def matrix(self, weight: Array, bias: Array | None) -> Array:
        """The parameters as `[blocks, m, n]`."""
        fn = lambda w, b: self.rule.to_matrix(self.skeleton, w, b)  # noqa: E731
        for _ in self.stack_shape:
            fn = jax.vmap(fn)
        return fn(weight, bias).reshape(self.blocks, self.rows, self.columns)

    def parameters(self, matrix: Array) -> tuple[Array, Array | None]:
        """The inverse of `matrix`."""
        fn = lambda x: self.rule.from_matrix(self.skeleton, x)  # noqa: E731
        for _ in self.stack_shape:
            fn = jax.vmap(fn)
        shape = (*self.stack_shape, self.groups, self.rows, self.columns)
        return fn(matrix.reshape(shape))


class Layout(eqx.Module):
    """The registered layers of a model and the parameter leaves left to diagonals."""

    sites: tuple[Site, ...] = eqx.field(static=True)
    diagonal_indices: tuple[int, ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)  # of the parameters (None where not inexact)
    approximation: Approximation = eqx.field(static=True)


def _is_registered(x: Any) -> bool:
    return isinstance(x, eqx.Module) and rule_for(x) is not None


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    raise ValueError(f"Cannot follow the path entry {key!r}.")


def get_at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = _child(tree, key)
    return tree


def _owner_name(model: Any, path: tuple) -> tuple[str, Any]:
    """The module path of a parameter leaf (its parent), and the parent."""
    parent = get_at(model, path[:-1])
    return "model" + jax.tree_util.keystr(path[:-1]), parent


def analyse(
    model: PyTree,
    approximation: Approximation = "expand",
    unregistered: Literal["diagonal", "error"] = "diagonal",
) -> Layout:
    """Find the registered layers of `model` and the parameters left to diagonals."""
    if approximation not in ("expand", "reduce"):
        raise ValueError(
            f'`approximation` must be "expand" or "reduce", not {approximation!r}.'
        )
    if unregistered not in ("diagonal", "error"):
        raise ValueError(
            f'`unregistered` must be "diagonal" or "error", not {unregistered!r}.'
        )
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {path: i for i, (path, _) in enumerate(leaves_with_path)}
    sites = []
    claimed = set()
    found = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_registered)[0]
    for path, layer in found:
        if not _is_registered(layer):
            continue
        rule = rule_for(layer)
        assert rule is not None
        weight_name, bias_name = rule.parameter_names(layer)
        weight_path = (*path, jax.tree_util.GetAttrKey(weight_name))
        if weight_path not in index:  # frozen or non-float weight: not a parameter
            continue
        bias = None if bias_name is None else getattr(layer, bias_name)
        bias_path = None
        if bias is not None:
            bias_path = (*path, jax.tree_util.GetAttrKey(bias_name))
            if bias_path not in index:
                bias_path = None
        weight = getattr(layer, weight_name)
        ndim = rule.weight_ndim(layer)
        stack_shape = tuple(weight.shape[: weight.ndim - ndim])
        skeleton = eqx.filter(layer, eqx.is_array, inverse=True)
        one = jax.eval_shape(
            functools.partial(rule.to_matrix, layer),
            jax.ShapeDtypeStruct(weight.shape[len(stack_shape) :], weight.dtype),
            None
            if bias is None
            else jax.ShapeDtypeStruct(bias.shape[len(stack_shape) :], bias.dtype),
        )
        groups, rows, columns = one.shape
        sites.append(
            Site(
                path=path,
                rule=rule,
                skeleton=skeleton,
                weight_index=index[weight_path],
                bias_index=None if bias_path is None else index[bias_path],
                stack_shape=stack_shape,
                groups=groups,
                rows=rows,
                columns=columns,
            )
        )
        claimed.add(index[weight_path])
        if bias_path is not None:
            claimed.add(index[bias_path])
    diagonal = []
    for i, (path, leaf) in enumerate(leaves_with_path):
        if i in claimed:
            continue
        if unregistered == "error" and jnp.ndim(leaf) >= 2:
            name, owner = _owner_name(model, path)
            if not isinstance(owner, _ELEMENTWISE):
                raise ValueError(
                    f"The module at `{name}` ({type(owner).__name__}) holds the "
                    f"parameter `{jax.tree_util.keystr(path[-1:])}` of shape "
                    f"{jnp.shape(leaf)}, but its type is not registered for K-FAC, "
                    "and `unregistered='error'` refuses to put it on a diagonal "
                    "block. Register its type with `eqx_curv.register_kfac_layer`, "
                    "or pass `unregistered='diagonal'`."
                )
        diagonal.append(i)
    return Layout(tuple(sites), tuple(diagonal), treedef, approximation)


# ---------------------------------------------------------------------------------------
# The tap.


class Probes(eqx.Module):
    """Zero arrays whose cotangents are a layer's statistics (None where not needed)."""

    input_moment: Array | None  # sum_r a a^T: [G, n, n] ([G, n] for a diagonal input)
    output_moment: Array | None  # sum_r g g^T: [G, m, m]
    input_sum: Array | None  # sum_r a: [G, n], one per example
    output_sum: Array | None  # sum_r g: [G, m], one per example
    count: Array | None  # the number of rows


def _zero_cotangent(x: Array) -> Any:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


# The second moments of a call's rows, summed over every vmap they run under.
#
# A probe's cotangent is summed over a vmap it is not batched along (the model's own
# vmap over tokens, the vmap over examples). Left to JAX, each vmapped call would
# compute its own [n, n] product and the sum would come after, materialising a
# [batch, n, n] array (hundreds of times slower than one product over all rows, on a
# transformer). The vmap rule below instead folds the vmapped axis into the rows and
# returns the SUM as an unbatched value: JAX passes an unbatched cotangent of an
# unbatched probe through as the total, so the result is the same sum, computed as
# one matrix product. Every caller sums these moments over all the vmaps anyway; a
# vmap over cotangents (several samples) therefore also receives the total over its
# samples, broadcast along its axis (`factors_from` reads one copy).


@jax.custom_batching.custom_vmap
def _moment(rows: Array) -> Array:
    return jnp.einsum("rgi,rgj->gij", rows, rows, precision=HIGHEST)


@_moment.def_vmap
def _(axis_size, in_batched, rows):
    del axis_size
    if in_batched[0]:
        rows = rows.reshape(-1, *rows.shape[2:])
    return _moment(rows), False


@jax.custom_batching.custom_vmap
def _square_sum(rows: Array) -> Array:
    return jnp.sum(rows * rows, axis=0)


@_square_sum.def_vmap
def _(axis_size, in_batched, rows):
    del axis_size
    if in_batched[0]:
        rows = rows.reshape(-1, *rows.shape[2:])
    return _square_sum(rows), False


def _tap(site: Site, x: Array, y: Array, probes: Probes) -> Array:
    """`y`, whose backward pass hands out the layer's statistics as `probes`' cotangents."""
    assert probes.count is not None
    dtype = probes.count.dtype
    has_bias = site.bias_index is not None
    wanted = jax.tree.map(lambda _: True, probes)

    @jax.custom_vjp
    def tap(x, y, probes):
        del x, probes
        return y

    def fwd(x, y, probes):
        del probes
        return y, x

    def bwd(x, cotangent):
        a = site.rule.input_rows(site.skeleton, x).astype(dtype)
        if has_bias:
            a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), dtype)], axis=-1)
        g = site.rule.output_rows(site.skeleton, cotangent).astype(dtype)
        # JAX sums the cotangent of an unbatched argument over a vmap only where the
        # backward pass's value depends on the batched values; a statistic of the
        # input alone (or the row count) might not, under a vmap over tokens whose
        # input is shared. Tying every statistic to the cotangent makes it depend.
        tie = jnp.zeros((), dtype) * jnp.sum(g)
        a = a + tie

        if wanted.input_moment is None:
            input_moment = None
        elif site.diagonal_input:
            input_moment = _square_sum(a)
        else:
            input_moment = _moment(a)
        stats = Probes(
            input_moment=input_moment,
            output_moment=None if wanted.output_moment is None else _moment(g),
            input_sum=None if wanted.input_sum is None else jnp.sum(a, axis=0),
            output_sum=None if wanted.output_sum is None else jnp.sum(g, axis=0),
            count=jnp.asarray(a.shape[0], dtype) + tie,
        )
        return _zero_cotangent(x), cotangent, stats

    tap.defvjp(fwd, bwd)
    return tap(x, y, probes)


# The paths of the sites whose tap ran while `usable_layout` traced the model.
_CALLED: list[set] = []


@functools.cache
def _tapped_class(cls: type) -> type:
    """A subclass of the layer's own class whose calls pass through the tap.

    A subclass, not a wrapper: the tapped layer is still an instance of its type (for
    code that checks), and keeps its fields, so code that reads them still works.
    """

    class TappedLayer(cls):  # pyright: ignore[reportGeneralTypeIssues]  # a runtime base
        kfac_probes: Probes
        kfac_site: Site = eqx.field(static=True)

        def __init__(self, layer, probes, site):
            for field in dataclasses.fields(layer):
                object.__setattr__(self, field.name, getattr(layer, field.name))
            self.kfac_probes = probes
            self.kfac_site = site

        def __call__(self, x, *args, **kwargs):
            if _CALLED:
                _CALLED[-1].add(self.kfac_site.path)
            x = jnp.asarray(x)
            y = cls.__call__(self, x, *args, **kwargs)
            return _tap(self.kfac_site, x, y, self.kfac_probes)

    TappedLayer.__name__ = TappedLayer.__qualname__ = f"Tapped{cls.__name__}"
    return TappedLayer


def zero_probes(layout: Layout, batch: int, dtype: Any) -> tuple[Probes, ...]:
    """Zero probes for every site; per-example sums get a leading batch axis."""
    out = []
    for site in layout.sites:
        s, g, m, n = site.stack_shape, site.groups, site.rows, site.columns
        expand = layout.approximation == "expand"
        in_moment = (*s, g, n) if site.diagonal_input else (*s, g, n, n)
        out.append(
            Probes(
                input_moment=jnp.zeros(in_moment, dtype) if expand else None,
                output_moment=jnp.zeros((*s, g, m, m), dtype) if expand else None,
                input_sum=None if expand else jnp.zeros((batch, *s, g, n), dtype),
                output_sum=None if expand else jnp.zeros((batch, *s, g, m), dtype),
                count=jnp.zeros(s, dtype),
            )
        )
    return tuple(out)


def tap_model(model: PyTree, layout: Layout, probes: tuple[Probes, ...]) -> PyTree:
    """`model` with every registered layer replaced by its tapped subclass."""
    if not layout.sites:
        return model
    return eqx.tree_at(
        lambda m: [get_at(m, site.path) for site in layout.sites],
        model,
        replace=[
            _tapped_class(type(layer))(layer, p, site)
            for site, p in zip(layout.sites, probes)
            for layer in [get_at(model, site.path)]
        ],
    )


class _Assembled(eqx.Module):
    """The model rebuilt for one example from shared and per-example parts."""

    shared: list  # the factored layers' parameter leaves (None at the diagonal ones)
    static: PyTree
    shared_probes: tuple[Probes, ...]
    layout: Layout = eqx.field(static=True)

    def __call__(self, example, *, key: PRNGKeyArray | None = None):
        x, diagonal, own_probes = example
        leaves = list(self.shared)
        for i, leaf in zip(self.layout.diagonal_indices, diagonal):
            leaves[i] = leaf
        params = jax.tree.unflatten(self.layout.treedef, leaves)
        model = eqx.combine(params, self.static)
        probes = tuple(
            eqx.combine(a, b) for a, b in zip(self.shared_probes, own_probes)
        )
        model = tap_model(model, self.layout, probes)
        return model(x) if key is None else model(x, key=key)


class Statistics(eqx.Module):
    """What one backward pass through the taps gives."""

    grads: PyTree[Array]  # the gradient (with respect to the parameters)
    probes: tuple[Probes, ...]  # per site: the statistics, summed over the batch
    diagonal: tuple[Array, ...]  # per diagonal leaf: per-example gradients [N, ...]


def linearise(
    layout: Layout,
    params: PyTree[Array],
    static: PyTree,
    inputs: PyTree[Array],
    model_key: PRNGKeyArray | None,
    dtype: Any,
) -> tuple[Array, Callable[[Array], Statistics]]:
    """The model's outputs on the batch, and the backward pass through the taps.

    `pullback(cotangent)` is one reverse pass from a cotangent of the outputs: the
    gradient, every site's statistics and the diagonal leaves' per-example gradients
    (XLA drops what the caller does not use).
    """
    leaves = jax.tree.leaves(params)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    diagonal = [
        jnp.broadcast_to(leaves[i], (batch, *jnp.shape(leaves[i])))
        for i in layout.diagonal_indices
    ]
    shared = [None if i in layout.diagonal_indices else x for i, x in enumerate(leaves)]
    # Per-device in a data-parallel step: their cotangents are this device's
    # statistics, not sums over the devices.
    diagonal = per_shard(diagonal)
    probes = per_shard(zero_probes(layout, batch, dtype))

    def split(p: Probes) -> tuple[Probes, Probes]:
        batched = Probes(None, None, p.input_sum, p.output_sum, None)
        return Probes(p.input_moment, p.output_moment, None, None, p.count), batched

    def outputs(shared, diagonal, probes):
        parts = [split(p) for p in probes]
        model = _Assembled(shared, static, tuple(s for s, _ in parts), layout)
        example = (inputs, diagonal, tuple(b for _, b in parts))
        return apply_batched(model, example, model_key)

    out, vjp = jax.vjp(outputs, shared, diagonal, probes)

    def pullback(cotangent: Array) -> Statistics:
        d_shared, d_diagonal, d_probes = vjp(cotangent)
        grads = list(d_shared)
        for i, g in zip(layout.diagonal_indices, d_diagonal):
            grads[i] = jnp.sum(g, axis=0)
        return Statistics(
            jax.tree.unflatten(layout.treedef, grads),
            tuple(d_probes),
            tuple(d_diagonal),
        )

    return out, pullback


def usable_layout(
    layout: Layout,
    params: PyTree[Array],
    static: PyTree,
    inputs: PyTree[Array],
    model_key: PRNGKeyArray | None,
    dtype: Any,
) -> Layout:
    """`layout` without the sites that the model never calls.

    A model that uses a registered layer's weight without calling the layer (an
    `einsum` with `self.proj.weight`), or not at all, gives the tap nothing to see:
    those parameters go to diagonal blocks instead. Found by tracing the model's
    shapes once (no computation).
    """
    if not layout.sites:
        return layout
    _CALLED.append(set())
    try:
        jax.eval_shape(
            lambda p: linearise(layout, p, static, inputs, model_key, dtype)[0], params
        )
        called = _CALLED[-1]
    finally:
        _CALLED.pop()
    sites = tuple(s for s in layout.sites if s.path in called)
    if len(sites) == len(layout.sites):
        return layout
    dropped = [s for s in layout.sites if s.path not in called]
    extra = [s.weight_index for s in dropped]
    extra += [s.bias_index for s in dropped if s.bias_index is not None]
    diagonal = tuple(sorted((*layout.diagonal_indices, *extra)))
    return Layout(sites, diagonal, layout.treedef, layout.approximation)
