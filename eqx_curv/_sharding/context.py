r"""What the rest of eqx_curv needs to know while a data-parallel step is traced.

[`eqx_curv.data_parallel`][] traces an optimizer's ordinary `step` inside
`shard_map`, with the parameters replicated and the batch split along a mesh axis.
Gradients, Hessian- and GGN-vector products flow through the loss, whose value is
averaged over that axis, so they come out as full-batch quantities without help (the
transpose of broadcasting a replicated value to the devices is a sum). A few places
reduce over the batch outside autodiff; they read the axis from here:

- per-example keys (dropout) are drawn for the whole batch and sliced, so that every
  example gets the key it gets on one device;
- K-FAC's factors from the layer taps are per-device averages, then averaged across;
- inner products of per-example quantities are summed across;
- stacks of matrices (roots, eigendecompositions) are spread over the devices.

Outside such a step every helper here is the identity, at no cost.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


# The data axis of the `shard_map` being traced: (name, size), innermost last.
_AXES: list[tuple[str, int]] = []
# Where stacks of matrices are spread: over the bound data axis ("bound", name, size),
# over a mesh axis from outside `shard_map` ("mesh", mesh, name), or not (None).
_SPREAD: list[tuple[str, Any, Any] | None] = []


def _find_shard_map() -> Callable:
    # `jax.shard_map` (jax >= 0.7, with `check_vma`) where present; the experimental
    # home before that, whose `check_rep` is the same switch.
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map as experimental  # pyright: ignore

    def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
        return experimental(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma
        )

    return shard_map


shard_map = _find_shard_map()


@contextlib.contextmanager
def data_axis_bound(name: str, size: int, spread: bool) -> Iterator[None]:
    """Mark `name` (of `size` devices) as the data axis while tracing inside it;
    with `spread`, stacks of matrices are shared out over it."""
    _AXES.append((name, size))
    _SPREAD.append(("bound", name, size) if spread else None)
    try:
        yield
    finally:
        _SPREAD.pop()
        _AXES.pop()


@contextlib.contextmanager
def spread_over_mesh(mesh: Any, name: str) -> Iterator[None]:
    """While tracing outside `shard_map`: share stacks of matrices out over the axis
    `name` of `mesh` (no spreading for `mesh=None`)."""
    _SPREAD.append(None if mesh is None else ("mesh", mesh, name))
    try:
        yield
    finally:
        _SPREAD.pop()


def data_axis() -> tuple[str, int] | None:
    """The data axis `(name, size)` of the step being traced, or `None`."""
    return _AXES[-1] if _AXES else None


def num_shards() -> int:
    """How many devices share the batch (1 outside a data-parallel step)."""
    axis = data_axis()
    return 1 if axis is None else axis[1]


def sum_over_shards(tree: PyTree[Array]) -> PyTree[Array]:
    """The sum over the data axis of per-device values (identity outside)."""
    axis = data_axis()
    return tree if axis is None else jax.lax.psum(tree, axis[0])


def mean_over_shards(tree: PyTree[Array]) -> PyTree[Array]:
    """The mean over the data axis of per-device values (identity outside)."""
    axis = data_axis()
    return tree if axis is None else jax.lax.pmean(tree, axis[0])


def all_over_shards(flag: Array) -> Array:
    """Whether a boolean scalar holds on every device (itself outside)."""
    axis = data_axis()
    if axis is None:
        return flag
    return jax.lax.psum((~flag).astype(jnp.int32), axis[0]) == 0


def per_shard(tree: PyTree[Array]) -> PyTree[Array]:
    """Mark replicated arrays as per-device ones (identity outside).

    Autodiff through a replicated array sums its cotangents over the devices; an
    array whose cotangent is a per-device statistic (K-FAC's taps, per-example
    gradients) must not be summed, so it enters as a per-device value.
    """
    axis = data_axis()
    if axis is None:
        return tree

    def cast(x):
        if axis[0] in getattr(jax.typeof(x), "vma", ()):
            return x
        return jax.lax.pcast(x, axis[0], to="varying")

    return jax.tree.map(cast, tree)


def local_slice(x: Array, local_size: int) -> Array:
    """This device's `local_size` rows of `x`, whose rows are the whole batch's."""
    axis = data_axis()
    if axis is None:
        return x
    start = jax.lax.axis_index(axis[0]) * local_size
    return jax.lax.dynamic_slice_in_dim(x, start, local_size, axis=0)


def global_batch(local_size: int) -> int:
    """The size of the whole batch whose share on this device is `local_size`."""
    return local_size * num_shards()


def spread_map(fn: Callable[[Any], Any], stack: PyTree[Array], local_map: Callable):
    """`local_map(fn, stack)` with the stack's rows shared out over the devices.

    Pads the stack to a multiple of the devices (repeating its first row, so that
    the padding is a matrix `fn` handles) and gives every device its own rows.
    Inside a data-parallel `shard_map` each device runs its chunk (the others'
    chunks are skipped under `lax.cond`) and a sum of zero-padded parts hands every
    device the whole result (exact, and a replicated value); from outside one, a
    `shard_map` over the mesh axis returns the result split along that axis and
    the compiler gathers it where it is used. Where nothing is spread, or for a
    stack of one row, it is `local_map(fn, stack)`.
    """
    spread = _SPREAD[-1] if _SPREAD else None
    rows = jax.tree.leaves(stack)[0].shape[0]
    if spread is None or rows < 2:
        return local_map(fn, stack)
    kind, first, second = spread
    if kind == "mesh":
        mesh, name = first, second
        size = mesh.shape[name]
    else:
        mesh, name, size = None, first, second
    per_device = -(-rows // size)
    padded_rows = per_device * size

    def pad(x):
        if padded_rows == rows:
            return x
        filler = jnp.broadcast_to(x[:1], (padded_rows - rows, *x.shape[1:]))
        return jnp.concatenate([x, filler], axis=0)

    padded = jax.tree.map(pad, stack)
    if kind == "mesh":
        spec = jax.sharding.PartitionSpec(name)
        # The chunks are per-device values, unchecked: nothing is claimed replicated.
        result = shard_map(
            lambda s: local_map(fn, s),
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
            check_vma=False,
        )(padded)
        return jax.tree.map(lambda x: x[:rows], result)

    def chunk(d):
        part = slice(d * per_device, (d + 1) * per_device)
        return lambda: local_map(fn, jax.tree.map(lambda x: x[part], padded))

    chunks = [chunk(d) for d in range(size)]
    parts = _run_owned(chunks, list(range(size)), name)
    whole = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
    return jax.tree.map(lambda x: x[:rows], whole)


def _run_owned(calls: list[Callable[[], Any]], owners: list[int], name: str):
    """Each call on its owner only (zeros elsewhere), then summed over the devices."""
    index = jax.lax.axis_index(name)
    results = []
    for call, owner in zip(calls, owners):
        shapes = jax.eval_shape(call)

        def nothing(shapes=shapes):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        results.append(jax.lax.cond(index == owner, call, nothing))
    return _sum_parts(results, name)


def _sum_parts(tree: PyTree[Array], name: str) -> PyTree[Array]:
    """The sum over the devices of parts that are zero but on one device: exact."""

    def total(x):
        if jnp.issubdtype(x.dtype, jnp.bool_):
            return jax.lax.psum(x.astype(jnp.int32), name) > 0
        return jax.lax.psum(x, name)

    return jax.tree.map(total, tree)


def _owners(costs: list[float], size: int) -> list[int]:
    """Each call's device: the most expensive first, each to the least loaded."""
    loads = [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        device = min(range(size), key=lambda d: loads[d])
        owners[i] = device
        loads[device] += costs[i]
    return owners


def spread_calls(
    fn: Callable[..., Any], arguments: list[tuple[Any, ...]], costs: list[float]
) -> list[Any]:
    """`[fn(*args) for args in arguments]`, the calls shared out over the devices.

    Each call (returning a PyTree of arrays) runs on one device only, chosen to
    balance the `costs` (e.g. $n^3$ for a factorisation of an $n \\times n$
    matrix); the others give zeros, and a sum over the devices hands every device
    every result. Where nothing is spread, or for one call, the calls simply run.
    """
    spread = _SPREAD[-1] if _SPREAD else None
    if spread is None or len(arguments) < 2:
        return [fn(*args) for args in arguments]
    kind, first, second = spread

    def run(name: str, size: int, arguments) -> list[Any]:
        calls = [lambda args=args: fn(*args) for args in arguments]
        return _run_owned(calls, _owners(costs, size), name)

    if kind == "bound":
        return run(first, second, arguments)
    mesh, name = first, second
    replicated = jax.sharding.PartitionSpec()
    return shard_map(
        lambda arguments: run(name, mesh.shape[name], arguments),
        mesh=mesh,
        in_specs=replicated,
        out_specs=replicated,
    )(arguments)
