"""Registries and small utilities shared by the tests.

Generic tests parametrize over the registries below, so that a new operator or optimizer
is enrolled in every generic test by adding one entry here.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Leafwise `numpy.testing.assert_allclose` over two PyTrees of the same structure."""
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def ravel(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def random_like(key, tree):
    """A standard-normal PyTree with the structure, shapes and dtypes of `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves)
        ],
    )
