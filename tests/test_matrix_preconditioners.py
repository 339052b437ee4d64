"""Shampoo, SOAP and Muon against dense float64 references (numpy.linalg.eigh).

The references are written independently of the library's blocking: blocks are plain
slices of the merged tensor (never padded), statistics are unfoldings times their
transposes, and roots and eigenbases come from `numpy.linalg.eigh`. Each optimizer is
driven through its optax form on a dict of parameters, with a fixed sequence of
random gradients, so that one compilation serves every step.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


# name -> (shape, merged shape, block shape) for block_size = 5: a matrix blocked
# with a short last block (11 = 4 + 4 + 3), order-3 and order-4 tensors, a tensor
# whose small dimensions merge (1 x 2 x 2 -> 4) and then block (7 = 4 + 3), and a
# vector (the grafted diagonal method). Every block side is 4, so that the roots
# compile once per order (p = 4, 6, 8).
_SHAPES = {
    "matrix": ((8, 11), (8, 11), (4, 4)),
    "order3": ((4, 4, 4), (4, 4, 4), (4, 4, 4)),
    "order4": ((4, 4, 4, 4), (4, 4, 4, 4), (4, 4, 4, 4)),
    "merged": ((1, 2, 2, 7), (4, 7), (4, 4)),
    "vector": ((5,), None, None),
}


def _gradients(num_steps, seed=0, shapes=_SHAPES):
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape) for name, (shape, _, _) in shapes.items()}
        for _ in range(num_steps)
    ]


def _run_optax(tx, gradient_list, params=None):
    """The updates of `tx` for each gradient in turn (one jitted update)."""
    if params is None:
        params = jax.tree.map(jnp.zeros_like, gradient_list[0])
    update = jax.jit(tx.update)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    out = []
    for grads in gradient_list:
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
        out.append(jax.tree.map(np.asarray, updates))
    return out, state


def _block_slices(merged, block):
    """Every block of a merged tensor, as a tuple of slices (the last one shorter)."""
    ranges = [
        [slice(i, min(i + s, d)) for i in range(0, d, s)] for d, s in zip(merged, block)
    ]
    return list(itertools.product(*ranges))


def _unfold(x, axis):
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _mode_product(x, matrix, axis):
    return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)


def _inverse_root(matrix, p, epsilon):
    w, q = np.linalg.eigh(matrix)
    ridged = w + epsilon * w.max()
    return (q * ridged ** (-1.0 / p)) @ q.T


def _shampoo_reference(
    gradient_list, decay, epsilon, every, start=0, graft=False, shapes=_SHAPES
):
    """Dense Shampoo directions (no momentum, learning rate 1) for each step.

    Statistics are exponential averages, bias-corrected at root time; roots are
    computed at step `start` and at the later multiples of `every`, and kept until the
    next such step; before `start` the direction is Adam's (without momentum). With
    `graft`, each block takes the norm of the same block of Adam's direction.
    """
    stats, roots, second = {}, {}, {}
    directions = []
    for t, grads in enumerate(gradient_list):
        step = {}
        for name, (shape, merged, block) in shapes.items():
            g = grads[name]
            second[name] = decay * second.get(name, 0) + (1 - decay) * g**2
            correction = 1 - decay ** (t + 1)
            adam = g / (np.sqrt(second[name] / correction) + 1e-8)
            if merged is None:
                step[name] = adam
                continue
            g = g.reshape(merged)
            a = adam.reshape(merged)
            p = 2 * len(merged)
            out = np.zeros(merged)
            for index, slices in enumerate(_block_slices(merged, block)):
                gb = g[slices]
                for axis in range(gb.ndim):
                    gram = _unfold(gb, axis) @ _unfold(gb, axis).T
                    key = (name, index, axis)
                    stats[key] = decay * stats.get(key, 0) + (1 - decay) * gram
                    if t == start or (t > start and t % every == 0):
                        roots[key] = _inverse_root(stats[key] / correction, p, epsilon)
                if t < start:
                    continue
                pb = gb
                for axis in range(gb.ndim):
                    pb = _mode_product(pb, roots[(name, index, axis)], axis)
                if graft:
                    pb = pb * np.linalg.norm(a[slices]) / np.linalg.norm(pb)
                out[slices] = pb
            step[name] = adam if t < start else out.reshape(shape)
        directions.append(step)
    return directions


def test_shampoo_equals_dense_eigh_reference_with_blocks_merging_and_every_k():
    import eqx_curv

    gradients = _gradients(8)
    # From step 2 on, the statistics have seen enough gradients to be full rank, so
    # that the (tiny) ridge, relative to a power-iteration estimate of the largest
    # eigenvalue, does not decide the roots.
    opt = eqx_curv.Shampoo(
        learning_rate=1.0,
        block_size=5,
        root_every=3,
        start_step=2,
        decay=0.9,
        epsilon=1e-10,
        grafting="none",
        momentum=0.0,
    )
    ours, state = _run_optax(opt.as_optax(), gradients)
    # Adam before step 2; then the roots of steps 2, 3 and 6: step t >= 2 uses those
    # of step max(2, 3 * floor(t / 3)).
    expected = _shampoo_reference(gradients, 0.9, 1e-10, every=3, start=2)
    for t, (u, d) in enumerate(zip(ours, expected)):
        for name in _SHAPES:
            np.testing.assert_allclose(
                -u[name], d[name], rtol=1e-9, atol=1e-12, err_msg=f"{name}, step {t}"
            )
    # The roots are not refreshed in between: with every step they differ.
    every_step = _shampoo_reference(gradients, 0.9, 1e-10, every=1, start=2)
    assert not np.allclose(every_step[5]["matrix"], expected[5]["matrix"])
    assert int(state.stats.failures) == 0


def test_shampoo_grafting_gives_the_grafted_norm_per_block():
    import eqx_curv

    shapes = {name: _SHAPES[name] for name in ("matrix", "vector")}
    gradients = _gradients(4, seed=1, shapes=shapes)
    opt = eqx_curv.Shampoo(
        learning_rate=1.0,
        block_size=5,
        start_step=2,
        decay=0.9,
        epsilon=1e-10,
        momentum=0.0,
    )
    ours, _ = _run_optax(opt.as_optax(), gradients)
    expected = _shampoo_reference(
        gradients, 0.9, 1e-10, every=10, start=2, graft=True, shapes=shapes
    )
    for u, d in zip(ours, expected):
        for name in shapes:
            np.testing.assert_allclose(-u[name], d[name], rtol=1e-9, atol=1e-12)
    # Block by block, the norm is that of Adam's direction (without momentum).
    g = np.stack([grads["matrix"] for grads in gradients])
    weights = 0.1 * 0.9 ** np.arange(3, -1, -1)
    v = np.tensordot(weights, g**2, axes=1) / (1 - 0.9**4)
    adam = g[-1] / (np.sqrt(v) + 1e-8)
    for slices in _block_slices((8, 11), (4, 4)):
        np.testing.assert_allclose(
            np.linalg.norm(ours[-1]["matrix"][slices]),
            np.linalg.norm(adam[slices]),
            rtol=1e-9,
        )
    # And it is not the Shampoo direction's own norm.
    raw = _shampoo_reference(gradients, 0.9, 1e-10, every=10, start=2, shapes=shapes)
    assert not np.isclose(
        np.linalg.norm(raw[-1]["matrix"][:4, :4]), np.linalg.norm(adam[:4, :4])
    )
