"""A block-diagonal operator: one symmetric operator per part of a parameter PyTree."""

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import PyTree

from .base import AbstractCurvatureOperator


def _is_operator(x) -> bool:
    return isinstance(x, lx.AbstractLinearOperator)


class BlockDiagonalOperator(AbstractCurvatureOperator):
    r"""$\mathrm{blockdiag}(B_1, \dots, B_k)$ over a parameter PyTree.

    `blocks` is a PyTree whose leaves are symmetric lineax operators: one per parameter
    leaf or per layer (a block may itself act on a PyTree, e.g. a layer's weight and
    bias). The operator's input structure is `blocks` with every operator replaced by
    its `in_structure()`, and `mv` applies each block to its own part of the vector.
    For example, K-FAC's curvature is
    `BlockDiagonalOperator({"layer1": KroneckerOperator(A1, B1), ...})`.

    The operator is tagged symmetric, and positive semidefinite when every block is. Rows and
    columns of `as_matrix()` follow `jax.flatten_util.ravel_pytree` of the input
    structure, i.e. block by block in the order of `jax.tree.leaves(blocks)`.

    **Arguments:**

    - `blocks`: a PyTree of symmetric `lineax.AbstractLinearOperator`s (at least one).
    """

    blocks: PyTree[lx.AbstractLinearOperator]

    def __init__(self, blocks: PyTree[lx.AbstractLinearOperator]):
        leaves = jax.tree.leaves(blocks, is_leaf=_is_operator)
        if not leaves:
            raise ValueError("`blocks` must contain at least one operator.")
        for leaf in leaves:
            if not _is_operator(leaf):
                raise TypeError(
                    "Every leaf of `blocks` must be a lineax operator, but one is a "
                    f"{type(leaf).__name__}. Wrap arrays, e.g. "
                    "`lineax.DiagonalLinearOperator(d)` or "
                    "`lineax.MatrixLinearOperator(M, lineax.symmetric_tag)`."
                )
            if not lx.is_symmetric(leaf):
                raise ValueError(
                    f"Every block must be symmetric, but a {type(leaf).__name__} is "
                    "not reported symmetric; tag it with `lineax.symmetric_tag` if "
                    "it is."
                )
            if jax.tree.structure(leaf.in_structure()) != jax.tree.structure(
                leaf.out_structure()
            ):
                raise ValueError(
                    "Every block must map its input structure to itself (a square "
                    f"block), but a {type(leaf).__name__} does not."
                )
        self.blocks = blocks

    def _mv(self, vector):
        return jax.tree.map(
            lambda block, v: block.mv(v), self.blocks, vector, is_leaf=_is_operator
        )

    def in_structure(self):
        return jax.tree.map(
            lambda block: block.in_structure(), self.blocks, is_leaf=_is_operator
        )

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        # Symmetric because every block is (checked above); PSD when every block is.
        leaves = jax.tree.leaves(self.blocks, is_leaf=_is_operator)
        if all(lx.is_positive_semidefinite(leaf) for leaf in leaves):
            return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])
        return frozenset([lx.symmetric_tag])


@lx.diagonal.register(BlockDiagonalOperator)
def _(operator):
    leaves = jax.tree.leaves(operator.blocks, is_leaf=_is_operator)
    return jnp.concatenate([jnp.ravel(lx.diagonal(leaf)) for leaf in leaves])


@lx.linearise.register(BlockDiagonalOperator)
def _(operator):
    return BlockDiagonalOperator(
        jax.tree.map(lx.linearise, operator.blocks, is_leaf=_is_operator)
    )
