r"""Estimates of an operator's diagonal, as a PyTree shaped like its input.

The diagonal is $\mathrm{diag}(A)_j = e_j^\top A e_j$, not $A \mathbf{1}$ (the row
sums, a common stand-in for "the diagonal of the Hessian" that is wrong wherever $A$
has off-diagonal entries).
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._misc import check_positive_int, zeros_from


def _check_square(operator, name: str) -> None:
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise TypeError(
            f"`{name}` needs a lineax linear operator (e.g. a `HessianOperator`), not "
            f"{type(operator).__name__}."
        )
    if jax.tree.structure(operator.in_structure()) != jax.tree.structure(
        operator.out_structure()
    ) or jax.tree.leaves(operator.in_structure()) != jax.tree.leaves(
        operator.out_structure()
    ):
        raise ValueError(
            f"`{name}` needs a square operator whose input and output structures "
            "agree; this one maps between different structures."
        )


def exact_diagonal(
    operator: lx.AbstractLinearOperator, *, batch_size: int | None = None
) -> PyTree[Array]:
    r"""The exact diagonal $A_{jj} = e_j^\top A e_j$, one product per unknown.

    Costs $n$ operator products for $n$ unknowns: for small problems and tests. The
    products are vmapped, `batch_size` at a time (all at once by default), through
    `jax.lax.map`, so memory is bounded by `batch_size` products.

    **Arguments:**

    - `operator`: a square lineax operator over a PyTree, e.g. a `HessianOperator`.
    - `batch_size`: how many basis vectors to push through the operator at once.

    **Returns:**

    A PyTree with the structure of `operator.in_structure()` holding the diagonal.
    """
    _check_square(operator, "exact_diagonal")
    operator = lx.linearise(operator)
    flat, unravel = jax.flatten_util.ravel_pytree(zeros_from(operator.in_structure()))
    size = flat.size

    def entry(j):
        e = jnp.zeros(size, flat.dtype).at[j].set(1)
        return jax.flatten_util.ravel_pytree(operator.mv(unravel(e)))[0][j]

    diag = jax.lax.map(entry, jnp.arange(size), batch_size=batch_size or size)
    return unravel(diag)


def rademacher_like(
    key: PRNGKeyArray, structure: PyTree[jax.ShapeDtypeStruct]
) -> PyTree[Array]:
    """A Rademacher probe (entries +-1, independent) shaped like `structure`."""
    leaves, treedef = jax.tree.flatten(structure)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.rademacher(k, s.shape, s.dtype) for k, s in zip(keys, leaves)],
    )


def hutchinson_diagonal(
    operator: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    num_samples: int,
    *,
    batch_size: int | None = None,
) -> PyTree[Array]:
    r"""Hutchinson's estimate $\frac1S \sum_s z_s \odot A z_s$ of the diagonal.

    With Rademacher probes $z$ (entries $\pm 1$), $\mathbb{E}[z \odot Az] =
    \mathrm{diag}(A)$ and the variance of entry $j$ is $\sum_{k \ne j} A_{jk}^2$ per
    sample (Bekas, Kokiopoulou and Saad, "An estimator for the diagonal of a matrix",
    Applied Numerical Mathematics 57(11), 2007). This is the estimate AdaHessian uses.

    **Arguments:**

    - `operator`: a square lineax operator over a PyTree.
    - `key`: the key the probes are drawn from.
    - `num_samples`: the number of probes $S$.
    - `batch_size`: how many probes to push through the operator at once (all by
        default).

    **Returns:**

    A PyTree with the structure of `operator.in_structure()`.
    """
    _check_square(operator, "hutchinson_diagonal")
    check_positive_int(num_samples, "num_samples", "the number of probes")
    operator = lx.linearise(operator)
    structure = operator.in_structure()

    def estimate(k):
        z = rademacher_like(k, structure)
        return jax.tree.map(jnp.multiply, z, operator.mv(z))

    samples = jax.lax.map(
        estimate,
        jax.random.split(key, num_samples),
        batch_size=batch_size or num_samples,
    )
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), samples)
