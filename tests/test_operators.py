"""Curvature operators against dense float64 oracles, lineax solvers and bad input."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    head_filter_spec,
    operator_entry,
    OPERATOR_NAMES,
    parameter_mask,
    random_like,
    ravel,
    STRUCTURED_NAMES,
    sub_block,
)
from models import BatchNormNet, make_batchnorm, make_problem, MODELS, NUM_OUTPUTS

import eqx_curv
from eqx_curv.testing import check_operator


LOSSES = ["softmax", "mse", "bce"]


def _tol(matrix):
    """Round-off scale of a float64 product: dimension x eps x magnitude."""
    eps = float(jnp.finfo(matrix.dtype).eps)
    return matrix.shape[0] * eps * max(1.0, float(jnp.abs(matrix).max()))


def _build(name, model_name="layernorm", loss_name="softmax", seed=0):
    build, oracle, psd = operator_entry(name)
    model, loss, x, y = make_problem(model_name, loss_name, jax.random.key(seed))
    key = jax.random.key(seed + 100)
    return build(model, loss, x, y, key), oracle(model, loss, x, y, key), psd


# Each model meets each loss once; each operator sees every pair.
PAIRS = [("mlp", "softmax"), ("conv", "mse"), ("layernorm", "bce")]
assert {m for m, _ in PAIRS} == set(MODELS) and {loss for _, loss in PAIRS} == set(
    LOSSES
)


# Damping and the exact Fisher are checked on one pair (and elsewhere): they add no
# model-dependent code.
ORACLE_CASES = [
    (name, *pair)
    for name in OPERATOR_NAMES
    for pair in (
        PAIRS
        if name in ("hessian", "ggn", "fisher_mc", "empirical_fisher")
        else PAIRS[2:]
    )
] + [(name, *PAIRS[2]) for name in STRUCTURED_NAMES]  # built from matrices, no model


@pytest.mark.parametrize("name,model_name,loss_name", ORACLE_CASES)
def test_dense_oracle(name, model_name, loss_name):
    op, dense, psd = _build(name, model_name, loss_name)
    v = random_like(jax.random.key(1), op.in_structure())
    matrix, product, linearised_product = _matrix_and_products(op, v)
    np.testing.assert_allclose(matrix, dense, rtol=0, atol=_tol(dense))
    # `mv`, and the linearised operator an iterative solver uses, agree with it.
    expected = dense @ ravel(v)
    np.testing.assert_allclose(ravel(product), expected, atol=_tol(dense) * 10)
    np.testing.assert_allclose(
        ravel(linearised_product), expected, atol=_tol(dense) * 10
    )
    lin = eqx.filter_eval_shape(lx.linearise, op)
    assert name in STRUCTURED_NAMES or isinstance(
        lin, (lx.FunctionLinearOperator, eqx_curv.DampedOperator)
    )
    assert lx.is_positive_semidefinite(op) == psd == lx.is_positive_semidefinite(lin)
    assert lx.is_symmetric(op) and lx.is_symmetric(lin)


@eqx.filter_jit
def _matrix_and_products(op, v):
    # One compilation per case; op-by-op dispatch of these products is slower.
    return op.as_matrix(), op.mv(v), lx.linearise(op).mv(v)


def test_exact_fisher_is_ggn_and_psd():
    for loss_name in LOSSES:
        model, loss, x, y = make_problem("mlp", loss_name, jax.random.key(3))
        fisher = eqx_curv.FisherOperator(model, loss, x).as_matrix()
        ggn = dense_ggn(model, loss, x, y)
        np.testing.assert_allclose(fisher, ggn, atol=_tol(ggn))
        assert np.linalg.eigvalsh(np.asarray(fisher)).min() >= -_tol(ggn)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_mc_fisher_converges_to_exact(loss_name):
    model, loss, x, _ = make_problem("layernorm", loss_name, jax.random.key(4))
    exact = eqx_curv.FisherOperator(model, loss, x).as_matrix()
    errors = []
    for num_samples in (16, 4096):
        op = eqx_curv.FisherOperator(
            model, loss, x, key=jax.random.key(5), num_samples=num_samples
        )
        errors.append(
            float(jnp.linalg.norm(op.as_matrix() - exact) / jnp.linalg.norm(exact))
        )
    # Monte-Carlo error decays like 1/sqrt(S): 16x fewer at 256x the samples. Allow a
    # factor 5 for the randomness of the (fixed-key) draws around that rate.
    assert errors[1] < 0.2, errors
    assert errors[1] < errors[0] / 3, errors


def test_dropout_key_is_used_per_example():
    model, loss, x, y = make_problem("dropout", "softmax", jax.random.key(6))
    key = jax.random.key(7)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    keys = jax.random.split(key, x.shape[0])

    def outputs(f):
        m = eqx.combine(unravel(f), static)
        return jax.vmap(lambda xi, ki: m(xi, key=ki))(x, keys)

    jac = jax.jacfwd(outputs)(flat)
    hess = jax.hessian(lambda o: loss(o, y))(outputs(flat))
    dense = jnp.einsum("ncp,ncmd,mdq->pq", jac, hess, jac)
    keyed = eqx_curv.GGNOperator(model, loss, x, y, model_key=key).as_matrix()
    np.testing.assert_allclose(keyed, dense, atol=_tol(dense))
    unkeyed = eqx_curv.GGNOperator(model, loss, x, y).as_matrix()
    assert not np.allclose(unkeyed, dense)
    fisher = eqx_curv.FisherOperator(model, loss, x, model_key=key).as_matrix()
    np.testing.assert_allclose(fisher, dense, atol=_tol(dense))


def test_float32_preserved():
    model, loss, x, y = make_problem(
        "conv", "softmax", jax.random.key(8), dtype=jnp.float32
    )
    v = random_like(jax.random.key(9), eqx.filter(model, eqx.is_inexact_array))
    for name in ["hessian", "fisher_mc", "damped_ggn"]:
        build, _, _ = operator_entry(name)
        op = build(model, loss, x, y, jax.random.key(10))
        out = eqx.filter_jit(lambda op, v: op.mv(v))(op, v)
        assert {leaf.dtype for leaf in jax.tree.leaves(out)} == {jnp.dtype("float32")}
        assert all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(out))


# --- the conformance suite: symmetry, PSD where tagged, linearity, transpose, mv
# against as_matrix and the dense oracle, the lineax queries and solvers its tags
# allow, jit and vmap, and a sentence for a vector of the wrong structure -------------


@pytest.mark.parametrize("name", OPERATOR_NAMES + STRUCTURED_NAMES)
def test_check_operator_passes_on_every_operator(name):
    op, dense, psd = _get_cached(name)
    report = check_operator(op, dense=dense)
    for prop in ("symmetric", "linearity", "dense", "transpose", "jit", "vmap"):
        assert report[prop] == "passed", (prop, report[prop])
    assert (report["positive_semidefinite"] == "passed") == psd
    # The solvers are tried wherever the matrix is invertible.
    assert report["solvers"] == "passed" or "singular" in report["solvers"]


_CACHE = {}


def _get_cached(name):
    if name not in _CACHE:
        _CACHE[name] = _build(name, "layernorm", "softmax", seed=11)
    return _CACHE[name]


# --- lineax solvers ------------------------------------------------------------------


SOLVERS = {
    "cg": lx.CG(rtol=1e-12, atol=1e-12, max_steps=500),
    "eqx_curv_cg": eqx_curv.CG(rtol=1e-12, atol=1e-12, max_steps=500),
    "cholesky": lx.Cholesky(),
    "lu": lx.LU(),
    "auto": lx.AutoLinearSolver(well_posed=True),
    "gmres": lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=500),
    "lsmr": lx.LSMR(rtol=1e-12, atol=1e-12, max_steps=500),
}


@pytest.mark.parametrize(
    "solver,inner",
    # CG and Cholesky on the damped GGN run in its conformance suite above.
    [(s, "damped_ggn") for s in sorted(SOLVERS) if s not in ("cg", "cholesky")]
    + [("cg", "fisher_mc"), ("eqx_curv_cg", "fisher_mc"), ("lu", "fisher_mc")]
    # Structured operators: LU where tagged PSD, GMRES where not (the conformance
    # suite above solves with CG and Cholesky, or LU, the solvers their tags allow);
    # the other solvers once (each iterative one compiles its own loop).
    + [
        (s, name)
        for name in STRUCTURED_NAMES
        for s in (("lu",) if operator_entry(name)[2] else ("gmres",))
    ]
    + [(s, "kronecker") for s in ("auto", "eqx_curv_cg", "gmres", "lsmr")],
)
def test_linear_solve_matches_dense(solver, inner):
    op, dense, _ = _get_cached(inner)
    if inner == "fisher_mc":  # rank-deficient: damp it
        op = eqx_curv.DampedOperator(op, 0.1)
        dense = dense + 0.1 * jnp.eye(dense.shape[0])
    b = random_like(jax.random.key(12), op.in_structure())
    sol = lx.linear_solve(op, b, SOLVERS[solver])
    assert sol.result == lx.RESULTS.successful
    expected = jnp.linalg.solve(dense, ravel(b))
    cond = float(jnp.linalg.cond(dense))
    atol = cond * _tol(dense) * float(jnp.abs(expected).max()) * 100
    np.testing.assert_allclose(ravel(sol.value), expected, atol=atol)


def test_invert_matches_dense():
    op, dense, _ = _get_cached("damped_ggn")
    b = random_like(jax.random.key(13), op.in_structure())
    out = lx.invert(op).mv(b)
    expected = jnp.linalg.solve(dense, ravel(b))
    np.testing.assert_allclose(ravel(out), expected, rtol=1e-8)
    np.testing.assert_allclose(lx.materialise(op).as_matrix(), dense, atol=_tol(dense))
    np.testing.assert_allclose(lx.diagonal(op), jnp.diag(dense), atol=_tol(dense))


def test_indefinite_hessian_with_lu_and_cg_refuses():
    op, dense, _ = _get_cached("hessian")
    b = random_like(jax.random.key(14), op.in_structure())
    sol = lx.linear_solve(op, b, lx.LU())
    np.testing.assert_allclose(
        dense @ ravel(sol.value), ravel(b), atol=float(jnp.linalg.cond(dense)) * 1e-13
    )
    with pytest.raises(ValueError, match="positive"):
        lx.linear_solve(op, b, lx.CG(rtol=1e-8, atol=1e-8))


def test_grad_through_cg_solve_matches_finite_differences():
    model, loss, x, y = make_problem("layernorm", "softmax", jax.random.key(15))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    b = random_like(jax.random.key(16), params)
    c = random_like(jax.random.key(17), params)
    solver = lx.CG(rtol=1e-13, atol=1e-13, max_steps=1000)

    def objective(params, damping):
        op = eqx_curv.DampedOperator(
            eqx_curv.GGNOperator(eqx.combine(params, static), loss, x, y), damping
        )
        sol = lx.linear_solve(op, b, solver).value
        return ravel(sol) @ ravel(c)

    damping = jnp.asarray(0.2)
    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(params, damping)
    direction = random_like(jax.random.key(18), params)
    h = 1e-5
    plus = objective(jax.tree.map(lambda p, d: p + h * d, params, direction), damping)
    minus = objective(jax.tree.map(lambda p, d: p - h * d, params, direction), damping)
    fd = (plus - minus) / (2 * h)
    # central differences: O(h^2) truncation plus eps/h round-off
    np.testing.assert_allclose(ravel(grads[0]) @ ravel(direction), fd, rtol=1e-6)
    fd_damping = (objective(params, damping + h) - objective(params, damping - h)) / (
        2 * h
    )
    np.testing.assert_allclose(grads[1], fd_damping, rtol=1e-6)


def test_traced_damping_does_not_recompile():
    op, dense, _ = _get_cached("ggn")
    v = random_like(jax.random.key(19), op.in_structure())
    traces = []

    @eqx.filter_jit
    def product(op, damping, v):
        traces.append(None)
        return eqx_curv.DampedOperator(op, damping).mv(v)

    for damping in (0.1, 0.2):
        out = product(op, jnp.asarray(damping), v)
        np.testing.assert_allclose(
            ravel(out),
            (dense + damping * jnp.eye(dense.shape[0])) @ ravel(v),
            atol=1e-12,
        )
    assert len(traces) == 1


# --- bad input -------------------------------------------------------------------------


def test_vector_with_wrong_structure():
    op, _, _ = _get_cached("ggn")
    v = random_like(jax.random.key(20), op.in_structure())
    with pytest.raises(ValueError, match="input structure"):
        op.mv({"not": jnp.ones(3)})
    wrong_dtype = jax.tree.map(lambda a: a.astype(jnp.float32), v)
    with pytest.raises(ValueError, match="dtype"):
        op.mv(wrong_dtype)
    with pytest.raises(ValueError, match="input structure|shape"):
        lx.linear_solve(op, {"not": jnp.ones(3)}, lx.Cholesky())


def test_integer_params_rejected():
    params = {"w": jnp.arange(3), "b": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"\['w'\] has dtype int"):
        eqx_curv.HessianOperator(lambda p: jnp.sum(p["b"] ** 2), params)


def test_hessian_needs_scalar_function():
    with pytest.raises(ValueError, match="scalar"):
        eqx_curv.HessianOperator(lambda p: p**2, jnp.ones(3))


def test_loss_with_mismatched_targets_rejected():
    model, loss, x, y = make_problem("mlp", "mse", jax.random.key(21))
    with pytest.raises(ValueError, match="`targets` of `MeanSquaredError` must have"):
        eqx_curv.GGNOperator(model, loss, x, y[:, :2])
    with pytest.raises(ValueError, match="one entry per example"):
        eqx_curv.EmpiricalFisherOperator(model, loss, x, y[:3])
    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(21))
    with pytest.raises(TypeError, match="integer class indices"):
        eqx_curv.GGNOperator(model, loss, x, y.astype(jnp.float64))
    with pytest.raises(TypeError, match="loss"):  # jaxtyping, or ours without it
        eqx_curv.GGNOperator(model, lambda o, t: jnp.mean(o), x, y)  # pyright: ignore
    with pytest.raises(ValueError, match="num_samples"):
        eqx_curv.FisherOperator(model, loss, x, key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="leading batch axis"):
        eqx_curv.GGNOperator(model, loss, jnp.asarray(1.0), y)


def test_damping_checks():
    op, _, _ = _get_cached("ggn")
    with pytest.raises(ValueError, match="non-negative"):
        eqx_curv.DampedOperator(op, -1.0)
    with pytest.raises((ValueError, TypeError), match="scalar|damping"):
        eqx_curv.DampedOperator(op, jnp.ones(2))  # jaxtyping, or ours
    nonsym = lx.MatrixLinearOperator(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        eqx_curv.DampedOperator(nonsym, 1.0)
    # Any symmetric lineax operator works, and keeps its PSD tag.
    sym = lx.MatrixLinearOperator(
        jnp.array([[2.0, 1.0], [1.0, 2.0]]),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    damped = eqx_curv.DampedOperator(sym, 1.0)
    assert lx.is_positive_semidefinite(damped)
    np.testing.assert_allclose(damped.as_matrix(), jnp.array([[3.0, 1.0], [1.0, 3.0]]))
    assert not lx.is_positive_semidefinite(
        eqx_curv.DampedOperator(_get_cached("hessian")[0], 1.0)
    )


def test_hessian_closure_gradients_flow():
    """Arrays closed over by `fn` are hoisted, so `jax.grad` reaches them."""
    x0 = jnp.array([1.0, 2.0])

    def solve_norm(data):
        op = eqx_curv.HessianOperator(lambda p: jnp.sum(data * p**4), jnp.ones(2))
        return jnp.sum(lx.linear_solve(op, jnp.ones(2), lx.LU()).value)

    # H = diag(12 data), solution 1 / (12 data); d/d data = -1 / (12 data^2)
    np.testing.assert_allclose(jax.grad(solve_norm)(x0), -1 / (12 * x0**2))


# --- keywords, targets, empty batches, misuse ----------------------------------------


class _WeightedSquaredError(eqx_curv.AbstractLoss):
    """0.5 * sum_c y_c o_c^2: an output Hessian, diag(y), that depends on the targets."""

    hessian_depends_on_targets: ClassVar[bool] = True

    def __call__(self, outputs, targets):
        return 0.5 * jnp.mean(jnp.sum(targets * outputs**2, axis=-1))

    def hvp(self, outputs, tangents, *, targets=None):
        if targets is None:
            raise ValueError("`targets` are needed for this loss's Hessian.")
        return targets * tangents / outputs.shape[0]

    def hessian_sqrt(self, outputs, *, targets=None):
        if targets is None:
            raise ValueError("`targets` are needed for this loss's Hessian.")
        return jax.vmap(jnp.diag)(jnp.sqrt(targets))

    def sample(self, key, outputs):
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)

    def num_positions(self, outputs):
        return 1


def test_targets_only_where_the_loss_hessian_needs_them():
    model, loss, x, y = make_problem("mlp", "mse", jax.random.key(30))
    weighted = _WeightedSquaredError()
    with pytest.raises(ValueError, match="`targets` are needed"):
        eqx_curv.GGNOperator(model, weighted, x)
    with pytest.raises(ValueError, match="exact Fisher"):
        eqx_curv.FisherOperator(model, weighted, x)
    # With targets, the GGN is J^T diag(y) J, checked against the dense oracle.
    np.testing.assert_allclose(
        eqx_curv.GGNOperator(model, weighted, x, y).as_matrix(),
        dense_ggn(model, weighted, x, y),
        atol=1e-12,
    )


def test_model_key_is_the_only_dropout_keyword():
    model, loss, x, y = make_problem("dropout", "softmax", jax.random.key(31))
    key = jax.random.key(32)
    with pytest.raises(TypeError, match="key"):
        eqx_curv.GGNOperator(model, loss, x, y, key=key)  # pyright: ignore
    with pytest.raises(TypeError, match="key"):
        eqx_curv.EmpiricalFisherOperator(model, loss, x, y, key=key)  # pyright: ignore
    # The empirical Fisher applies the dropout key per example, as the GGN does.
    keys = jax.random.split(key, x.shape[0])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def gradient(xi, yi, ki):
        def one(f):
            out = eqx.combine(unravel(f), static)(xi, key=ki)
            return loss(out[None], yi[None])

        return jax.grad(one)(flat)

    g = jax.vmap(gradient)(x, y, keys)
    op = eqx_curv.EmpiricalFisherOperator(model, loss, x, y, model_key=key)
    np.testing.assert_allclose(op.as_matrix(), g.T @ g / x.shape[0], atol=1e-12)


@pytest.mark.parametrize(
    "name", ["ggn", "fisher_exact", "fisher_mc", "empirical_fisher"]
)
def test_empty_batch_is_an_error(name):
    build, _, _ = operator_entry(name)
    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(33))
    with pytest.raises(ValueError, match="empty batch"):
        build(model, loss, x[:0], y[:0], jax.random.key(34))


class _TupleModel(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        out = self.linear(x)
        return out, jnp.sum(out)


def test_misuse_is_a_sentence():
    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(35))
    # A model returning a tuple.
    tuple_model = _TupleModel(eqx.nn.Linear(4, 3, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="must return one array.*tuple"):
        eqx_curv.GGNOperator(tuple_model, loss, x, y)
    # One example where a batch belongs.
    with pytest.raises(ValueError, match="leading batch axis.*inputs\\[None\\]"):
        eqx_curv.GGNOperator(model, loss, x[0])
    # A model that fails on its inputs for another reason still says what to check.
    with pytest.raises(ValueError, match="ONE example"):
        eqx_curv.FisherOperator(model, loss, x[:, :3])
    # A whole model (with an activation function among its leaves) as the parameters
    # of a Hessian, and as a vector.
    with pytest.raises(TypeError, match="eqx.filter\\(model, eqx.is_inexact_array\\)"):
        eqx_curv.HessianOperator(lambda m: jnp.sum(m.layers[0].weight ** 2), model)
    op = eqx_curv.GGNOperator(model, loss, x, y)
    with pytest.raises(ValueError, match="activation.*eqx.filter\\(model"):
        op.mv(model)
    # A filter spec that does not fit the model, or selects nothing.
    with pytest.raises(ValueError, match="filter_spec"):
        eqx_curv.GGNOperator(model, loss, x, filter_spec=[True, False])
    with pytest.raises(ValueError, match="filter_spec"):
        eqx_curv.GGNOperator(model, loss, x, filter_spec=False)


# --- part of the parameters: frozen layers, a fine-tuned head --------------------------


def test_curvature_over_part_of_the_parameters():
    model, loss, x, y = make_problem("layernorm", "softmax", jax.random.key(36))
    # A callable spec: the weight matrices only.
    spec = jax.tree.map(
        lambda leaf: eqx.is_inexact_array(leaf) and leaf.ndim == 2, model
    )
    mask = parameter_mask(model, spec)
    op = eqx_curv.EmpiricalFisherOperator(
        model,
        loss,
        x,
        y,
        filter_spec=lambda leaf: eqx.is_array(leaf) and leaf.ndim == 2,
    )
    assert op.in_structure() == jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), eqx.filter(model, spec)
    )
    np.testing.assert_allclose(
        op.as_matrix(),
        sub_block(dense_empirical_fisher(model, loss, x, y), mask),
        atol=1e-12,
    )
    # The Hessian takes any parameters: the selected part, the rest closed over.
    params, static = eqx.partition(model, head_filter_spec(model))

    def fn(p):
        return loss(jax.vmap(eqx.combine(p, static))(x), y)

    hessian = eqx_curv.HessianOperator(fn, params)
    dense = sub_block(
        dense_hessian(model, loss, x, y), parameter_mask(model, head_filter_spec(model))
    )
    np.testing.assert_allclose(hessian.as_matrix(), dense, atol=_tol(dense))
    # Solvers see only the selected unknowns.
    b = random_like(jax.random.key(37), params)
    damped = eqx_curv.DampedOperator(hessian, 10.0)
    sol = lx.linear_solve(damped, b, lx.GMRES(rtol=1e-12, atol=1e-12))
    np.testing.assert_allclose(
        ravel(sol.value),
        jnp.linalg.solve(dense + 10 * jnp.eye(dense.shape[0]), ravel(b)),
        atol=1e-10,
    )


# --- models with state (eqx.nn.BatchNorm) --------------------------------------------


def test_stateful_model_at_fixed_state():
    model, state = make_batchnorm(jax.random.key(38))
    _, loss, x, y = make_problem("mlp", "softmax", jax.random.key(39))
    running = jax.tree.map(jnp.copy, jax.tree.leaves(state))
    op = eqx_curv.GGNOperator(model, loss, x, y, state=state)
    size = sum(s.size for s in jax.tree.leaves(op.in_structure()))
    assert size == 53  # 4*5+5, the BatchNorm's weight and bias, 5*3+3
    dense = dense_ggn(model, loss, x, y, state=state)
    matrix = op.as_matrix()
    np.testing.assert_allclose(matrix, dense, atol=_tol(dense))
    fisher = eqx_curv.FisherOperator(model, loss, x, state=state).as_matrix()
    np.testing.assert_allclose(fisher, dense, atol=_tol(dense))
    # The state is held fixed: never differentiated, never updated.
    for before, after in zip(running, jax.tree.leaves(state)):
        np.testing.assert_array_equal(before, after)

    # What a user writes with the state closed over, or with a model built without
    # `make_with_state` (initial statistics held in its `StateIndex`es): the running
    # statistics are still no parameters. (Without this, 63 unknowns.)
    class Closed(eqx.Module):
        model: BatchNormNet
        state: eqx.nn.State

        def __call__(self, x):
            return self.model(x, self.state)[0]

    closed = eqx_curv.GGNOperator(Closed(model, state), loss, x, y)
    np.testing.assert_allclose(closed.as_matrix(), dense, atol=_tol(dense))
    unsplit = eqx.nn.inference_mode(BatchNormNet(jax.random.key(0), jnp.float64))
    op = eqx_curv.GGNOperator(unsplit, loss, x, y, state=eqx.nn.State(unsplit))
    assert sum(s.size for s in jax.tree.leaves(op.in_structure())) == 53

    # In training mode, the batch statistics of `inputs` (the state still fixed).
    training = eqx.nn.inference_mode(model, False)
    op = eqx_curv.GGNOperator(training, loss, x, y, state=state)
    dense = dense_ggn(training, loss, x, y, state=state, axis_name="batch")
    np.testing.assert_allclose(op.as_matrix(), dense, atol=_tol(dense))

    with pytest.raises(ValueError, match="state="):
        eqx_curv.GGNOperator(model, loss, x, y)


def test_out_of_range_labels_are_refused_at_construction():
    # Concrete labels are checked when the operator is built, not at its first product.
    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(31))
    bad = y.at[0].set(NUM_OUTPUTS)
    for build in (eqx_curv.GGNOperator, eqx_curv.EmpiricalFisherOperator):
        with pytest.raises(ValueError, match="class indices in"):
            build(model, loss, x, bad)
