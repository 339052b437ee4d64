r"""Data-parallel steps for every network optimizer, on JAX's own SPMD machinery."""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .._losses import AbstractLoss
from .._network_optimizers.base import (
    AbstractNetworkOptimizer,
    NetworkOptimizerState,
    StepInfo,
)
from .context import data_axis_bound, local_slice, shard_map, spread_over_mesh


def check_mesh_axis(mesh: Any, axis: str, name: str = "mesh") -> int:
    """The size of `axis` in `mesh`; a sentence if `mesh` is no mesh or lacks it."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{name}` must be a `jax.sharding.Mesh`, e.g. "
            "`jax.make_mesh((jax.device_count(),), ('data',))`, not "
            f"{type(mesh).__name__}."
        )
    if axis not in mesh.shape:
        raise ValueError(
            f"`{name}` has no axis named {axis!r}: its axes are "
            f"{tuple(mesh.axis_names)}. Build the mesh with that axis (e.g. "
            f"`jax.make_mesh((jax.device_count(),), ({axis!r},))`) or pass "
            f"`axis=` one of {tuple(mesh.axis_names)}."
        )
    return mesh.shape[axis]


def _check_divisible(tree: PyTree, size: int, axis: str, name: str) -> None:
    for x in jax.tree.leaves(tree):
        if jnp.ndim(x) < 1:
            raise ValueError(
                f"`{name}` must be a batch (arrays with a leading batch axis) to be "
                f"split along the mesh axis {axis!r}, but holds an array of shape "
                f"{jnp.shape(x)}."
            )
        batch = jnp.shape(x)[0]
        if batch % size:
            raise ValueError(
                f"The batch of `{name}` ({batch} examples) does not divide across the "
                f"{size} devices of the mesh axis {axis!r}. Use a batch size that is "
                f"a multiple of {size} (e.g. {max(size, batch - batch % size)}), or "
                "drop the last incomplete batch."
            )


def shard_batch(
    batch: PyTree[ArrayLike], mesh: Mesh, axis: str = "data"
) -> PyTree[Array]:
    """Place a batch on a mesh, split along its leading (example) axis.

    For the `jax.jit` way of data parallelism: pass the result as `inputs` and
    `targets` of any optimizer's `step` under `jax.jit` (with the model and state
    replicated, e.g. `jax.device_put(model, NamedSharding(mesh, P()))` on its
    arrays); the compiler partitions the step, and its collectives average the
    gradient and the statistics.

    **Arguments:**

    - `batch`: a PyTree of arrays with a common leading batch axis.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `axis`.
    - `axis`: the mesh axis the examples are split along. Default `"data"`.

    **Returns:**

    The batch, each array a `jax.Array` with `NamedSharding(mesh, P(axis))`. A batch
    that does not divide across the axis, or a mesh without the axis, is a sentence.
    """
    size = check_mesh_axis(mesh, axis)
    _check_divisible(batch, size, axis, "batch")
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array of `tree` (a model, a state) copied to every device of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree
    )


def _place(x: Any, sharding: NamedSharding) -> Any:
    """`x` laid out as `sharding` says: a constraint for the compiler on a mesh
    axis of type `Auto`, a resharding on an `Explicit` one (which `shard_map`
    needs to match its specs)."""
    if not eqx.is_array(x):
        return x
    types = getattr(sharding.mesh, "axis_types", ())
    if any(t == jax.sharding.AxisType.Explicit for t in types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


class _ShardedMean(eqx.Module):
    """A loss's value averaged over the data axis: the mean over the whole batch."""

    loss: Callable
    axis: str = eqx.field(static=True)

    def __call__(self, outputs, targets):
        return jax.lax.pmean(self.loss(outputs, targets), self.axis)


class _AbstractShardedLoss(AbstractLoss):
    r"""An eqx_curv loss on one device's share of the batch, read as the mean over
    the WHOLE batch: $\frac{1}{N}\sum_i \ell_i$ with $N$ the whole batch's size.

    Its value is averaged over the data axis, so the gradient with respect to the
    replicated parameters, and every Hessian- or GGN-vector product through it, is
    the whole batch's. Per example it matches one device: `hvp` is
    $\frac{1}{N} H_i t_i$, `hessian_sqrt` the same $S_i$, and `sample` draws the
    whole batch's targets from the same key and keeps this device's.
    """

    loss: AbstractVar[AbstractLoss]
    axis: AbstractVar[str]
    size: AbstractVar[int]

    def __call__(self, outputs: Float[Array, "batch ..."], targets: ArrayLike) -> Array:
        return jax.lax.pmean(self.loss(outputs, targets), self.axis)

    def hvp(self, outputs, tangents, *, targets=None):
        local = self.loss.hvp(outputs, tangents, targets=targets)
        return local / jnp.asarray(self.size, local.dtype)

    def hessian_sqrt(self, outputs, *, targets=None):
        return self.loss.hessian_sqrt(outputs, targets=targets)

    def sample(self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]) -> Array:
        everyone = jax.lax.all_gather(outputs, self.axis, tiled=True)
        drawn = self.loss.sample(key, everyone)
        return jax.tree.map(lambda y: local_slice(y, outputs.shape[0]), drawn)

    def num_positions(self, outputs: Float[Array, "batch ..."]) -> int:
        return self.loss.num_positions(outputs)


class _ShardedLoss(_AbstractShardedLoss):
    """A sharded loss whose output-space Hessian does not depend on the targets."""

    hessian_depends_on_targets: ClassVar[bool] = False
    loss: AbstractLoss
    axis: str = eqx.field(static=True)
    size: int = eqx.field(static=True)


class _ShardedTargetLoss(_AbstractShardedLoss):
    """A sharded loss whose output-space Hessian depends on the targets."""

    hessian_depends_on_targets: ClassVar[bool] = True
    loss: AbstractLoss
    axis: str = eqx.field(static=True)
    size: int = eqx.field(static=True)


def _sharded_loss(loss: Callable, axis: str, size: int) -> Callable:
    if isinstance(loss, AbstractLoss):
        if loss.hessian_depends_on_targets:
            return _ShardedTargetLoss(loss, axis, size)
        return _ShardedLoss(loss, axis, size)
    return _ShardedMean(loss, axis)


class DataParallel(eqx.Module):
    """A network optimizer whose steps split the batch over a mesh axis.

    Made by [`eqx_curv.data_parallel`][]; `init` and `step` are those of the
    stochastic optimizer protocol, and the results equal one device's to float
    tolerance.
    """

    optimizer: AbstractNetworkOptimizer
    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True)
    explicit: bool = eqx.field(static=True)
    spread: bool = eqx.field(static=True)

    def init(self, model: PyTree) -> NetworkOptimizerState:
        """The optimizer's `init(model)`."""
        return self.optimizer.init(model)

    def step(
        self,
        model: PyTree,
        state: NetworkOptimizerState,
        loss: Callable,
        inputs: PyTree[Array],
        targets: PyTree,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[PyTree, NetworkOptimizerState, StepInfo]:
        """One step of the optimizer on the batch, split over the mesh axis.

        Arguments and results as `AbstractNetworkOptimizer.step`; the batch
        (`inputs` and `targets`) must divide across the axis's devices.
        """
        size = check_mesh_axis(self.mesh, self.axis)
        _check_divisible(inputs, size, self.axis, "inputs")
        _check_divisible(targets, size, self.axis, "targets")
        split = NamedSharding(self.mesh, PartitionSpec(self.axis))
        inputs = jax.tree.map(lambda x: _place(x, split), inputs)
        targets = jax.tree.map(lambda x: _place(x, split), targets)
        if not self.explicit:
            # The compiler partitions: the batch is constrained to the axis and the
            # rest follows; only the spreading of the roots is written out.
            mesh = self.mesh if self.spread else None
            with spread_over_mesh(mesh, self.axis):
                return self.optimizer.step(model, state, loss, inputs, targets, key=key)
        replicated = (model, state, loss, key)
        dynamic, static = eqx.partition(replicated, eqx.is_array)
        batch_dynamic, batch_static = eqx.partition((inputs, targets), eqx.is_array)
        out_static = []

        def body(dynamic, batch_dynamic):
            model, state, loss, key = eqx.combine(dynamic, static)
            inputs, targets = eqx.combine(batch_dynamic, batch_static)
            with data_axis_bound(self.axis, size, self.spread):
                result = self.optimizer.step(
                    model,
                    state,
                    _sharded_loss(loss, self.axis, size),
                    inputs,
                    targets,
                    key=key,
                )
            out_dynamic, out = eqx.partition(result, eqx.is_array)
            out_static.append(out)
            return out_dynamic

        stepped = shard_map(
            body,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), PartitionSpec(self.axis)),
            out_specs=PartitionSpec(),
        )
        out_dynamic = stepped(dynamic, batch_dynamic)
        return eqx.combine(out_dynamic, out_static[-1])


def data_parallel(
    optimizer: AbstractNetworkOptimizer,
    mesh: Mesh,
    *,
    axis: str = "data",
    explicit: bool = True,
    spread: bool = True,
) -> DataParallel:
    r"""Data parallelism for any network optimizer: the batch split over a mesh axis.

    ```python
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    parallel = eqx_curv.data_parallel(eqx_curv.KFAC(), mesh)
    state = parallel.init(model)
    model, state, info = eqx.filter_jit(parallel.step)(
        model, state, loss, inputs, targets, key=key
    )
    ```

    The model and state are replicated; every device takes its share of the batch.
    With `explicit=True` (default) the step is the optimizer's own `step` traced in
    `shard_map`: the loss is wrapped so that its value is the mean over the whole
    batch (`lax.pmean` over `axis`), which makes the gradient, Hessian- and
    GGN-vector products and sampled-label gradients through the replicated
    parameters whole-batch quantities by autodiff (no further average: that would
    count them `axis`-size times). Statistics that are not gradients (K-FAC's
    factors, its quadratic model's inner products) are averaged across explicitly,
    and per-example keys (dropout, sampled labels) are drawn for the whole batch
    and sliced, so that every example sees the key it sees on one device: the step
    equals one device's to float tolerance. With `explicit=False` the step is the
    optimizer's `step` with the batch constrained to `axis`, and the compiler
    partitions it (`jax.jit`'s own way; [`eqx_curv.shard_batch`][] does the same
    for a plain `opt.step`).

    With `spread=True` (default) the refresh of inverse roots, eigendecompositions
    and factor inverses (Shampoo, SOAP, K-FAC) shares the stack of matrices out over
    the devices of `axis` and gathers the results, so that each device computes
    about `1/size` of them instead of all.

    **Arguments:**

    - `optimizer`: any eqx_curv network optimizer.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `axis`.
    - `axis`: the mesh axis the batch is split along. Default `"data"`.
    - `explicit`: `shard_map` with written-out collectives (default), or `False`
        for the compiler's partitioning.
    - `spread`: spread the matrix refreshes over the devices. Default `True`.

    **Returns:**

    A `DataParallel` with the optimizer's `init` and `step`. A batch that does not
    divide across the axis, or a mesh without the axis, is a sentence at trace time.
    """
    if not isinstance(optimizer, AbstractNetworkOptimizer):
        raise TypeError(
            "`optimizer` must be an eqx_curv network optimizer (e.g. "
            f"`eqx_curv.KFAC()`), not {type(optimizer).__name__}."
        )
    check_mesh_axis(mesh, axis)
    for name, value in (("explicit", explicit), ("spread", spread)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False, not {value!r}.")
    return DataParallel(optimizer, mesh, axis, explicit, spread)
