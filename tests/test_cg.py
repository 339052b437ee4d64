"""eqx_curv.CG: dense oracles, options, result codes, transformations, and float32 at scale."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import eqx_curv


PSD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def _spd(key, n, cond, dtype):
    """A dense SPD matrix with eigenvalues log-spaced in [1, cond]."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float64))
    eig = jnp.logspace(0, np.log10(cond), n)
    return ((q * eig[None, :]) @ q.T).astype(dtype)


def _solve(matrix, b, solver, **kwargs):
    op = lx.MatrixLinearOperator(matrix, PSD)
    return lx.linear_solve(op, b, solver, throw=False, **kwargs)


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


@pytest.mark.parametrize(
    "dtype, n, every",
    [
        (jnp.float64, 5, None),
        (jnp.float64, 40, None),
        (jnp.float32, 5, None),
        (jnp.float32, 40, None),
        (jnp.float64, 40, 10),  # periodic residual replacement and restarts
        (jnp.float32, 40, 10),
    ],
)
def test_dense_spd_matches_dense_solve(getkey, dtype, n, every):
    cond = 100.0
    eps = float(jnp.finfo(dtype).eps)
    rtol = 100 * eps
    a = _spd(getkey(), n, cond, dtype)
    b = jax.random.normal(getkey(), (n,), dtype)
    solver = eqx_curv.CG(rtol=rtol, atol=0.0, max_steps=10 * n, recompute_every=every)
    sol = _solve(a, b, solver)
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == dtype
    expected = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    # ||r|| <= rtol ||b|| bounds the relative error by cond * rtol; the residual itself
    # is evaluated in `dtype`, adding about n * eps * cond.
    assert _rel(sol.value, expected) <= cond * (rtol + n * eps)
    # The reported residual is the true one, and meets the criterion.
    r = np.asarray(b, np.float64) - np.asarray(a, np.float64) @ np.asarray(sol.value)
    assert sol.stats["residual_norm"] <= rtol * jnp.linalg.norm(b)
    np.testing.assert_allclose(
        sol.stats["residual_norm"], np.linalg.norm(r), rtol=0.5, atol=n * eps
    )


def test_pytree_operator(getkey):
    n1, n2 = (3,), (2, 4)
    size = 3 + 8
    a = _spd(getkey(), size, 50.0, jnp.float64)
    structure = {
        "u": jax.ShapeDtypeStruct(n1, jnp.float64),
        "w": jax.ShapeDtypeStruct(n2, jnp.float64),
    }

    def mv(v):
        flat = jnp.concatenate([v["u"], v["w"].reshape(-1)])
        out = a @ flat
        return {"u": out[:3], "w": out[3:].reshape(n2)}

    op = lx.FunctionLinearOperator(mv, structure, PSD)
    b = {"u": jnp.arange(1.0, 4.0), "w": jnp.ones(n2)}
    sol = lx.linear_solve(op, b, eqx_curv.CG(rtol=1e-12, atol=0.0))
    flat = np.linalg.solve(a, np.concatenate([np.arange(1.0, 4.0), np.ones(8)]))
    np.testing.assert_allclose(sol.value["u"], flat[:3], rtol=1e-9)
    np.testing.assert_allclose(sol.value["w"].reshape(-1), flat[3:], rtol=1e-9)


def test_jacobi_preconditioner_needs_fewer_steps(getkey):
    n = 60
    c = _spd(getkey(), n, 10.0, jnp.float64)
    # Badly scaled rows and columns: D C D with D spread over six decades. Jacobi
    # undoes the scaling up to C's own conditioning.
    scale = jnp.logspace(-3, 3, n)
    a = scale[:, None] * c * scale[None, :]
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    solver = eqx_curv.CG(rtol=1e-10, atol=0.0, max_steps=100 * n)
    plain = _solve(a, b, solver)
    jacobi = lx.DiagonalLinearOperator(1 / jnp.diag(a))
    pre = _solve(a, b, solver, options={"preconditioner": jacobi})
    assert pre.result == lx.RESULTS.successful
    expected = np.linalg.solve(a, b)
    assert _rel(pre.value, expected) <= 1e-10 * jnp.linalg.cond(a)
    assert pre.stats["num_steps"] < plain.stats["num_steps"] // 3
    # A tagged dense preconditioner is accepted too and gives the same steps.
    dense = lx.MatrixLinearOperator(jnp.diag(1 / jnp.diag(a)), PSD)
    pre2 = _solve(a, b, solver, options={"preconditioner": dense})
    assert pre2.stats["num_steps"] == pre.stats["num_steps"]


def test_y0_at_the_solution_takes_no_steps(getkey):
    n = 20
    a = _spd(getkey(), n, 10.0, jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    x = jnp.linalg.solve(a, b)
    solver = eqx_curv.CG(rtol=1e-8, atol=0.0)
    sol = _solve(a, b, solver, options={"y0": x})
    assert sol.result == lx.RESULTS.successful
    assert sol.stats["num_steps"] == 0
    np.testing.assert_array_equal(sol.value, x)
    # A zero right-hand side is solved by zero, also in no steps.
    zero = _solve(a, jnp.zeros(n), solver)
    assert zero.stats["num_steps"] == 0 and not jnp.any(zero.value)


def test_max_steps_reached_is_reported(getkey):
    n = 30
    a = _spd(getkey(), n, 1e3, jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    solver = eqx_curv.CG(rtol=1e-12, atol=0.0, max_steps=3)
    sol = _solve(a, b, solver)
    assert sol.result == lx.RESULTS.max_steps_reached
    assert sol.stats["num_steps"] == 3
    assert jnp.isfinite(sol.value).all()
    # The last iterate is returned: CG decreases the A-norm of the error, and the
    # reported residual is that iterate's.
    x = np.linalg.solve(a, b)
    err = x - sol.value
    assert err @ a @ err < x @ a @ x
    np.testing.assert_allclose(
        sol.stats["residual_norm"], np.linalg.norm(b - a @ sol.value), rtol=1e-8
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of solver steps"):
        lx.linear_solve(lx.MatrixLinearOperator(a, PSD), b, solver)


@pytest.mark.parametrize("y0", [False, True])
def test_a_solve_that_runs_out_of_steps_costs_only_its_steps(getkey, y0):
    # The true residual is recomputed only where it could end the solve in success:
    # from zero, max_steps steps cost max_steps products (plus b - A y0 with a y0).
    n, max_steps = 30, 4
    a = _spd(getkey(), n, 1e3, jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    calls = []

    def mv(v):
        jax.debug.callback(lambda: calls.append(1))
        return a @ v

    structure = jax.ShapeDtypeStruct((n,), jnp.float64)
    op = lx.FunctionLinearOperator(mv, structure, PSD)
    options = {"y0": jnp.ones(n)} if y0 else {}
    solver = eqx_curv.CG(rtol=1e-12, atol=0.0, max_steps=max_steps)
    sol = lx.linear_solve(op, b, solver, options=options, throw=False)
    jax.effects_barrier()
    assert sol.result == lx.RESULTS.max_steps_reached
    assert sol.stats["num_steps"] == max_steps
    assert len(calls) == max_steps + int(y0)
    np.testing.assert_allclose(
        sol.stats["residual_norm"], np.linalg.norm(b - a @ sol.value), rtol=1e-8
    )


@pytest.mark.parametrize("second", [-3.0, -1.0])
def test_breakdown_on_indefinite_curvature(second):
    # Wrongly tagged PSD: the curvature along b = (1, 1) is 1 + second <= 0.
    a = jnp.diag(jnp.array([1.0, second, 2.0]))
    b = jnp.array([1.0, 1.0, 0.0])
    sol = _solve(a, b, eqx_curv.CG(rtol=1e-8, atol=0.0, max_steps=50))
    assert sol.result == lx.RESULTS.breakdown
    assert sol.stats["num_steps"] == 1
    np.testing.assert_array_equal(sol.value, jnp.zeros(3))
    np.testing.assert_allclose(sol.stats["residual_norm"], jnp.linalg.norm(b))


def test_nonfinite_operator_entry_is_nonfinite_input_not_breakdown():
    # A NaN in the operator makes the first product NaN: not a breakdown of CG (whose
    # advice would be a different solver) but a non-finite input, and no zero step.
    a = jnp.diag(jnp.array([1.0, jnp.nan, 2.0]))
    b = jnp.array([1.0, 1.0, 0.0])
    sol = _solve(a, b, eqx_curv.CG(rtol=1e-8, atol=0.0, max_steps=50))
    assert sol.result == lx.RESULTS.nonfinite_input
    assert sol.stats["num_steps"] == 1
    assert np.isnan(np.asarray(sol.value)).all()


def test_breakdown_on_indefinite_preconditioner(getkey):
    a = _spd(getkey(), 4, 10.0, jnp.float64)
    b = jnp.array([1.0, 1.0, 1.0, 1.0])
    bad = lx.DiagonalLinearOperator(jnp.array([1.0, -1.0, -1.0, -1.0]))
    sol = _solve(
        a, b, eqx_curv.CG(rtol=1e-8, atol=0.0), options={"preconditioner": bad}
    )
    assert sol.result == lx.RESULTS.breakdown


def test_nonfinite_input_is_reported(getkey):
    a = _spd(getkey(), 4, 10.0, jnp.float64)
    b = jnp.array([1.0, jnp.nan, 0.0, 1.0])
    sol = _solve(a, b, eqx_curv.CG(rtol=1e-8, atol=0.0))
    assert sol.result == lx.RESULTS.nonfinite_input
    assert sol.stats["num_steps"] == 0
    # Not the zero initial guess, which would read as a (zero) step.
    assert np.isnan(np.asarray(sol.value)).all()
    y0 = jnp.array([jnp.inf, 0.0, 0.0, 0.0])
    sol = _solve(a, jnp.ones(4), eqx_curv.CG(rtol=1e-8, atol=0.0), options={"y0": y0})
    assert sol.result == lx.RESULTS.nonfinite_input
    assert np.isnan(np.asarray(sol.value)).all()
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        lx.linear_solve(lx.MatrixLinearOperator(a, PSD), b, eqx_curv.CG(1e-8, 0.0))


@pytest.mark.parametrize("bad", ["inf_parameter", "nan_rhs"])
def test_nonfinite_model_or_rhs_on_a_curvature_operator(getkey, bad):
    # A damped GGN of a model with an infinite parameter: every product is NaN. Before,
    # this read as `breakdown` (with lineax's advice about GMRES restarts) and gave a
    # zero step.
    model, loss, x, y = _mlp_problem(getkey(), jnp.float64, (3, 4, 2), batch=3)
    params = eqx.filter(model, eqx.is_inexact_array)
    b = jax.tree.map(lambda p: jax.random.normal(getkey(), p.shape, p.dtype), params)
    if bad == "inf_parameter":
        # In the output layer's bias (an infinite weight before a tanh would saturate).
        bias = model.layers[-1].bias
        model = eqx.tree_at(lambda m: m.layers[-1].bias, model, bias.at[0].set(jnp.inf))
    else:
        b = jax.tree.map(lambda leaf: leaf.at[0].set(jnp.nan), b)
    op = eqx_curv.DampedOperator(eqx_curv.GGNOperator(model, loss, x, y), 1e-2)
    sol = lx.linear_solve(
        op, b, eqx_curv.CG(rtol=1e-8, atol=0.0, max_steps=50), throw=False
    )
    assert sol.result == lx.RESULTS.nonfinite_input
    assert all(np.isnan(np.asarray(leaf)).all() for leaf in jax.tree.leaves(sol.value))


def test_jit_and_vmap_over_right_hand_sides(getkey):
    n = 12
    a = _spd(getkey(), n, 100.0, jnp.float64)
    bs = jax.random.normal(getkey(), (4, n), jnp.float64)
    bs = bs.at[1].set(0.0)  # one system already solved: 0 steps, others keep going
    solver = eqx_curv.CG(rtol=1e-10, atol=0.0)

    @jax.jit
    @jax.vmap
    def solve(b):
        sol = lx.linear_solve(lx.MatrixLinearOperator(a, PSD), b, solver)
        return sol.value, sol.stats["num_steps"]

    values, steps = solve(bs)
    np.testing.assert_allclose(values, np.linalg.solve(a, bs.T).T, rtol=1e-7, atol=0)
    steps = np.asarray(steps)
    assert steps[1] == 0 and (steps[[0, 2, 3]] > 0).all()


def test_vmap_over_operators(getkey):
    n = 8
    mats = jnp.stack([_spd(getkey(), n, c, jnp.float64) for c in (2.0, 50.0, 1e3)])
    b = jax.random.normal(getkey(), (n,), jnp.float64)

    @jax.vmap
    def solve(a):
        op = lx.MatrixLinearOperator(a, PSD)
        return lx.linear_solve(op, b, eqx_curv.CG(rtol=1e-11, atol=0.0)).value

    expected = np.stack([np.linalg.solve(m, b) for m in mats])
    np.testing.assert_allclose(solve(mats), expected, rtol=1e-6)


def test_tolerances_may_be_ints_or_vmapped_arrays(getkey):
    n = 10
    a = _spd(getkey(), n, 100.0, jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    op = lx.MatrixLinearOperator(a, PSD)
    assert lx.linear_solve(op, b, eqx_curv.CG(rtol=1e-10, atol=0)).stats["num_steps"]

    def steps(rtol):
        return lx.linear_solve(op, b, eqx_curv.CG(rtol=rtol, atol=0.0)).stats[
            "num_steps"
        ]

    loose, tight = jax.vmap(steps)(jnp.array([1e-2, 1e-12]))
    assert 0 < loose < tight


def test_grad_through_linear_solve_matches_finite_differences(getkey):
    n = 6
    base = jax.random.normal(getkey(), (n, n), jnp.float64)
    w = jax.random.normal(getkey(), (n,), jnp.float64)
    solver = eqx_curv.CG(rtol=1e-13, atol=0.0)

    def f(theta, b):
        m = base + theta
        a = m @ m.T + jnp.eye(n)
        x = lx.linear_solve(lx.MatrixLinearOperator(a, PSD), b, solver).value
        return jnp.dot(w, x)

    theta = 0.1 * jax.random.normal(getkey(), (n, n), jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    g_theta, g_b = jax.grad(f, argnums=(0, 1))(theta, b)
    dt = jax.random.normal(getkey(), (n, n), jnp.float64)
    db = jax.random.normal(getkey(), (n,), jnp.float64)
    h = 1e-6
    fd = (f(theta + h * dt, b + h * db) - f(theta - h * dt, b - h * db)) / (2 * h)
    ad = jnp.vdot(g_theta, dt) + jnp.vdot(g_b, db)
    # Central differences: O(h^2) truncation plus eps / h rounding.
    np.testing.assert_allclose(ad, fd, rtol=1e-7, atol=1e-7)
    # The gradient with respect to b is A^{-1} w (A is symmetric).
    m = base + theta
    np.testing.assert_allclose(
        g_b, np.linalg.solve(m @ m.T + np.eye(n), w), rtol=1e-9, atol=1e-12
    )


def test_bad_input_raises_sentences(getkey):
    a = _spd(getkey(), 3, 10.0, jnp.float64)
    b = jnp.ones(3)
    op = lx.MatrixLinearOperator(a, PSD)
    cg = eqx_curv.CG(rtol=1e-8, atol=0.0)
    with pytest.raises(ValueError, match="positive semidefinite"):
        lx.linear_solve(lx.MatrixLinearOperator(a), b, cg)
    with pytest.raises(ValueError, match="`y0`.*structure"):
        lx.linear_solve(op, b, cg, options={"y0": jnp.ones(4)})
    with pytest.raises(ValueError, match="`y0`"):
        lx.linear_solve(op, b, cg, options={"y0": jnp.ones(3, jnp.float32)})
    with pytest.raises(TypeError, match="`preconditioner`.*AbstractLinearOperator"):
        lx.linear_solve(op, b, cg, options={"preconditioner": jnp.ones(3)})
    with pytest.raises(ValueError, match="`preconditioner`.*structure"):
        pre = lx.DiagonalLinearOperator(jnp.ones(4))
        lx.linear_solve(op, b, cg, options={"preconditioner": pre})
    with pytest.raises(ValueError, match="`preconditioner`.*positive definite"):
        lx.linear_solve(
            op, b, cg, options={"preconditioner": lx.MatrixLinearOperator(a)}
        )
    with pytest.raises(ValueError, match="unknown options"):
        lx.linear_solve(op, b, cg, options={"precondtioner": op})
    with pytest.raises(ValueError, match="`rtol`"):
        eqx_curv.CG(rtol=-1.0, atol=0.0)
    with pytest.raises(ValueError, match="`max_steps`"):
        eqx_curv.CG(rtol=1e-3, atol=0.0, max_steps=-2)
    with pytest.raises(ValueError, match="`max_steps` must be a positive"):
        eqx_curv.CG(rtol=1e-3, atol=0.0, max_steps=0)
    with pytest.raises(ValueError, match="`rtol` must be a finite non-negative"):
        eqx_curv.CG(rtol=-1, atol=0.0)
    with pytest.raises(ValueError, match="`atol` must be a finite non-negative"):
        eqx_curv.CG(rtol=1e-3, atol=float("inf"))
    with pytest.raises(ValueError, match="`rtol`"):
        eqx_curv.CG(rtol=jnp.array(-1.0), atol=0.0)
    with pytest.raises(ValueError, match="`recompute_every`"):
        eqx_curv.CG(rtol=1e-3, atol=0.0, recompute_every=0)
    with pytest.raises(ValueError, match="set a tolerance or `max_steps`"):
        eqx_curv.CG(rtol=0.0, atol=0.0)


# The headline test: a float32 system with 10^6 unknowns shaped like a damped
# mean-loss GGN. `d` is a diagonal whose entries spread over eight decades, mostly tiny
# (like the many nearly-flat directions of a network); `w diag(s) w^T` is a rank-8 part
# with eigenvalues between 1e-2 and 5 (the few directions the batch constrains);
# `damping` is the Levenberg-Marquardt term. Condition number about 5e3.
_N = 1_000_000
_DAMPING = 1e-3


def _ggn_like(key):
    k1, k2, k3 = jax.random.split(key, 3)
    d = 10.0 ** jax.random.uniform(k1, (_N,), jnp.float32, -9.0, -1.0)
    w = jax.random.normal(k2, (_N, 8), jnp.float32) / float(np.sqrt(_N))
    s = jnp.logspace(-2, np.log10(5.0), 8, dtype=jnp.float32)
    b = jax.random.normal(k3, (_N,), jnp.float32)
    return d, w, s, b


def _ggn_mv(d, w, s, v):
    return (d + _DAMPING) * v + w @ (s * (w.T @ v))


@eqx.filter_jit
def _solve_ggn_like(solver, d, w, s, b):
    op = lx.FunctionLinearOperator(
        lambda v: _ggn_mv(d, w, s, v), jax.ShapeDtypeStruct((_N,), jnp.float32), PSD
    )
    sol = lx.linear_solve(op, b, solver, throw=False)
    return sol.value, sol.result, sol.stats


def test_float32_million_unknowns_ggn_like_converges_where_lineax_fails():
    d, w, s, b = _ggn_like(jax.random.key(0))
    bnorm = float(jnp.linalg.norm(b.astype(jnp.float64)))
    # lineax.CG only steps when p^T A p / p^T p > 100 * n * eps (about 12 here); the
    # operator's Rayleigh quotient along b is far below that.
    eps = float(jnp.finfo(jnp.float32).eps)
    rayleigh = float(jnp.vdot(b, _ggn_mv(d, w, s, b)) / jnp.vdot(b, b))
    assert rayleigh < 100 * _N * eps

    theirs, their_result, _ = _solve_ggn_like(
        lx.CG(rtol=1e-4, atol=0.0, max_steps=500), d, w, s, b
    )
    assert their_result != lx.RESULTS.successful
    assert not all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(theirs))
    assert not jnp.isfinite(theirs).all()

    # rtol = 1e-4: this operator's own float32 product is only accurate to a few 1e-5
    # relative to ||b|| at the solution (see below), so tighter is out of reach.
    rtol = 1e-4
    ours, our_result, stats = _solve_ggn_like(
        eqx_curv.CG(rtol=rtol, atol=0.0, max_steps=1000), d, w, s, b
    )
    assert our_result == lx.RESULTS.successful
    assert ours.dtype == jnp.float32 and jnp.isfinite(ours).all()
    assert 0 < stats["num_steps"] < 1000
    assert stats["residual_norm"] <= rtol * jnp.linalg.norm(b)
    # The float64 residual of the float32 solution: within the tolerance, up to the
    # rounding error of the float32 product at that point (triangle inequality).
    d64, w64, s64, y64 = (x.astype(jnp.float64) for x in (d, w, s, ours))
    exact_product = _ggn_mv(d64, w64, s64, y64)
    rounding = float(
        jnp.linalg.norm(_ggn_mv(d, w, s, ours).astype(jnp.float64) - exact_product)
    )
    residual64 = float(jnp.linalg.norm(b.astype(jnp.float64) - exact_product))
    assert rounding < rtol * bnorm
    assert residual64 <= rtol * bnorm + rounding


def _mlp_problem(key, dtype, widths, batch):
    k1, k2, k3 = jax.random.split(key, 3)
    model = eqx.nn.MLP(
        widths[0], widths[-1], widths[1], len(widths) - 2, jnp.tanh, key=k1
    )
    model = jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
    )
    x = jax.random.normal(k2, (batch, widths[0]), dtype)
    y = jax.random.randint(k3, (batch,), 0, widths[-1])
    return model, eqx_curv.SoftmaxCrossEntropy(), x, y


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_damped_ggn_solve_matches_dense(getkey, dtype):
    model, loss, x, y = _mlp_problem(getkey(), dtype, (4, 6, 3), batch=5)
    damping = 1e-2
    op = eqx_curv.DampedOperator(eqx_curv.GGNOperator(model, loss, x, y), damping)
    params = eqx.filter(model, eqx.is_inexact_array)
    b = jax.tree.map(lambda p: jax.random.normal(getkey(), p.shape, p.dtype), params)
    eps = float(jnp.finfo(dtype).eps)
    rtol = 100 * eps
    sol = lx.linear_solve(op, b, eqx_curv.CG(rtol=rtol, atol=0.0, max_steps=2000))
    assert sol.result == lx.RESULTS.successful
    flat_b, _ = jax.flatten_util.ravel_pytree(b)
    flat_x, _ = jax.flatten_util.ravel_pytree(sol.value)
    assert flat_x.dtype == dtype
    dense = np.asarray(op.as_matrix(), np.float64)
    expected = np.linalg.solve(dense, np.asarray(flat_b, np.float64))
    cond = np.linalg.cond(dense)
    assert _rel(flat_x, expected) <= cond * (rtol + flat_b.size * eps)


def test_grad_through_damped_ggn_cg_solve_wrt_damping(getkey):
    model, loss, x, y = _mlp_problem(getkey(), jnp.float64, (4, 6, 3), batch=5)
    ggn = eqx_curv.GGNOperator(model, loss, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    b = jax.tree.map(lambda p: jax.random.normal(getkey(), p.shape), params)
    solver = eqx_curv.CG(rtol=1e-13, atol=0.0, max_steps=2000)

    def f(damping):
        sol = lx.linear_solve(eqx_curv.DampedOperator(ggn, damping), b, solver).value
        return sum(jnp.vdot(s, s) for s in jax.tree.leaves(sol))

    lam, h = jnp.asarray(0.3), 1e-5
    fd = (f(lam + h) - f(lam - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(lam), fd, rtol=1e-7)


@pytest.mark.slow
def test_float32_ggn_of_a_million_parameter_mlp():
    # The headline on a real network: 784-1024-256-10 MLP (1.07e6 parameters),
    # float32, batch 64, damped GGN of the mean cross-entropy.
    model, loss, x, y = _mlp_problem(
        jax.random.key(0), jnp.float32, (784, 1024, 256, 10), batch=64
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    num = sum(p.size for p in jax.tree.leaves(params))
    assert num > 10**6
    grads = eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(model)
    op = eqx_curv.DampedOperator(eqx_curv.GGNOperator(model, loss, x, y), 1e-3)

    @eqx.filter_jit
    def solve(solver):
        sol = lx.linear_solve(op, grads, solver, throw=False)
        return sol.value, sol.result, sol.stats

    theirs, their_result, _ = solve(lx.CG(rtol=1e-4, atol=0.0, max_steps=300))
    ours, our_result, stats = solve(eqx_curv.CG(rtol=1e-4, atol=0.0, max_steps=300))
    residual = stats["residual_norm"]
    gnorm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    assert our_result == lx.RESULTS.successful
    assert residual <= 1e-4 * gnorm
    assert all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(ours))
    assert their_result != lx.RESULTS.successful
    assert not all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(theirs))


def _unchecked_cg(**fields):
    """A CG built without `__init__`, so without jaxtyping's field check (which the
    test suite's import hook adds): what a user without the hook constructs."""
    cg = object.__new__(eqx_curv.CG)
    defaults = {"rtol": 1e-5, "atol": 0.0, "max_steps": None, "recompute_every": None}
    for name, value in {**defaults, **fields}.items():
        object.__setattr__(cg, name, value)
    return cg


@pytest.mark.parametrize(
    "fields, error, match",
    [
        ({"rtol": "x"}, TypeError, "`rtol` must be a real number"),
        ({"atol": 1j}, TypeError, "`atol` must be a real number"),
        ({"rtol": True}, TypeError, "`rtol` must be a real number"),
        ({"rtol": jnp.ones(2)}, ValueError, "`rtol` must be a scalar"),
        ({"rtol": float("nan")}, ValueError, "`rtol` must be a finite"),
        ({"max_steps": 2.5}, ValueError, "`max_steps` must be a positive Python int"),
    ],
)
def test_tolerances_are_validated_without_the_type_checker(fields, error, match):
    with pytest.raises(error, match=match):
        _unchecked_cg(**fields).__check_init__()


def test_traced_negative_tolerance_is_a_runtime_error(getkey):
    a = _spd(getkey(), 3, 10.0, jnp.float64)
    op = lx.MatrixLinearOperator(a, PSD)

    @eqx.filter_jit
    def solve(rtol):
        return lx.linear_solve(op, jnp.ones(3), eqx_curv.CG(rtol=rtol, atol=0.0)).value

    assert jnp.isfinite(solve(jnp.asarray(1e-8))).all()
    with pytest.raises(eqx.EquinoxRuntimeError, match="`rtol` must be a finite"):
        solve(jnp.asarray(-1.0))


def test_indefinite_operator_message_names_what_works(getkey):
    # A damped Hessian is not PSD; the message must not suggest damping as the cure.
    model, loss, x, y = _mlp_problem(getkey(), jnp.float64, (3, 4, 2), batch=3)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(p):
        return loss(jax.vmap(eqx.combine(p, static))(x), y)

    op = eqx_curv.DampedOperator(eqx_curv.HessianOperator(fn, params), 1e-2)
    cg = eqx_curv.CG(rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError) as info:
        lx.linear_solve(op, params, cg)
    message = str(info.value)
    for name in ("GMRES", "BiCGStab", "LU", "well_posed=True", "GGNOperator"):
        assert name in message
    assert "damp them with" not in message


def test_damped_newton_with_cg_gets_the_same_message():
    import optimistix as optx

    def fn(z, args):
        return jnp.sum(z**4) - jnp.sum(z**2)

    solver = eqx_curv.DampedNewton(
        rtol=1e-6, atol=1e-6, damping=0.1, linear_solver=eqx_curv.CG(1e-6, 0.0)
    )
    with pytest.raises(ValueError, match="GMRES.*BiCGStab.*GGNOperator"):
        optx.minimise(fn, solver, jnp.array([0.3, -0.2]), max_steps=5)


def test_grad_through_a_preconditioned_solve(getkey):
    # The solution does not depend on the preconditioner, so a data-dependent one is
    # passed through `jax.lax.stop_gradient`; lineax itself refuses tangents on
    # `options` with a clear error, which this also checks.
    n = 5
    base = jax.random.normal(getkey(), (n, n), jnp.float64)
    b = jax.random.normal(getkey(), (n,), jnp.float64)
    solver = eqx_curv.CG(rtol=1e-13, atol=0.0)

    def f(theta, stop):
        m = base + theta
        a = m @ m.T + jnp.eye(n)
        d = jnp.diag(a)
        pre = lx.DiagonalLinearOperator(1 / (jax.lax.stop_gradient(d) if stop else d))
        op = lx.MatrixLinearOperator(a, PSD)
        options = {"preconditioner": pre}
        return jnp.sum(lx.linear_solve(op, b, solver, options=options).value)

    def plain(theta):
        m = base + theta
        op = lx.MatrixLinearOperator(m @ m.T + jnp.eye(n), PSD)
        return jnp.sum(lx.linear_solve(op, b, solver).value)

    theta = jnp.zeros((n, n))
    np.testing.assert_allclose(
        jax.grad(f)(theta, True), jax.grad(plain)(theta), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(RuntimeError, match="options"):
        jax.grad(f)(theta, False)


def test_damping_must_be_a_finite_real_number():
    op = lx.MatrixLinearOperator(jnp.eye(2), PSD)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="`damping` must be a finite non-negative"):
            eqx_curv.DampedOperator(op, bad)
    # Wrong types are caught by the annotations under the test suite's import hook;
    # the library's own check gives users without it a sentence too.
    from eqx_curv._operators.base import check_damping

    for bad in (1j, "1e-3", True):
        with pytest.raises(TypeError, match="`damping` must be a real number"):
            check_damping(bad)
    traced = eqx.filter_jit(lambda d: eqx_curv.DampedOperator(op, d).mv(jnp.ones(2)))
    np.testing.assert_allclose(traced(jnp.asarray(0.5)), [1.5, 1.5])
    with pytest.raises(eqx.EquinoxRuntimeError, match="`damping` must be a finite"):
        traced(jnp.asarray(-0.5))
