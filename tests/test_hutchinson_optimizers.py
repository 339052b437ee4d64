"""AdaHessian and the stochastic diagonal Newton method: the one-pass gradient and
Hutchinson diagonal against dense float64 oracles, the update rules against
hand-written references, convolution-kernel averaging, the sign and zero-curvature
guards, the clipping options, and the misuse sentences.

The protocol (training, dtypes, non-finite skipping, serialisation, dropout keys)
is `tests/test_network_optimizers.py`, through `helpers.NETWORK_OPTIMIZERS`.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from models import ConvNet


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def _objective(model, x, y, loss=None):
    import eqx_curv
    from eqx_curv._network_optimizers.base import Objective

    loss = eqx_curv.SoftmaxCrossEntropy() if loss is None else loss
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return Objective(static, loss, x, y, None), params


def _mlp_problem(activation=jnp.tanh, seed=0):
    kx, ky, km = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (6, 3), jnp.float64)
    y = jax.random.randint(ky, (6,), 0, 2)
    model = eqx.nn.MLP(3, 2, 3, 1, activation, key=km, dtype=jnp.float64)
    return model, x, y


def _reverse_over_reverse_hvp(f):
    """`(t, z) -> H z` by differentiating `grad(f)(t) . z` (reverse over reverse): a
    second way to the product than the library's forward over reverse."""
    return jax.jit(jax.grad(lambda t, z: jnp.vdot(jax.grad(f)(t), z)))


def _hadamard_probes(params, size):
    """Rows of a Sylvester-Hadamard matrix as probes: their columns are orthogonal,
    so the mean of z * Az over the rows is diag(A) exactly."""
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    assert flat.size <= h.shape[0]
    return jax.vmap(unravel)(jnp.asarray(h[:, : flat.size], flat.dtype))


# ---------------------------------------------------------------------------------------
# The one-pass gradient and Hutchinson diagonal.


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_one_pass_gradient_and_diagonal_match_dense_oracles(curvature):
    import eqx_curv
    from eqx_curv._network_optimizers.hutchinson import (
        gradient_and_diagonal,
        gradient_and_products,
    )

    model, x, y = _mlp_problem()
    objective, params = _objective(model, x, y)
    if curvature == "hessian":
        operator = eqx_curv.HessianOperator(objective.value, params)
    else:
        operator = eqx_curv.GGNOperator(model, objective.loss, x)
    exact = _flat(eqx.filter_jit(eqx_curv.exact_diagonal)(operator))
    dense = np.asarray(eqx.filter_jit(lambda op: op.as_matrix())(operator))

    probes = _hadamard_probes(params, 32)
    one = jax.tree.map(lambda p: p[:1], probes)
    num = 2000

    @eqx.filter_jit
    def run(objective, params, probes, one, key):
        return (
            gradient_and_products(objective, params, probes, curvature),
            gradient_and_products(objective, params, one, curvature),
            gradient_and_diagonal(objective, params, key, num, curvature)[2],
            objective.value(params),
            jax.grad(objective.value)(params),
        )

    (value, grads, products), (_, grads_one, product_one), estimate, f, g = run(
        objective, params, probes, one, jax.random.key(3)
    )
    np.testing.assert_allclose(value, f, rtol=1e-14)
    np.testing.assert_allclose(_flat(grads), _flat(g), rtol=1e-12)
    # Every product is A z, and the Hadamard average is the exact diagonal.
    z = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(probes)
    az = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(products)
    np.testing.assert_allclose(az, z @ dense.T, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.mean(z * az, axis=0), exact, atol=1e-13)
    # One probe takes the single-jvp path: the same product.
    np.testing.assert_allclose(_flat(grads_one), _flat(grads), rtol=1e-13)
    np.testing.assert_allclose(_flat(product_one), az[0], rtol=1e-10, atol=1e-14)
    # Random probes from a key: the mean over many is the diagonal, to within the
    # estimator's standard error (the off-diagonal mass of each row).
    off_diagonal = np.sqrt(np.sum(dense**2, axis=1) - np.diag(dense) ** 2)
    np.testing.assert_array_less(
        np.abs(_flat(estimate) - exact), 5 * off_diagonal / np.sqrt(num) + 1e-12
    )


# ---------------------------------------------------------------------------------------
# AdaHessian.


def _own_probe(key, params):
    """The probe a step with `key` draws (the documented split)."""
    from eqx_curv._network_optimizers.hutchinson import rademacher_probes

    own_key = jax.random.split(key)[1]
    return _flat(jax.tree.map(lambda z: z[0], rademacher_probes(own_key, params, 1)))


def test_adahessian_matches_the_papers_update():
    import eqx_curv

    lr, b1, b2, k, eps, wd = 0.1, 0.8, 0.9, 0.5, 1e-3, 0.01
    opt = eqx_curv.AdaHessian(
        learning_rate=lr,
        momentum=b1,
        hessian_decay=b2,
        hessian_power=k,
        damping=eps,
        weight_decay=wd,
    )
    model, x, y = _mlp_problem()
    objective, params = _objective(model, x, y)
    theta, unravel = jax.flatten_util.ravel_pytree(params)
    theta = np.asarray(theta)

    def flat_loss(t):
        return objective.value(unravel(t))

    gradient, hvp = jax.jit(jax.grad(flat_loss)), _reverse_over_reverse_hvp(flat_loss)
    step = eqx.filter_jit(opt.step)
    state = opt.init(model)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, key in enumerate(jax.random.split(jax.random.key(4), 3), start=1):
        z = _own_probe(key, params)
        g = np.asarray(gradient(theta))
        d = z * np.asarray(hvp(theta, z))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d**2
        denominator = np.sqrt(v / (1 - b2**t)) ** k + eps
        theta = theta - lr * (m / (1 - b1**t) / denominator + wd * theta)
        model, state, info = step(model, state, objective.loss, x, y, key=key)
        np.testing.assert_allclose(
            _flat(eqx.filter(model, eqx.is_inexact_array)), theta, rtol=1e-12
        )
        np.testing.assert_allclose(_flat(state.stats.hessian), v, rtol=1e-12)
        np.testing.assert_allclose(
            info.stats["hessian_diagonal"], np.mean(np.abs(d)), rtol=1e-12
        )


def test_adahessian_averages_conv_kernels_over_their_spatial_axes():
    import eqx_curv

    kx, ky = jax.random.split(jax.random.key(5))
    model = ConvNet(jax.random.key(6), jnp.float64)
    x = jax.random.normal(kx, (4, 1, 6, 6), jnp.float64)
    y = jax.random.randint(ky, (4,), 0, 3)
    objective, params = _objective(model, x, y)
    key = jax.random.key(7)
    z = _own_probe(key, params)
    theta, unravel = jax.flatten_util.ravel_pytree(params)
    hvp = _reverse_over_reverse_hvp(lambda t: objective.value(unravel(t)))
    d = unravel(jnp.asarray(z * np.asarray(hvp(theta, z))))
    # The reference: |D| averaged over the 3x3 window of each (out, in) channel pair
    # of the conv kernel; the conv bias and the linear layer as they are.
    kernel = np.asarray(d.conv.weight)
    averaged = np.broadcast_to(
        np.abs(kernel).mean(axis=(2, 3), keepdims=True), kernel.shape
    )
    expected = eqx.tree_at(lambda p: p.conv.weight, d, jnp.asarray(averaged))

    # With no averaging in time (hessian_decay=0), v is the squared estimate.
    opt = eqx_curv.AdaHessian(hessian_decay=0.0)
    step = eqx.filter_jit(opt.step)
    _, state, _ = step(model, opt.init(model), objective.loss, x, y, key=key)
    np.testing.assert_allclose(
        _flat(state.stats.hessian), _flat(expected) ** 2, rtol=1e-10, atol=1e-20
    )
    assert not np.allclose(averaged, np.abs(kernel))  # the averaging did something


def test_conv_kernels_are_found_by_module_type():
    from eqx_curv._network_optimizers.hutchinson import conv_spatial_dims

    def build():
        keys = jax.random.split(jax.random.key(0), 4)
        return [
            eqx.nn.Conv1d(2, 3, 3, key=keys[0]),
            eqx.nn.Conv3d(1, 2, 2, use_bias=False, key=keys[1]),
            eqx.nn.ConvTranspose2d(2, 2, 3, key=keys[2]),
            eqx.nn.Linear(4, 4, key=keys[3]),
            jnp.zeros((2, 2, 2, 2)),  # a 4-D array that is not a kernel
        ]

    # Shapes only (no initialisation to run), then NumPy zeros as the arrays.
    model = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), eqx.filter_eval_shape(build)
    )
    dims = conv_spatial_dims(eqx.filter(model, eqx.is_inexact_array))
    assert jax.tree.leaves(dims) == [1, 0, 3, 2, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------
# The stochastic diagonal Newton method.


class _Sine(eqx.Module):
    """`sin(w * x)` per output: a diagonal Hessian, negative where sin(w x) and the
    residual sin(w x) - y have the same sign and the cosine is small."""

    w: jax.Array

    def __call__(self, x):
        return jnp.sin(self.w * x)


def test_diagonal_newton_never_steps_uphill_on_negative_curvature():
    import eqx_curv

    model = _Sine(jnp.array([1.4, 1.5, 0.3], jnp.float64))
    x = jnp.ones((1, 3), jnp.float64)
    y = jnp.array([[-1.0, -1.0, 0.5]], jnp.float64)
    loss = eqx_curv.MeanSquaredError()
    objective, params = _objective(model, x, y, loss)
    diagonal = np.asarray(
        jnp.diag(jax.hessian(lambda w: objective.value(_Sine(w)))(model.w))
    )
    assert (diagonal[:2] < 0).all() and diagonal[2] > 0

    # The Hessian is diagonal, so one probe gives it exactly; without the absolute
    # value, g / D would climb on the first two coordinates.
    lr = 0.05
    gradient = jax.jit(jax.grad(lambda w: objective.value(_Sine(w))))
    g = np.asarray(gradient(model.w))
    naive = model.w - lr * g / diagonal
    assert objective.value(_Sine(naive)) > objective.value(params)

    opt = eqx_curv.StochasticDiagonalNewton(learning_rate=lr, decay=0.0)
    step = eqx.filter_jit(opt.step)
    state = opt.init(model)
    losses = []
    for key in jax.random.split(jax.random.key(8), 5):
        new, state, info = step(model, state, loss, x, y, key=key)
        grad = gradient(model.w)
        assert float(jnp.dot(grad, new.w - model.w)) < 0
        model = new
        losses.append(float(info.loss))
    losses.append(float(objective.value(eqx.filter(model, eqx.is_inexact_array))))
    assert float(info.stats["negative_fraction"]) > 0
    assert all(b < a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_diagonal_newton_dead_relu_units_get_finite_zero_steps(curvature):
    import eqx_curv

    model, x, y = _mlp_problem(jax.nn.relu)
    # Every hidden unit dead: the first layer's gradient and curvature are exactly 0.
    first = model.layers[0]
    model = eqx.tree_at(lambda m: m.layers[0].bias, model, first.bias - 100.0)
    loss = eqx_curv.SoftmaxCrossEntropy()
    # The default damping for one, a zero damping with a floor for the other.
    if curvature == "hessian":
        opt = eqx_curv.StochasticDiagonalNewton()
    else:
        opt = eqx_curv.StochasticDiagonalNewton(
            curvature="ggn", damping=0.0, min_diagonal=0.5
        )
    new, _, info = eqx.filter_jit(opt.step)(
        model, opt.init(model), loss, x, y, key=jax.random.key(9)
    )
    assert not bool(info.skipped)
    flat = _flat(eqx.filter(new, eqx.is_inexact_array))
    assert np.isfinite(flat).all()
    np.testing.assert_array_equal(new.layers[0].weight, model.layers[0].weight)
    # The read-out's bias still learns.
    assert not np.array_equal(new.layers[1].bias, model.layers[1].bias)


def test_diagonal_newton_matches_its_documented_update():
    import eqx_curv
    from eqx_curv._network_optimizers.hutchinson import gradient_and_diagonal

    model, x, y = _mlp_problem()
    objective, params = _objective(model, x, y)
    lr, decay, damping, low, high, clip = 0.5, 0.5, 1e-3, 0.02, 0.05, 0.3
    opt = eqx_curv.StochasticDiagonalNewton(
        learning_rate=lr,
        num_probes=2,
        decay=decay,
        damping=damping,
        min_diagonal=low,
        max_diagonal=high,
        update_clip=clip,
    )
    step = eqx.filter_jit(opt.step)
    diagonal = eqx.filter_jit(gradient_and_diagonal)
    state = opt.init(model)
    average = np.zeros(_flat(params).size)
    for t, key in enumerate(jax.random.split(jax.random.key(10), 2), start=1):
        params = eqx.filter(model, eqx.is_inexact_array)
        own_key = jax.random.split(key)[1]
        _, grads, estimate = diagonal(objective, params, own_key, 2)
        g, d = _flat(grads), _flat(estimate)
        # The EMA of the signed estimate, bias-corrected; |.| + damping, clipped; the
        # Newton step, clipped.
        average = decay * average + (1 - decay) * d
        corrected = average / (1 - decay**t)
        damped = np.abs(corrected) + damping
        divisor = np.clip(damped, low, high)
        newton = g / divisor
        expected = _flat(params) - lr * np.clip(newton, -clip, clip)

        model, state, info = step(model, state, objective.loss, x, y, key=key)
        np.testing.assert_allclose(
            _flat(eqx.filter(model, eqx.is_inexact_array)), expected, rtol=1e-12
        )
        np.testing.assert_allclose(_flat(state.stats.diagonal), average, rtol=1e-12)
        diagonal_changed = np.mean(divisor != damped)
        update_changed = np.mean(np.abs(newton) > clip)
        assert 0 < diagonal_changed < 1 and 0 < update_changed < 1  # both clips act
        expected_stats = {
            "diagonal": np.mean(corrected),
            "negative_fraction": np.mean(corrected < 0),
            "curvature": np.mean(divisor),
            "diagonal_clipped_fraction": diagonal_changed,
            "update_clipped_fraction": update_changed,
        }
        for name, value in expected_stats.items():
            np.testing.assert_allclose(info.stats[name], value, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Misuse: a sentence naming the argument.


def test_bad_hyperparameters_are_sentences():
    import eqx_curv

    A, N = eqx_curv.AdaHessian, eqx_curv.StochasticDiagonalNewton
    cases = [
        (lambda: A(learning_rate=-0.1), "`learning_rate` must be non-negative"),
        (lambda: N(learning_rate=-0.1), "`learning_rate` must be non-negative"),
        (lambda: A(damping=0.0), "`damping` must be a finite positive"),
        (lambda: A(damping=-1.0), "`damping` must be a finite positive"),
        (lambda: N(damping=-1.0), "`damping` must be a finite non-negative"),
        (lambda: N(damping=0.0), "`damping` is 0 and `min_diagonal`"),
        (lambda: A(hessian_power=0.0), r"`hessian_power` must lie in \(0, 1\]"),
        (lambda: A(hessian_power=1.5), r"`hessian_power` must lie in \(0, 1\]"),
        (lambda: A(momentum=1.0), r"`momentum` must lie in \[0, 1\)"),
        (lambda: A(hessian_decay=-0.1), r"`hessian_decay` must lie in \[0, 1\)"),
        (lambda: N(decay=1.0), r"`decay` must lie in \[0, 1\)"),
        (lambda: A(weight_decay=-1.0), "`weight_decay` must be a finite non-negative"),
        (lambda: A(num_probes=0), "`num_probes` must be a positive Python int"),
        (lambda: N(num_probes=True), "`num_probes` must be a positive Python int"),
        (
            lambda: N(min_diagonal=3.0, max_diagonal=0.5),
            r"`min_diagonal` \(3.0\) must not exceed `max_diagonal` \(0.5\)",
        ),
        (lambda: N(min_diagonal=-1.0), "`min_diagonal` must be a finite non-negative"),
        (lambda: N(max_diagonal=0.0), "`max_diagonal` must be positive"),
        (lambda: N(update_clip=0.0), "`update_clip` must be positive"),
        (lambda: N(curvature="fisher"), "curvature"),
        (lambda: A(spatial_averaging=1), "spatial_averaging"),
    ]
    for make, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            make()


def test_bad_step_arguments_are_sentences():
    import eqx_curv

    model, x, y = _mlp_problem()

    def plain_loss(outputs, targets):
        return eqx_curv.SoftmaxCrossEntropy()(outputs, targets)

    ggn = eqx_curv.StochasticDiagonalNewton(curvature="ggn")
    with pytest.raises(TypeError, match="`loss` must be an eqx_curv loss.*'ggn'"):
        ggn.step(model, ggn.init(model), plain_loss, x, y, key=jax.random.key(0))
    for opt in [eqx_curv.AdaHessian(), ggn]:
        with pytest.raises(ValueError, match="`key` is needed"):
            opt.step(model, opt.init(model), eqx_curv.SoftmaxCrossEntropy(), x, y)
        with pytest.raises(ValueError, match="no optax form"):
            opt.as_optax()
    # The Hessian form takes any callable loss.
    hessian = eqx_curv.StochasticDiagonalNewton()
    _, _, info = eqx.filter_jit(hessian.step)(
        model, hessian.init(model), plain_loss, x, y, key=jax.random.key(0)
    )
    assert not bool(info.skipped)
