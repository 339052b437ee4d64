"""Shampoo, SOAP and Muon against dense float64 references (numpy.linalg.eigh).

The references are written independently of the library's blocking: blocks are plain
slices of the merged tensor (never padded), statistics are unfoldings times their
transposes, and roots and eigenbases come from `numpy.linalg.eigh`. Each optimizer is
driven through its optax form on a dict of parameters, with a fixed sequence of
random gradients, so that one compilation serves every step.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


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


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_shampoo_equals_dense_eigh_reference_with_blocks_merging_and_every_k(
    root_method,
):
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
        root_method=root_method,
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


# SOAP: a square matrix, an order-3 tensor, a matrix rotated on one side only (20 >
# max_precond_dim = 10) and a vector (plain Adam).
_SOAP_SHAPES = {
    "square": ((5, 5), (5, 5), (5, 5)),
    "order3": ((3, 4, 5), (3, 4, 5), (3, 4, 5)),
    "one_sided": ((4, 20), (4, 20), (4, 20)),
    "vector": ((5,), None, None),
}


def _soap_reference(gradient_list, b1, b2, eps, every, refresh):
    """Dense SOAP updates (learning rate 1): Adam in the eigenbasis of the statistics,
    refreshed at the multiples of `every` (`"eigh"`, or after step 0 one sorted
    power step and a QR), V permuted with the sort of the basis."""
    state = {}
    directions = []
    for t, grads in enumerate(gradient_list):
        step = {}
        for name, (shape, merged, _) in _SOAP_SHAPES.items():
            g = grads[name]
            s = state.setdefault(name, {"m": 0, "v": np.zeros(shape), "L": {}, "Q": {}})
            s["m"] = b1 * s["m"] + (1 - b1) * g
            axes = [] if merged is None else [a for a, d in enumerate(shape) if d <= 10]
            for axis in axes:
                gram = _unfold(g, axis) @ _unfold(g, axis).T
                s["L"][axis] = b2 * s["L"].get(axis, 0) + (1 - b2) * gram
                if t % every:
                    continue
                if refresh == "eigh" or t == 0:
                    s["Q"][axis] = np.linalg.eigh(s["L"][axis])[1][:, ::-1]
                else:
                    q = s["Q"][axis]
                    order = np.argsort(-np.diag(q.T @ s["L"][axis] @ q), kind="stable")
                    s["v"] = np.take(s["v"], order, axis=axis)
                    s["Q"][axis] = np.linalg.qr(s["L"][axis] @ q[:, order])[0]
            rg, rm = g, s["m"]
            for axis in axes:
                rg = _mode_product(rg, s["Q"][axis].T, axis)
                rm = _mode_product(rm, s["Q"][axis].T, axis)
            s["v"] = b2 * s["v"] + (1 - b2) * rg**2
            n = (rm / (1 - b1 ** (t + 1))) / (
                np.sqrt(s["v"] / (1 - b2 ** (t + 1))) + eps
            )
            for axis in axes:
                n = _mode_product(n, s["Q"][axis], axis)
            step[name] = n
        directions.append(step)
    return directions


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
def test_soap_is_adam_in_the_eigenbasis(refresh):
    import eqx_curv

    every = 1 if refresh == "eigh" else 2
    gradients = _gradients(5, seed=2, shapes=_SOAP_SHAPES)
    opt = eqx_curv.SOAP(
        learning_rate=1.0,
        momentum=0.9,
        decay=0.8,
        # At step 0 the rotated gradient of the square matrix is diagonal (its SVD):
        # the other entries are rounding, which a tiny epsilon would blow up to
        # rounding / epsilon.
        epsilon=1e-3,
        refresh_every=every,
        max_precond_dim=10,
        refresh=refresh,
    )
    ours, _ = _run_optax(opt.as_optax(), gradients)
    expected = _soap_reference(gradients, 0.9, 0.8, 1e-3, every, refresh)
    for t, (u, d) in enumerate(zip(ours, expected)):
        for name in _SOAP_SHAPES:
            np.testing.assert_allclose(
                -u[name], d[name], rtol=1e-8, atol=1e-10, err_msg=f"{name}, step {t}"
            )


def _products_outside_conditionals(jaxpr) -> int:
    """The matrix products of a jaxpr, inner `jit`s included, `cond` branches not."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += 1
        elif eqn.primitive.name in ("jit", "pjit"):
            count += _products_outside_conditionals(eqn.params["jaxpr"].jaxpr)
    return count


def test_soap_step_rotates_only_the_gradient_in_and_the_step_out():
    # Structural: outside the refresh's `lax.cond`, a SOAP step on one matrix makes
    # six products: the two statistics, the gradient into the basis (two sides) and
    # the normalised step out of it (two sides). With the first moment kept in
    # parameter space it also rotated M in at every step: eight.
    import eqx_curv

    tx = eqx_curv.SOAP().as_optax()
    params = {"w": jnp.ones((5, 6)), "b": jnp.ones(3)}
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    assert _products_outside_conditionals(jaxpr.jaxpr) == 6


# ---------------------------------------------------------------------------------------
# Muon.


class _Layers(eqx.Module):
    """An embedding, a convolution, a tall hidden layer and a head (not called)."""

    embedding: eqx.nn.Embedding
    conv: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
        self.embedding = eqx.nn.Embedding(10, 6, key=k1)
        self.conv = eqx.nn.Conv2d(2, 4, 3, key=k2)
        self.hidden = eqx.nn.Linear(6, 16, key=k3)
        self.head = eqx.nn.Linear(16, 3, key=k4)


def _quintic_band(low):
    """Where five steps of Muon's quintic take singular values from [low, 1]."""
    import eqx_curv

    a, b, c = eqx_curv.MUON_COEFFICIENTS
    x = np.linspace(low, 1, 100_001)
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    return x.min(), x.max()


def test_muon_orthogonalises_hidden_matrices_and_adams_the_rest():
    import eqx_curv

    params = eqx.filter(_Layers(), eqx.is_inexact_array)
    mask = eqx_curv.hidden_matrices(params)
    assert mask.conv.weight and mask.hidden.weight
    assert not (mask.head.weight or mask.embedding.weight or mask.hidden.bias)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(3)
    gradients = [
        jax.tree.unflatten(treedef, [rng.standard_normal(x.shape) for x in leaves])
        for _ in range(2)
    ]
    opt = eqx_curv.Muon(learning_rate=0.5, momentum=0.0, adam_learning_rate=0.1)
    ours, _ = _run_optax(opt.as_optax(), gradients, params)
    for t, (u, g) in enumerate(zip(ours, gradients)):
        for name, rows, cols in [("conv", 4, 18), ("hidden", 16, 6)]:
            matrix = np.asarray(getattr(g, name).weight).reshape(rows, cols)
            update = np.asarray(getattr(u, name).weight).reshape(rows, cols)
            scale = np.sqrt(max(1, rows / cols))
            singular = np.linalg.svd(-update / (0.5 * scale), compute_uv=False)
            # Newton-Schulz acts on each singular value sigma / ||G||_F alone, by
            # the quintic five times; the singular vectors are the momentum's.
            sigma = np.linalg.svd(matrix, compute_uv=False)
            x = sigma / np.linalg.norm(matrix)
            a, b, c = eqx_curv.MUON_COEFFICIENTS
            for _ in range(5):
                x = a * x + b * x**3 + c * x**5
            np.testing.assert_allclose(np.sort(singular), np.sort(x), rtol=1e-6)
            low, high = _quintic_band(sigma.min() / np.linalg.norm(matrix))
            assert low <= singular.min() and singular.max() <= high
            assert 0.6 < low and high < 1.25, (low, high)
        # Every other parameter takes Adam (the first moment of these two steps).
        for get in [lambda p: p.head.weight, lambda p: p.embedding.weight]:
            gs = np.stack([np.asarray(get(gr)) for gr in gradients[: t + 1]])
            w1 = 0.1 * 0.9 ** np.arange(t, -1, -1)
            w2 = 0.001 * 0.999 ** np.arange(t, -1, -1)
            m = np.tensordot(w1, gs, axes=1) / (1 - 0.9 ** (t + 1))
            v = np.tensordot(w2, gs**2, axes=1) / (1 - 0.999 ** (t + 1))
            np.testing.assert_allclose(
                np.asarray(get(u)), -0.1 * m / (np.sqrt(v) + 1e-8), rtol=1e-10
            )


def test_muon_hidden_override():
    import eqx_curv

    params = eqx.filter(_Layers(), eqx.is_inexact_array)
    every_matrix = eqx_curv.Muon(
        hidden=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    )
    state = every_matrix.init(params)
    # The head and the embedding are now hidden matrices (no Adam second moment);
    # the 4-D convolution kernel is not.
    mask = [v is None for v in state.stats.second]
    assert mask == [x.ndim == 2 for x in jax.tree.leaves(params)]
    with pytest.raises(ValueError, match="`hidden"):
        eqx_curv.Muon(hidden=lambda p: jax.tree.map(lambda x: True, p)).init(params)
    with pytest.raises(ValueError, match="`hidden"):
        eqx_curv.Muon(hidden=lambda p: [True]).init(params)


# ---------------------------------------------------------------------------------------
# The three together: optax form, digits, misuse.


def _mlp():
    return eqx.nn.MLP(4, 4, 4, 1, jnp.tanh, key=jax.random.key(0))


@pytest.mark.parametrize("name", ["shampoo", "soap", "muon"])
def test_optax_form_gives_the_updates_of_step(name):
    import eqx_curv

    opt = {
        "shampoo": eqx_curv.Shampoo(
            learning_rate=0.1, root_every=2, nesterov=True, weight_decay=0.1
        ),
        "soap": eqx_curv.SOAP(refresh_every=2, weight_decay=0.1),
        "muon": eqx_curv.Muon(weight_decay=0.1),
    }[name]
    model = _mlp()
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (8, 4))
    y = jax.random.randint(ky, (8,), 0, 4)
    loss = eqx_curv.SoftmaxCrossEntropy()
    step = eqx.filter_jit(lambda m, s: opt.step(m, s, loss, x, y))
    tx = opt.as_optax()
    update = jax.jit(tx.update)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, tx_state = opt.init(model), tx.init(params)
    grad = eqx.filter_jit(
        lambda p: eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(
            eqx.combine(p, static)
        )
    )
    for _ in range(3):
        model, state, _ = step(model, state)
        updates, tx_state = update(grad(params), tx_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        flat = jax.flatten_util.ravel_pytree
        np.testing.assert_allclose(
            flat(eqx.filter(model, eqx.is_inexact_array))[0],
            flat(params)[0],
            # The same arithmetic, fused differently by XLA; eigenvectors of nearly
            # equal eigenvalues (SOAP's basis) amplify the last bits a little.
            rtol=1e-8,
        )


@pytest.mark.slow  # two optimised compilations of a Shampoo step: ~11 s
def test_compiled_step_grows_linearly_with_the_number_of_layers():
    # Structural, not timed: the optimized HLO of the step for 11/3 times the
    # parameter leaves (MLPs of depth 2 and 10: 6 and 22 leaves) is at most 11/3
    # times as large (2 times here). When every leaf's non-finite guard was a select
    # on a chain of every leaf's finiteness, XLA copied that chain into each select:
    # 5.2 times here, and minutes of compilation for Shampoo and SOAP on TinyViT.
    import eqx_curv

    opt = eqx_curv.Shampoo()
    loss = eqx_curv.SoftmaxCrossEntropy()
    x = jnp.zeros((8, 4))
    y = jnp.zeros((8,), jnp.int32)
    sizes = []
    for depth in (2, 10):
        model = eqx.nn.MLP(4, 3, 4, depth, key=jax.random.key(0))
        step = eqx.filter_jit(lambda o, m, s: o.step(m, s, loss, x, y))
        compiled = step.lower(opt, model, opt.init(model)).compile()
        sizes.append(compiled.compiled.as_text().count(" = "))
    assert 3 * sizes[1] <= 11 * sizes[0], sizes


@pytest.mark.slow  # three optimizers trained on digits: run with `-m slow`
def test_defaults_train_digits_further_than_sgd():
    import eqx_curv
    from eqx_curv.experiments.data import digits

    inputs, labels = digits()
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    model = eqx.nn.MLP(
        64, 10, 32, 1, jnp.tanh, key=jax.random.key(0), dtype=jnp.float32
    )
    loss = eqx_curv.SoftmaxCrossEntropy()
    params, static = eqx.partition(model, eqx.is_array)
    batches = jax.random.choice(
        jax.random.key(1), labels.shape[0], (100, 64), replace=True
    )

    def train(opt):
        def body(carry, batch):
            params, state = carry
            new, state, _ = opt.step(
                eqx.combine(params, static), state, loss, inputs[batch], labels[batch]
            )
            return (eqx.filter(new, eqx.is_array), state), None

        (trained, _), _ = jax.lax.scan(body, (params, opt.init(model)), batches)
        return loss(jax.vmap(eqx.combine(trained, static))(inputs), labels)

    train = eqx.filter_jit(train)
    sgd = float(train(eqx_curv.SGD()))
    for opt in [eqx_curv.Shampoo(), eqx_curv.SOAP(), eqx_curv.Muon()]:
        assert float(train(opt)) < sgd, type(opt).__name__


def test_bad_hyperparameters_are_sentences():
    import eqx_curv

    for block_size in [0, -3, True]:
        with pytest.raises(ValueError, match="`block_size` must be a positive"):
            eqx_curv.Shampoo(block_size=block_size)
    for p in [0, -4, True]:
        with pytest.raises(ValueError, match="`root_exponent` must be a positive"):
            eqx_curv.Shampoo(root_exponent=p)
    # Non-integers: jaxtyping's check under pytest, the class's own sentence outside;
    # either names the argument.
    with pytest.raises((ValueError, TypeError), match="block_size"):
        eqx_curv.Shampoo(block_size=2.5)  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="root_exponent"):
        eqx_curv.Shampoo(root_exponent=4.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`epsilon` must be a finite positive"):
        eqx_curv.Shampoo(epsilon=-1e-6)
    with pytest.raises(ValueError, match="`epsilon` must be a finite positive"):
        eqx_curv.SOAP(epsilon=-1e-8)
    with pytest.raises(ValueError, match="`epsilon` must be a finite positive"):
        eqx_curv.Muon(epsilon=-1e-8)
    for cls in [eqx_curv.Shampoo, eqx_curv.SOAP, eqx_curv.Muon]:
        with pytest.raises(ValueError, match="`learning_rate` must be non-negative"):
            cls(learning_rate=-1e-3)
    with pytest.raises(ValueError, match="`adam_learning_rate` must be non-negative"):
        eqx_curv.Muon(adam_learning_rate=-1e-3)
    with pytest.raises(ValueError, match="`root_every` must be a positive"):
        eqx_curv.Shampoo(root_every=0)
    with pytest.raises(ValueError, match="`start_step` must be non-negative"):
        eqx_curv.Shampoo(start_step=-1)
    with pytest.raises(ValueError, match="`decay` must lie in"):
        eqx_curv.Shampoo(decay=0.0)
    with pytest.raises(ValueError, match="`refresh_every` must be a positive"):
        eqx_curv.SOAP(refresh_every=0)
    with pytest.raises((ValueError, TypeError), match="grafting"):
        eqx_curv.Shampoo(grafting="adagrad")  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="root_method"):
        eqx_curv.Shampoo(root_method="svd")  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="refresh"):
        eqx_curv.SOAP(refresh="svd")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`ns_steps` must be a positive"):
        eqx_curv.Muon(ns_steps=0)
