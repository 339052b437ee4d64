"""The abstract curvature operator and its lineax registrations.

Every curvature matrix in eqx_curv is a symmetric `lineax.AbstractLinearOperator` whose
input and output structure is a parameter PyTree. Lineax dispatches its queries
(`is_symmetric`, `is_positive_semidefinite`, `materialise`, ...) with
`functools.singledispatch`, which follows the class hierarchy: registering each query
once here covers every subclass.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree


def structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def _describe(structure: PyTree[jax.ShapeDtypeStruct]) -> str:
    leaves = jax.tree.leaves(structure)
    shown = ", ".join(f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves[:6])
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 6 else ""
    return f"{jax.tree.structure(structure)} with leaves [{shown}{more}]"


def check_vector_structure(
    vector: PyTree, structure: PyTree[jax.ShapeDtypeStruct], name: str = "vector"
) -> None:
    """Raise a `ValueError` at trace time if `vector` does not match `structure`."""
    got = structure_of(vector)
    if jax.tree.structure(got) != jax.tree.structure(structure):
        raise ValueError(
            f"`{name}` must have the operator's input structure (the parameter PyTree): "
            f"expected {_describe(structure)}, got {_describe(got)}. Build the vector "
            "from the same parameters, e.g. with `eqx.filter(model, eqx.is_inexact_array)`."
        )
    for g, s in zip(jax.tree.leaves(got), jax.tree.leaves(structure)):
        if g.shape != s.shape or g.dtype != s.dtype:
            raise ValueError(
                f"`{name}` has a leaf of shape {g.shape} and dtype {g.dtype} where the "
                f"operator expects shape {s.shape} and dtype {s.dtype}. Cast or reshape "
                "the vector to match the parameters (`operator.in_structure()`)."
            )


def check_inexact_params(params: PyTree, name: str = "params") -> None:
    """Raise a `TypeError` if any leaf of `params` is not a floating-point array."""
    leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
    if not leaves_with_path:
        raise ValueError(
            f"`{name}` has no array leaves: there is nothing to take curvature over."
        )
    for path, leaf in leaves_with_path:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has dtype {dtype}; curvature "
                "is only defined with respect to floating-point parameters. Cast it "
                "(e.g. `x.astype(jnp.float32)`) or move it out of the differentiated "
                "PyTree with `eqx.partition`."
            )


def concrete_value(x) -> float | None:
    """The value of a scalar known at trace time, or `None` for a tracer."""
    try:
        return float(np.asarray(x))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_damping(damping) -> Array:
    """A scalar damping as an array; a negative value known at trace time is an error.

    A traced damping cannot be checked here and is assumed non-negative.
    """
    if jnp.shape(damping) != ():
        raise ValueError(
            f"`damping` must be a scalar, but has shape {jnp.shape(damping)}."
        )
    value = concrete_value(damping)
    if value is not None and not value >= 0:
        raise ValueError(
            f"`damping` must be non-negative (it is added to the diagonal), but is "
            f"{value}. Use a small positive value such as 1e-3."
        )
    return jnp.asarray(damping)


class AbstractCurvatureOperator(lx.AbstractLinearOperator):
    """A symmetric curvature matrix acting on a parameter PyTree.

    Subclasses implement `_mv` (the product with a vector already checked against
    `in_structure()`), `in_structure` and `_is_psd`. This base class supplies the rest of
    the `lineax.AbstractLinearOperator` interface and registers every lineax query, so that
    `lineax.linear_solve`, `lineax.invert`, `lineax.materialise` and `lineax.diagonal` work
    on any subclass.

    Rows and columns of `as_matrix()` are ordered as `jax.flatten_util.ravel_pytree`
    orders the parameter PyTree.
    """

    @abc.abstractmethod
    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]: ...

    @abc.abstractmethod
    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]: ...

    @abc.abstractmethod
    def _is_psd(self) -> bool:
        """Whether the operator is positive semidefinite for every input (a static fact)."""

    def mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        check_vector_structure(vector, self.in_structure())
        return self._mv(vector)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.in_structure()

    def transpose(self) -> "AbstractCurvatureOperator":
        return self

    def as_matrix(self) -> Array:
        # Compiled: n products op-by-op would dispatch every primitive eagerly.
        return _as_matrix(self)

    def as_function_operator(self) -> lx.FunctionLinearOperator:
        """This operator as a `lineax.FunctionLinearOperator` with the same tags."""
        tags = [lx.symmetric_tag]
        if self._is_psd():
            tags.append(lx.positive_semidefinite_tag)
        return lx.FunctionLinearOperator(self.mv, self.in_structure(), tags=tags)


@eqx.filter_jit
def _as_matrix(operator: AbstractCurvatureOperator) -> Array:
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure())
    flat, unravel = jax.flatten_util.ravel_pytree(zeros)
    basis = jnp.eye(flat.size, dtype=flat.dtype)

    def column(e):
        return jax.flatten_util.ravel_pytree(operator.mv(unravel(e)))[0]

    # Symmetric, so rows and columns agree; vmap gives the columns as rows.
    return jax.vmap(column)(basis).T


@lx.is_symmetric.register(AbstractCurvatureOperator)
def _(operator):
    return True


@lx.is_positive_semidefinite.register(AbstractCurvatureOperator)
def _(operator):
    return operator._is_psd()


@lx.is_diagonal.register(AbstractCurvatureOperator)
@lx.is_tridiagonal.register(AbstractCurvatureOperator)
@lx.has_unit_diagonal.register(AbstractCurvatureOperator)
@lx.is_lower_triangular.register(AbstractCurvatureOperator)
@lx.is_upper_triangular.register(AbstractCurvatureOperator)
@lx.is_negative_semidefinite.register(AbstractCurvatureOperator)
def _(operator):
    return False


@lx.linearise.register(AbstractCurvatureOperator)
@lx.conj.register(AbstractCurvatureOperator)
def _(operator):
    # Already linear in the vector, and real.
    return operator


@lx.materialise.register(AbstractCurvatureOperator)
def _(operator):
    return lx.materialise(operator.as_function_operator())


@lx.diagonal.register(AbstractCurvatureOperator)
def _(operator):
    return lx.diagonal(operator.as_function_operator())


@lx.tridiagonal.register(AbstractCurvatureOperator)
def _(operator):
    return lx.tridiagonal(operator.as_function_operator())


class LinearisedOperator(AbstractCurvatureOperator):
    """A curvature operator whose primal computation has been done once.

    `lineax.linearise` of the concrete operators returns one of these: `fn` is the
    closure-converted linear map (a `jax.linearize`d tangent map composed with its
    transpose), so each product costs only the tangent and cotangent passes. Iterative
    solvers (CG, GMRES, LSMR, BiCGStab) call `lineax.linearise` before iterating.
    """

    fn: Callable
    flat_structure: tuple = eqx.field(static=True)
    psd: bool = eqx.field(static=True)

    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return self.fn(vector)

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        leaves, treedef = self.flat_structure
        return jax.tree.unflatten(treedef, leaves)

    def _is_psd(self) -> bool:
        return self.psd


def linearised(
    fn: Callable, structure: PyTree[jax.ShapeDtypeStruct], psd: bool
) -> LinearisedOperator:
    """Wrap the linear map `fn` on `structure`, hoisting its closed-over arrays."""
    leaves, treedef = jax.tree.flatten(structure)
    return LinearisedOperator(
        eqx.filter_closure_convert(fn, structure), (tuple(leaves), treedef), psd
    )
