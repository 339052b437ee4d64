"""The abstract curvature operator and its lineax registrations.

Every curvature matrix in eqx_curv is a symmetric `lineax.AbstractLinearOperator` whose
input and output structure is a parameter PyTree. Lineax dispatches its queries
(`is_symmetric`, `is_positive_semidefinite`, `materialise`, ...) with
`functools.singledispatch`, which follows the class hierarchy: registering each query
once here covers every subclass.
"""

import abc
import functools
from collections.abc import Callable, Iterable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import check_scalar, known_values, structure_of as structure_of, zeros_from


def _describe(structure: PyTree[jax.ShapeDtypeStruct]) -> str:
    leaves = jax.tree.leaves(structure)
    shown = ", ".join(f"{leaf.dtype}{list(leaf.shape)}" for leaf in leaves[:6])
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 6 else ""
    return f"{jax.tree.structure(structure)} with leaves [{shown}{more}]"


def _first_non_array(tree: PyTree) -> tuple[str, object] | None:
    """The path and value of the first leaf of `tree` that is not array-like."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not (eqx.is_array_like(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)):
            return jax.tree_util.keystr(path), leaf
    return None


def _not_an_array_message(name: str, where: tuple[str, object]) -> str:
    path, leaf = where
    return (
        f"`{name}` must be a PyTree of arrays, but its leaf {path or '(root)'} is a "
        f"{type(leaf).__name__}, not an array. If you passed a whole Equinox model, "
        "pass its parameters instead: `eqx.filter(model, eqx.is_inexact_array)` (and "
        "close over the rest, `params, static = eqx.partition(model, "
        "eqx.is_inexact_array)`)."
    )


def check_vector_structure(
    vector: PyTree, structure: PyTree[jax.ShapeDtypeStruct], name: str = "vector"
) -> None:
    """Raise a `ValueError` at trace time if `vector` does not match `structure`."""
    non_array = _first_non_array(vector)
    if non_array is not None:
        raise ValueError(
            _not_an_array_message(name, non_array)
            + f" The operator expects {_describe(structure)}."
        )
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
    non_array = _first_non_array(params)
    if non_array is not None:
        raise TypeError(_not_an_array_message(name, non_array))
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


def check_damping(damping) -> Array:
    """A finite, non-negative real scalar damping, as an array.

    A complex, string or boolean damping is a `TypeError`; a negative, infinite or NaN
    one known at trace time a `ValueError`; a traced one is checked at run time
    (`eqx.error_if`).
    """
    damping = check_scalar(
        damping,
        "damping",
        fix=" (it is added to the diagonal); use a small positive value such as 1e-3",
    )
    return jnp.asarray(damping)


def as_tags(tags: object | Iterable[object]) -> frozenset[object]:
    """A tag or an iterable of tags as a `frozenset`, as lineax's operators take them."""
    try:
        return frozenset(iter(tags))  # pyright: ignore  # a single tag is not iterable
    except TypeError:
        return frozenset([tags])


def spectrum_tolerance(values: np.ndarray, size: int) -> float:
    """How far below zero a computed eigenvalue of a PSD matrix may fall by rounding."""
    eps = float(np.finfo(values.dtype).eps)
    return 10 * size * eps * float(np.max(np.abs(values), initial=0.0))


def check_psd_eigenvalues(eigenvalues, fix: str) -> None:
    """Eigenvalues known at trace time under a PSD tag: none clearly below zero.

    Rounding may take a PSD matrix's computed eigenvalues slightly below zero
    (`spectrum_tolerance`); anything further is a `ValueError` ending with `fix`.
    Traced eigenvalues cannot be checked: the tag is then the caller's promise.
    """
    value = known_values(eigenvalues)
    if value is None or value.size == 0:
        return
    lowest = float(value.min())
    if lowest < -spectrum_tolerance(value, value.size):
        raise ValueError(
            f"The eigenvalues include {lowest:.3g}, but the operator is tagged "
            "`lineax.positive_semidefinite_tag`, which promises non-negative ones. "
            f"{fix}"
        )


def is_concretely_symmetric(matrix: np.ndarray) -> bool:
    """Whether a concrete square matrix is symmetric up to rounding."""
    eps = float(np.finfo(matrix.dtype).eps)
    scale = float(np.max(np.abs(matrix), initial=0.0))
    return bool(np.all(np.abs(matrix - matrix.T) <= 10 * matrix.shape[0] * eps * scale))


class AbstractCurvatureOperator(lx.AbstractLinearOperator):
    """A square curvature matrix acting on a parameter PyTree.

    Subclasses implement `_mv` (the product with a vector already checked against
    `in_structure()`), `in_structure` and `tags`. This base class supplies the rest of
    the `lineax.AbstractLinearOperator` interface and registers every lineax query, so
    that `lineax.linear_solve`, `lineax.invert`, `lineax.materialise` and
    `lineax.diagonal` work on any subclass.

    Properties are lineax tags and nothing else: `lineax.is_symmetric`,
    `lineax.is_positive_semidefinite` and the other queries read `tags`, which a
    subclass knows by construction (a GGN is symmetric and positive semidefinite) or
    takes from its caller (a Kronecker product of given factors). An operator not
    tagged symmetric has a true transpose (`jax.linear_transpose` of its product,
    unless the subclass registers a structured one).

    Rows and columns of `as_matrix()` are ordered as `jax.flatten_util.ravel_pytree`
    orders the parameter PyTree.
    """

    tags: eqx.AbstractVar[frozenset[object]]

    @abc.abstractmethod
    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]: ...

    @abc.abstractmethod
    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]: ...

    def mv(self, vector: PyTree) -> PyTree[Array]:
        # Annotated as any PyTree: the check names what is wrong and how to fix it
        # (e.g. a whole model passed where its parameters belong).
        check_vector_structure(vector, self.in_structure())
        return self._mv(vector)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.in_structure()

    def transpose(self) -> lx.AbstractLinearOperator:
        r"""The operator itself when tagged symmetric, else its true transpose.

        The true transpose is `jax.linear_transpose` of the product, or a structured
        one where a subclass registers it (`KroneckerOperator`: $A^\top \otimes
        B^\top$). Reverse-mode gradients through `lineax.linear_solve` use it.
        """
        if lx.symmetric_tag in self.tags:
            return self
        return transpose_of(self)

    def as_matrix(self) -> Array:
        # Compiled: n products op-by-op would dispatch every primitive eagerly.
        return _as_matrix(self)

    def as_function_operator(self) -> lx.FunctionLinearOperator:
        """This operator as a `lineax.FunctionLinearOperator` with the same tags."""
        return lx.FunctionLinearOperator(self.mv, self.in_structure(), self.tags)


@functools.singledispatch
def transpose_of(operator: AbstractCurvatureOperator) -> lx.AbstractLinearOperator:
    r"""The transpose of an operator not tagged symmetric.

    By default `jax.linear_transpose` of its product (through
    `lineax.FunctionLinearOperator.transpose`); a subclass with a structured transpose
    (`KroneckerOperator`: $A^\top \otimes B^\top$) registers it here.
    """
    return operator.as_function_operator().transpose()


@eqx.filter_jit
def _as_matrix(operator: AbstractCurvatureOperator) -> Array:
    zeros = zeros_from(operator.in_structure())
    flat, unravel = jax.flatten_util.ravel_pytree(zeros)
    basis = jnp.eye(flat.size, dtype=flat.dtype)

    def column(e):
        return jax.flatten_util.ravel_pytree(operator.mv(unravel(e)))[0]

    # vmap stacks the columns A e_j as rows; transposing puts them back as columns.
    return jax.vmap(column)(basis).T


# Every query reads the tags, as lineax's own operators do.


@lx.is_symmetric.register(AbstractCurvatureOperator)
def _(operator):
    tags = operator.tags
    return (
        lx.symmetric_tag in tags
        or lx.diagonal_tag in tags
        or lx.positive_semidefinite_tag in tags
        or lx.negative_semidefinite_tag in tags
    )


@lx.is_positive_semidefinite.register(AbstractCurvatureOperator)
def _(operator):
    return lx.positive_semidefinite_tag in operator.tags


@lx.is_negative_semidefinite.register(AbstractCurvatureOperator)
def _(operator):
    return lx.negative_semidefinite_tag in operator.tags


@lx.is_diagonal.register(AbstractCurvatureOperator)
def _(operator):
    return lx.diagonal_tag in operator.tags


@lx.is_tridiagonal.register(AbstractCurvatureOperator)
def _(operator):
    return lx.tridiagonal_tag in operator.tags or lx.diagonal_tag in operator.tags


@lx.has_unit_diagonal.register(AbstractCurvatureOperator)
def _(operator):
    return lx.unit_diagonal_tag in operator.tags


@lx.is_lower_triangular.register(AbstractCurvatureOperator)
def _(operator):
    return lx.lower_triangular_tag in operator.tags or lx.diagonal_tag in operator.tags


@lx.is_upper_triangular.register(AbstractCurvatureOperator)
def _(operator):
    return lx.upper_triangular_tag in operator.tags or lx.diagonal_tag in operator.tags


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


def linearised(
    fn: Callable, structure: PyTree[jax.ShapeDtypeStruct], tags: frozenset[object]
) -> lx.FunctionLinearOperator:
    """The linear map `fn` on `structure` as a `lineax.FunctionLinearOperator`.

    What `lineax.linearise` of a matrix-free curvature operator returns: `fn` is the
    operator's product with its primal computation done once (a `jax.linearize`d
    tangent map, composed with its transpose for output-space operators), so each
    product costs only the tangent and cotangent passes. Iterative solvers (CG, GMRES,
    LSMR, BiCGStab) call `lineax.linearise` before iterating. The closed-over arrays
    are hoisted into the operator's PyTree (lineax closure-converts `fn`), and the tags
    are the original operator's.
    """
    return lx.FunctionLinearOperator(fn, structure, tags)
