r"""Guards against a known class of jaxlib CPU miscompiles, at the eqx_curv level.

jaxlib 0.10.2 compiled a broadcast product followed by a reduction wrongly on CPU once
the array passed 2^15 elements (2^14 in float64), upstream jax-ml/jax#39103. The softmax
output-space Hessian product, $p \odot (t - \langle p, t \rangle)$, is exactly that
pattern, and several vectors at once (`as_matrix`, `exact_diagonal`, batched
Hutchinson probes) push it past the threshold: the GGN came out 27-32% wrong. That
release is excluded in `pyproject.toml`; these tests compare the batched products with
one-vector products (which stay below the threshold), so they catch the next jaxlib that
breaks the same pattern.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


# 16 -> 32 -> 32 -> 5: 1,765 parameters. With a batch of 8 and 5 classes, products of
# all basis vectors at once hold 1,765 * 8 * 5 = 70,600 elements, above 2^15 and 2^14.
_BATCH, _IN, _CLASSES = 8, 16, 5


def _problem(dtype):
    import eqx_curv

    mkey, xkey, ykey = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(_IN, _CLASSES, 32, 2, activation=jnp.tanh, key=mkey, dtype=dtype)
    x = jax.random.normal(xkey, (_BATCH, _IN), dtype)
    y = jax.random.randint(ykey, (_BATCH,), 0, _CLASSES)
    return eqx_curv.GGNOperator(model, eqx_curv.SoftmaxCrossEntropy(), x, y)


def _columns_in_halves(operator, indices):
    params = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure()
    )
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    @eqx.filter_jit
    def column(op, j):
        e = jnp.zeros_like(flat).at[j].set(1)
        return jax.flatten_util.ravel_pytree(op.mv(unravel(e)))[0]

    return np.stack([np.asarray(column(operator, j)) for j in indices], axis=1)


def test_batched_softmax_ggn_products_match_one_vector_products():
    # float32: on jaxlib 0.10.2 this case fails (the float64 one did not, so it is left
    # out to keep the suite short).
    import eqx_curv

    dtype = jnp.float32

    operator = _problem(dtype)
    matrix = np.asarray(operator.as_matrix())
    n = matrix.shape[0]
    assert n * _BATCH * _CLASSES > 2**15
    indices = np.random.default_rng(0).choice(n, size=24, replace=False)
    expected = _columns_in_halves(operator, indices)
    rtol = 1e-4
    scale = np.abs(expected).max()
    np.testing.assert_allclose(
        matrix[:, indices], expected, rtol=rtol, atol=rtol * scale
    )
    diagonal = jax.flatten_util.ravel_pytree(eqx_curv.exact_diagonal(operator))[0]
    np.testing.assert_allclose(
        np.asarray(diagonal)[indices],
        expected[indices, np.arange(indices.size)],
        rtol=rtol,
        atol=rtol * scale,
    )


def test_batched_hutchinson_probes_match_one_probe_at_a_time():
    import eqx_curv

    operator = _problem(jnp.float32)
    # 1,024 probes at once: 1,024 * 8 * 5 = 40,960 output-space elements (> 2^15).
    key = jax.random.key(1)
    batched = eqx_curv.hutchinson_diagonal(operator, key, 1024)
    # 512 at a time stays below the threshold (20,480 elements); the draws are the same.
    in_halves = eqx_curv.hutchinson_diagonal(operator, key, 1024, batch_size=512)
    a = jax.flatten_util.ravel_pytree(batched)[0]
    b = jax.flatten_util.ravel_pytree(in_halves)[0]
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)
