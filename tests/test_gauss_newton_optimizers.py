"""GaussNewton and NaturalGradient against dense float64 references on a tiny model.

The protocol (training, non-finite skipping, serialisation, dropout keys) runs in
`test_network_optimizers.py` through `helpers.NETWORK_OPTIMIZERS`; here, the step
itself: $-\\eta (G + \\lambda I)^{-1} g$ with $G$ from `jax.jacfwd` and the Hessian of
the mean loss in output space, through both solvers, the Fisher forms, the quadratic
model's step length, the damping rule and the misuse sentences.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree


def _problem(seed=0, batch=6):
    import eqx_curv

    kx, ky = jax.random.split(jax.random.key(seed + 1))
    model = eqx.nn.MLP(4, 3, 5, 1, jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(kx, (batch, 4), jnp.float64)
    y = jax.random.randint(ky, (batch,), 0, 3)
    return model, eqx_curv.SoftmaxCrossEntropy(), x, y


def _flat(model):
    return ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


def _dense(model, loss, x, y):
    """`(G, g)`: the GGN of the mean loss, J^T (d^2 L / do^2) J, and the gradient."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def outputs(f):
        return jax.vmap(eqx.combine(unravel(f), static))(x)

    o = outputs(flat)
    k = o.size
    jac = jax.jacfwd(outputs)(flat).reshape(k, -1)
    hess = jax.hessian(lambda o: loss(o, y))(o).reshape(k, k)
    grad = jax.grad(lambda f: loss(outputs(f), y))(flat)
    return np.asarray(jac.T @ hess @ jac), np.asarray(grad)


def _damped_step(model, loss, x, y, damping, lr):
    G, g = _dense(model, loss, x, y)
    return -lr * np.linalg.solve(G + damping * np.eye(len(g)), g)


@eqx.filter_jit
def _step(opt, model, state, loss, x, y, key=None):
    return opt.step(model, state, loss, x, y, key=key)


def _tight_cg():
    import eqx_curv

    return eqx_curv.CG(rtol=1e-13, atol=0.0, max_steps=500)


@pytest.mark.parametrize("solver", ["cg", "woodbury"])
def test_step_is_the_damped_gauss_newton_step(solver):
    import eqx_curv

    model, loss, x, y = _problem()
    opt = eqx_curv.GaussNewton(
        learning_rate=0.7,
        damping=0.3,
        solver=_tight_cg() if solver == "cg" else "woodbury",
        adaptive_damping=False,
    )
    new, _, info = _step(opt, model, opt.init(model), loss, x, y)
    expected = _damped_step(model, loss, x, y, 0.3, 0.7)
    np.testing.assert_allclose(_flat(new) - _flat(model), expected, rtol=1e-9)
    if solver == "cg":
        assert bool(info.stats["solver_converged"])
        assert 0 < int(info.stats["solver_steps"]) <= len(expected)


def test_natural_gradient_exact_is_gauss_newton():
    import eqx_curv

    model, loss, x, y = _problem(seed=3)
    kwargs = dict(damping=0.2, solver=_tight_cg(), adaptive_damping=False)
    gn = eqx_curv.GaussNewton(**kwargs)
    ng = eqx_curv.NaturalGradient(fisher="exact", **kwargs)
    a, _, _ = _step(gn, model, gn.init(model), loss, x, y)
    b, _, _ = _step(ng, model, ng.init(model), loss, x, y)
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-12)


def _curvature(opt, model, loss, x, y, key=None):
    """The step's curvature C and the batch-space factor V (C = V V^T), dense."""
    from eqx_curv._network_optimizers.base import Objective

    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    objective = Objective(static, loss, x, y, None)
    _, _, aux = opt.evaluate(objective, params, key)
    C = jax.vmap(lambda e: ravel_pytree(aux.operator.mv(unravel(e)))[0])(
        jnp.eye(flat.size)
    )
    V = None if aux.factor is None else np.asarray(aux.factor.as_matrix())
    return np.asarray(C), V


@pytest.mark.parametrize("fisher", ["ggn", "exact", "mc", "empirical"])
def test_curvature_and_its_batch_space_factor(fisher):
    import eqx_curv

    model, loss, x, y = _problem(seed=5)
    G, _ = _dense(model, loss, x, y)
    if fisher == "ggn":
        opt = eqx_curv.GaussNewton(solver="woodbury")
    else:
        opt = eqx_curv.NaturalGradient(fisher=fisher, solver="woodbury", num_samples=3)
    C, V = _curvature(opt, model, loss, x, y, jax.random.key(2))
    # The factor carries the 1/N of the mean loss: V V^T is the curvature itself.
    np.testing.assert_allclose(V @ V.T, C, rtol=1e-10, atol=1e-14)
    n = x.shape[0]
    if fisher in ("ggn", "exact"):
        np.testing.assert_allclose(C, G, rtol=1e-10, atol=1e-14)
        assert V.shape[1] == n * 3
    elif fisher == "empirical":
        params, static = eqx.partition(model, eqx.is_inexact_array)
        flat, unravel = ravel_pytree(params)
        per_example = jax.vmap(
            jax.grad(
                lambda f, xi, yi: loss(
                    eqx.combine(unravel(f), static)(xi)[None], yi[None]
                )
            ),
            in_axes=(None, 0, 0),
        )(flat, x, y)
        np.testing.assert_allclose(C, per_example.T @ per_example / n, rtol=1e-10)
        assert V.shape[1] == n
    else:
        assert V.shape[1] == n * 3


def test_monte_carlo_fisher_averages_to_the_exact_one():
    import eqx_curv

    model, loss, x, y = _problem(seed=7)
    G, _ = _dense(model, loss, x, y)
    C, _ = _curvature(
        eqx_curv.NaturalGradient(fisher="mc", num_samples=4000),
        model,
        loss,
        x,
        y,
        jax.random.key(11),
    )
    error = np.linalg.norm(C - G) / np.linalg.norm(G)
    assert error < 0.05, error
    # One sample per example is far off: the average is what converges.
    C1, _ = _curvature(
        eqx_curv.NaturalGradient(fisher="mc", num_samples=1),
        model,
        loss,
        x,
        y,
        jax.random.key(11),
    )
    assert np.linalg.norm(C1 - G) / np.linalg.norm(G) > 2 * error


def test_quadratic_model_step_length():
    import eqx_curv

    model, loss, x, y = _problem(seed=1)
    _, _, x2, y2 = _problem(seed=9)
    damping = 0.05
    # Two CG steps from the previous solution: an inexact d that is not the Galerkin
    # iterate of this system, so alpha* differs from 1.
    opt = eqx_curv.GaussNewton(
        damping=damping,
        solver=eqx_curv.CG(rtol=1e-13, atol=0.0, max_steps=2),
        adaptive_damping=False,
        adaptive_learning_rate=True,
        warm_start=True,
    )
    m1, state, info = _step(opt, model, opt.init(model), loss, x, y)
    # From zero, the k-th CG iterate minimises the model over a space holding
    # itself: alpha* = 1 up to rounding.
    np.testing.assert_allclose(info.stats["step_length"], 1, rtol=1e-9)
    m2, _, info = _step(opt, m1, state, loss, x2, y2)
    alpha = float(info.stats["step_length"])
    assert abs(alpha - 1) > 1e-2
    G, g = _dense(m1, loss, x2, y2)
    M = G + damping * np.eye(len(g))
    u = np.asarray(_flat(m2) - _flat(m1))
    # u = alpha* d minimises q(t) = g.(t d) + 1/2 (t d).M.(t d): q'(alpha*) = 0.
    np.testing.assert_allclose(g @ u + u @ M @ u, 0, atol=1e-10 * abs(g @ u))


def test_momentum_adds_the_last_update():
    import eqx_curv

    model, loss, x, y = _problem(seed=4)
    opt = eqx_curv.GaussNewton(
        learning_rate=0.5,
        damping=0.4,
        solver=_tight_cg(),
        adaptive_damping=False,
        momentum=0.6,
    )
    state = opt.init(model)
    m1, state, _ = _step(opt, model, state, loss, x, y)
    m2, state, _ = _step(opt, m1, state, loss, x, y)
    u1 = _flat(m1) - _flat(model)
    expected = _damped_step(m1, loss, x, y, 0.4, 0.5) + 0.6 * u1
    np.testing.assert_allclose(_flat(m2) - _flat(m1), expected, rtol=1e-9)


def test_warm_start_begins_at_the_last_solution():
    import eqx_curv

    model, loss, x, y = _problem(seed=6)
    # A zero learning rate keeps the parameters, so the second solve is the first one
    # again: started from its solution, CG has nothing left to do.
    opt = eqx_curv.GaussNewton(
        learning_rate=0.0, solver=_tight_cg(), adaptive_damping=False, warm_start=True
    )
    state = opt.init(model)
    _, state, first = _step(opt, model, state, loss, x, y)
    _, state, second = _step(opt, model, state, loss, x, y)
    assert int(first.stats["solver_steps"]) > 3
    assert int(second.stats["solver_steps"]) == 0


def test_damping_rises_after_a_bad_step_and_falls_after_a_good_one():
    import eqx_curv

    model, loss, x, y = _problem(seed=8)
    # Far too long a step: the batch loss rises, the step is rejected.
    bad = eqx_curv.GaussNewton(learning_rate=30.0, damping=0.1, solver=_tight_cg())
    new, state, info = _step(bad, model, bad.init(model), loss, x, y)
    assert (
        not bool(info.stats["accepted"]) and float(info.stats["reduction_ratio"]) < 0.25
    )
    np.testing.assert_allclose(state.stats.damping, 0.1 * 1.5, rtol=1e-12)
    np.testing.assert_array_equal(_flat(new), _flat(model))
    # A quadratic loss of a linear model, at the full step: the damped model
    # underestimates the decrease, rho = (dGd/2 + lambda d.d) / (dGd/2 + lambda d.d/2).
    linear = eqx.nn.Linear(4, 2, key=jax.random.key(3), dtype=jnp.float64)
    targets = jax.random.normal(jax.random.key(9), (6, 2), jnp.float64)
    good = eqx_curv.GaussNewton(damping=0.1, solver=_tight_cg())
    mse = eqx_curv.MeanSquaredError()
    new, state, info = _step(good, linear, good.init(linear), mse, x, targets)
    assert bool(info.stats["accepted"])
    G, g = _dense(linear, mse, x, targets)
    d = -np.linalg.solve(G + 0.1 * np.eye(len(g)), g)
    rho = (d @ G @ d / 2 + 0.1 * d @ d) / (d @ G @ d / 2 + 0.1 * d @ d / 2)
    np.testing.assert_allclose(info.stats["reduction_ratio"], rho, rtol=1e-9)
    np.testing.assert_allclose(state.stats.damping, 0.1 / 1.5, rtol=1e-12)
    assert float(mse(jax.vmap(new)(x), targets)) < float(info.loss)


def test_bad_arguments_are_sentences():
    import eqx_curv

    with pytest.raises(ValueError, match="`learning_rate` must be non-negative"):
        eqx_curv.GaussNewton(learning_rate=-1.0)
    for damping in [0.0, -1.0]:
        with pytest.raises(ValueError, match="`damping` must be a finite positive"):
            eqx_curv.GaussNewton(damping=damping)
    with pytest.raises(ValueError, match="`damping_factor`"):
        eqx_curv.NaturalGradient(damping_factor=1.0)
    with pytest.raises(ValueError, match="`momentum`"):
        eqx_curv.GaussNewton(momentum=1.0)
    # Literals are checked by jaxtyping under pytest, else by the class: either way
    # the message names the argument.
    with pytest.raises((ValueError, TypeError), match="solver"):
        eqx_curv.GaussNewton(solver="lu")  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="solver"):
        eqx_curv.GaussNewton(solver=3)  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="fisher"):
        eqx_curv.NaturalGradient(fisher="true")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`num_samples`"):
        eqx_curv.NaturalGradient(fisher="mc", num_samples=0)
    with pytest.raises(ValueError, match="`warm_start=True` needs an iterative"):
        eqx_curv.GaussNewton(solver="woodbury", warm_start=True)
    with pytest.raises(ValueError, match="no optax form"):
        eqx_curv.GaussNewton().as_optax()

    model, loss, x, y = _problem()

    def plain_loss(outputs, targets):
        return loss(outputs, targets)

    opt = eqx_curv.GaussNewton()
    with pytest.raises(TypeError, match="`loss` must be an eqx_curv loss"):
        opt.step(model, opt.init(model), plain_loss, x, y)
    mc = eqx_curv.NaturalGradient(fisher="mc")
    with pytest.raises(ValueError, match="`key` is needed"):
        mc.step(model, mc.init(model), loss, x, y)
