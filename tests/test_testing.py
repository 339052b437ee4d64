"""eqx_curv.testing: each assertion catches a planted bug and passes the real object;
the strategies are deterministic under `ci` on fixed shapes; the conformance suites
pass on what eqx_curv ships and name the broken property on planted defects."""

import functools
import subprocess
import sys

import equinox as eqx
import hypothesis
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import NETWORK_OPTIMIZERS, operator_entry
from models import make_problem

import eqx_curv
import eqx_curv.testing as ect


def _ci(max_examples=6):
    return hypothesis.settings(
        hypothesis.settings.get_profile("ci"), max_examples=max_examples
    )


# ---------------------------------------------------------------------------------------
# The package: optional hypothesis, profiles.


def test_eqx_curv_does_not_import_hypothesis_or_pytest():
    code = (
        "import sys, eqx_curv\n"
        "assert 'hypothesis' not in sys.modules and 'pytest' not in sys.modules\n"
        "sys.modules['hypothesis'] = None\n"
        "try:\n"
        "    import eqx_curv.testing\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "eqx_curv.testing needs hypothesis" in out.stdout
    assert "pip install 'eqx_curv[testing]'" in out.stdout


def test_profiles_are_registered_and_loaded_from_the_environment(monkeypatch):
    ect.register_profiles(prefix="t15-")
    ci = hypothesis.settings.get_profile("t15-ci")
    assert ci.derandomize and ci.deadline is None and ci.max_examples == 20
    assert hypothesis.settings.get_profile("t15-dev").max_examples == 10
    assert hypothesis.settings.get_profile("t15-gpu").derandomize
    # The suite itself runs under these profiles (conftest imports them).
    assert hypothesis.settings.get_profile("ci").derandomize
    current = hypothesis.settings.get_current_profile_name()
    try:
        monkeypatch.setenv("T15_PROFILE", "t15-ci")
        assert ect.load_profile(environment_variable="T15_PROFILE") == "t15-ci"
        assert hypothesis.settings.default.derandomize
        monkeypatch.setenv("T15_PROFILE", "nonesuch")
        with pytest.raises(ValueError, match="No hypothesis profile is named"):
            ect.load_profile(environment_variable="T15_PROFILE")
    finally:
        hypothesis.settings.load_profile(current)


# ---------------------------------------------------------------------------------------
# Strategies: deterministic under `ci`, on a fixed set of shapes.


def _draw_all(strategy, max_examples=6):
    drawn = []

    @_ci(max_examples)
    @hypothesis.given(strategy)
    def collect(value):
        drawn.append(value)

    collect()
    return drawn


def _same_draws(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
        assert len(xs) == len(ys)
        for u, v in zip(xs, ys):
            if eqx.is_array(u):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_matrix_strategies_are_deterministic_with_fixed_shapes():
    sizes, conditions = (2, 5), (1.0, 1e3)
    spd = ect.spd_matrices(sizes, conditions, (jnp.float64, jnp.float32))
    psd = ect.psd_matrices(sizes, conditions, nullities=(1, 2))
    first, second = _draw_all(spd), _draw_all(spd)
    _same_draws(first, second)
    for m in first:
        assert m.shape in {(2, 2), (5, 5)} and m.dtype in (jnp.float32, jnp.float64)
        w = np.linalg.eigvalsh(np.asarray(m, np.float64))
        assert w[0] > 0 and w[-1] / w[0] < 1.01e3
        np.testing.assert_array_equal(m, m.T)
    for m in _draw_all(psd):
        w = np.linalg.eigvalsh(np.asarray(m))
        assert m.shape in {(2, 2), (5, 5)}
        assert abs(w[0]) < 1e-14 and w[-1] > 0.99  # singular, positive semidefinite


def test_pair_strategies_are_deterministic_with_fixed_shapes():
    factors = ect.kronecker_factors(((1, 1), (2, 3)))
    pairs = ect.secant_pairs((2, 5))
    for strategy in (factors, pairs):
        _same_draws(_draw_all(strategy), _draw_all(strategy))
    for a, b in _draw_all(factors):
        assert (a.shape, b.shape) in {((1, 1), (1, 1)), ((2, 2), (3, 3))}
        assert np.linalg.eigvalsh(a)[0] > 0 and np.linalg.eigvalsh(b)[0] > 0
    for s, y in _draw_all(pairs):
        assert s.shape == y.shape and s.shape in {(2,), (5,)}
        assert float(y @ s) > 0


def test_model_problems_and_vectors_are_deterministic_with_fixed_shapes():
    # One loss: building each kind of model the first time costs most.
    strategy = ect.model_problems(losses=("softmax",), batch_sizes=(3,))
    first, second = _draw_all(strategy, 4), _draw_all(strategy, 4)
    _same_draws(first, second)
    shapes = {(3, 4), (3, 1, 6, 6), (3, 3, 2)}
    for model, loss, x, y in first:
        assert x.shape in shapes
        outputs = jax.vmap(model)(x)
        assert outputs.shape == (3, ect.NUM_OUTPUTS)
        assert y.shape[0] == 3 and np.isfinite(float(loss(outputs, y)))
    problem = ect.model_problem("attention", "mse", jax.random.key(0))
    op = eqx_curv.GGNOperator(*problem)
    vectors = ect.vectors(op)
    drawn = _draw_all(vectors, 3)
    _same_draws(drawn, _draw_all(vectors, 3))
    for v in drawn:
        assert eqx.filter_eval_shape(lambda v: v, v) == op.in_structure()


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="`sizes` must hold at least one"):
        ect.spd_matrices(sizes=())
    with pytest.raises(ValueError, match="`kinds` must be among"):
        ect.model_problems(kinds=("rnn",))
    with pytest.raises(TypeError, match="floating-point leaves"):
        ect.vectors({"w": jax.ShapeDtypeStruct((2,), jnp.int32)})
    with pytest.raises(ValueError, match="`condition` must be at least 1"):
        ect.spd_matrix(3, 0.5, 0)


# ---------------------------------------------------------------------------------------
# Assertions: each catches its planted bug, with the worst violation in the message,
# and passes on the correct object.


@functools.cache
def _ggn():
    model, loss, x, y = make_problem("mlp", "mse", jax.random.key(3))
    return eqx_curv.GGNOperator(model, loss, x, y)


def test_assert_symmetric():
    ect.assert_symmetric(_ggn())
    a = np.asarray(ect.spd_matrix(4, 10.0, 0))
    ect.assert_symmetric(a)
    bad = a.copy()
    bad[1, 3] += 1e-3
    with pytest.raises(AssertionError, match=r"not symmetric.*A\[1, 3\]") as info:
        ect.assert_symmetric(bad)
    assert "u^T A v - v^T A u = 0.001" in str(info.value)
    # On a parameter PyTree, the message names the parameter entries.
    structure = {"b": jax.ShapeDtypeStruct((2,), jnp.float64)}
    structure["w"] = jax.ShapeDtypeStruct((1, 2), jnp.float64)
    _, unravel = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda s: jnp.zeros(s.shape), structure)
    )
    op = lx.FunctionLinearOperator(
        lambda v: unravel(jnp.asarray(bad) @ jax.flatten_util.ravel_pytree(v)[0]),
        structure,
    )
    with pytest.raises(
        AssertionError, match=r"row \['b'\]\[1\], column \['w'\]\[0, 1\]"
    ):
        ect.assert_symmetric(op)


class _NegatedSquaredError(eqx_curv.AbstractLoss):
    """-0.5 |o - y|^2: a concave loss, whose "GGN" is negative semidefinite."""

    hessian_depends_on_targets = False

    def __call__(self, outputs, targets):
        return -0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))

    def hvp(self, outputs, tangents, *, targets=None):
        return -tangents / outputs.shape[0]

    def hessian_sqrt(self, outputs, *, targets=None):
        raise NotImplementedError

    def sample(self, key, outputs):
        raise NotImplementedError

    def num_positions(self, outputs):
        return 1


def test_assert_psd():
    ect.assert_psd(_ggn())
    model, _, x, y = make_problem("mlp", "mse", jax.random.key(3))
    indefinite = eqx_curv.GGNOperator(model, _NegatedSquaredError(), x, y)
    assert lx.is_positive_semidefinite(indefinite)  # the tag is wrong: the planted bug
    with pytest.raises(AssertionError, match="not positive semidefinite") as info:
        ect.assert_psd(indefinite)
    message = str(info.value)
    assert "has the eigenvalue -" in message and "Through `mv`, v^T A v = -" in message
    assert "largest entries" in message and ".layers[" in message


class _MatrixOperator(eqx_curv.AbstractCurvatureOperator):
    """A matrix on a flat vector whose `mv` uses `product` while `as_matrix()` returns
    `matrix`: the two disagree where they differ (a planted bug)."""

    matrix: jax.Array
    product: jax.Array
    tags: frozenset = eqx.field(static=True)

    def _mv(self, vector):
        return self.product @ vector

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)

    def as_matrix(self):
        return self.matrix


def _planted_mv():
    a = jnp.asarray(ect.spd_matrix(5, 10.0, 1))
    psd = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    return a, _MatrixOperator(a, a.at[2, 2].add(0.5), psd)


def test_assert_matches_dense():
    model, loss, x, y = make_problem("mlp", "mse", jax.random.key(3))
    _, oracle, _ = operator_entry("ggn")
    ect.assert_matches_dense(_ggn(), oracle(model, loss, x, y))
    a, op = _planted_mv()
    with pytest.raises(AssertionError, match=r"^`mv` disagrees") as info:
        ect.assert_matches_dense(op, a)
    # Only `mv` is wrong; the worst vector is along the broken entry.
    assert "`as_matrix()` disagrees" not in str(info.value)
    assert "(A v)[2]" in str(info.value) and "at vector[2]" in str(info.value)
    with pytest.raises(ValueError, match="5 x 5 matrix"):
        ect.assert_matches_dense(op, a[:4, :4])


def _bfgs_with_wrong_rho(inv_hessian, s, y):
    """The inverse BFGS update with rho = 1 / s^T s instead of 1 / y^T s."""
    by = inv_hessian @ y
    rho = 1 / (s @ s)
    return (
        inv_hessian
        - rho * (jnp.outer(s, by) + jnp.outer(by, s))
        + (rho**2 * (y @ by) + rho) * jnp.outer(s, s)
    )


def test_assert_secant():
    from eqx_curv._optimizers.quasi_newton import bfgs_inverse_update

    start = jnp.asarray(ect.spd_matrix(4, 10.0, 2))
    s = jnp.asarray([1.0, -0.5, 0.25, 2.0])
    y = jnp.asarray(ect.spd_matrix(4, 100.0, 3)) @ s
    good = bfgs_inverse_update(start, s, y)
    ect.assert_secant(good, s, y, form="inverse")
    ect.assert_secant(jnp.linalg.inv(good), s, y)
    ect.assert_secant(lx.MatrixLinearOperator(good), s, y, form="inverse")
    with pytest.raises(AssertionError, match=r"secant condition B y = s fails") as info:
        ect.assert_secant(_bfgs_with_wrong_rho(start, s, y), s, y, form="inverse")
    assert "Worst component" in str(info.value) and "y^T s =" in str(info.value)
    with pytest.raises(ValueError, match="y\\^T s > 0"):
        ect.assert_secant(good, s, -y)


def _power_of_two_root(matrix, p):
    """The inverse root with the reference page's defect: exponent 2^round(log2 p)."""
    w, q = jnp.linalg.eigh(matrix)
    rounded = 2 ** round(np.log2(p))
    return (q * w[None, :] ** (-1.0 / rounded)) @ q.T


@functools.partial(jax.jit, static_argnums=1)
def _root(matrix, p):
    return eqx_curv.inverse_pth_root(matrix, p)


def test_assert_inverse_root():
    ect.assert_inverse_root(_root, 3, sizes=(8,))
    # The defect is invisible where p is a power of two, and caught elsewhere.
    ect.assert_inverse_root(
        _power_of_two_root, 4, sizes=(8,), dtype=jnp.float64, safety=10.0
    )
    with pytest.raises(AssertionError, match="not the inverse 3-th root") as info:
        ect.assert_inverse_root(_power_of_two_root, 3, sizes=(8,), dtype=jnp.float64)
    message = str(info.value)
    assert "on 2 of 3 matrices" in message  # the identity-like one is fine
    assert "acts like an inverse 4-th root" in message
    with pytest.raises(ValueError, match="`p` must be an int"):
        ect.assert_inverse_root(_root, 0)


# ---------------------------------------------------------------------------------------
# check_operator: passes on every operator eqx_curv ships, names each planted defect.


# That `check_operator` passes on every operator eqx_curv ships is
# tests/test_operators.py::test_check_operator_passes_on_every_operator (it replaces
# the property test that was there, and shares that file's operators and oracles).


def _failures(op, **kwargs):
    with pytest.raises(ect.ConformanceError) as info:
        ect.check_operator(op, **kwargs)
    for name in info.value.failures:
        assert f"[{name}]" in str(info.value)
    return info.value.failures


def test_check_operator_names_a_non_linear_operator():
    a = jnp.asarray(ect.spd_matrix(4, 10.0, 4))
    op = lx.FunctionLinearOperator(
        lambda v: a @ v + 0.1 * v**3,
        jax.ShapeDtypeStruct((4,), jnp.float64),
        lx.symmetric_tag,
    )
    assert "linearity" in _failures(op)


class _WrongTranspose(eqx_curv.AbstractCurvatureOperator):
    """A non-symmetric matrix whose `transpose` returns itself (a planted bug)."""

    matrix: jax.Array
    tags: frozenset = eqx.field(static=True)

    def _mv(self, vector):
        return self.matrix @ vector

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)

    def transpose(self):
        return self


def test_check_operator_names_a_wrong_transpose():
    a = jnp.asarray(ect.spd_matrix(4, 10.0, 5)).at[0, 1].add(1.0)
    failures = _failures(_WrongTranspose(a, frozenset()), symmetric=False)
    assert list(failures) == ["transpose"]
    assert "`operator.T.mv(v)` differs from A^T v" in failures["transpose"]


class _Unchecked(eqx_curv.AbstractCurvatureOperator):
    """`scale * I` on a 3-vector, whose `mv` skips the structure check (a planted
    bug: it accepts any PyTree)."""

    scale: jax.Array
    tags: frozenset = eqx.field(static=True)

    def _mv(self, vector):
        return jax.tree.map(lambda x: self.scale * x, vector)

    def in_structure(self):
        return jax.ShapeDtypeStruct((3,), jnp.float64)

    def mv(self, vector):
        return self._mv(vector)


def test_check_operator_names_mv_against_as_matrix_and_false_tags():
    a, op = _planted_mv()
    failures = _failures(op)
    # Direct solvers read `as_matrix()`, so they disagree with `mv` as well.
    assert set(failures) == {"mv_vs_as_matrix", "solvers"}
    assert (
        "`as_matrix()` disagrees with the matrix `mv` gives"
        in (failures["mv_vs_as_matrix"])
    )
    # A symmetric, indefinite matrix tagged positive semidefinite, and an operator
    # that accepts vectors of any structure.
    w = jnp.asarray(ect.spd_matrix(4, 10.0, 6)) - 0.5 * jnp.eye(4)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    failures = _failures(
        lx.FunctionLinearOperator(
            lambda v: w @ v, jax.ShapeDtypeStruct((4,), jnp.float64), tags
        )
    )
    # Cholesky and CG, which the tag allows, fail on it too.
    assert set(failures) == {"positive_semidefinite", "solvers"}
    assert "has the eigenvalue -0.4" in failures["positive_semidefinite"]
    failures = _failures(_Unchecked(jnp.asarray(2.0), frozenset(tags)))
    assert set(failures) == {"wrong_structure"}
    assert "was accepted without an error" in failures["wrong_structure"]


# ---------------------------------------------------------------------------------------
# check_optimizer: passes on every network optimizer, names each planted defect.

# The whole protocol on every optimizer compiles several steps each; the default suite
# runs it on these (a gradient method, a diagonal Fisher, a curvature solve) and the
# rest under `-m slow`.
_FAST_OPTIMIZERS = ("sgd",)


@pytest.mark.parametrize(
    "name",
    [
        n if n in _FAST_OPTIMIZERS else pytest.param(n, marks=pytest.mark.slow)
        for n in NETWORK_OPTIMIZERS
    ],
)
def test_check_optimizer_passes_on_every_network_optimizer(name):
    report = ect.check_optimizer(NETWORK_OPTIMIZERS[name]())
    assert set(report.values()) == {"passed"}


class _Recompiling(eqx.Module):
    """SGD that keeps a Python int step counter in its state (a planted bug: it is
    static to jit, so every step recompiles)."""

    inner: eqx_curv.SGD

    def init(self, model):
        return self.inner.init(model), 0

    def step(self, model, state, loss, inputs, targets, *, key=None):
        inner, count = state
        model, inner, info = self.inner.step(
            model, inner, loss, inputs, targets, key=key
        )
        return model, (inner, count + 1), info


class _NaNState(eqx.Module):
    """SGD that sums the reported losses into its state without the non-finite guard
    (a planted bug: a NaN batch leaves a NaN in the state)."""

    inner: eqx_curv.SGD

    def init(self, model):
        return self.inner.init(model), jnp.zeros((), jnp.float64)

    def step(self, model, state, loss, inputs, targets, *, key=None):
        inner, total = state
        model, inner, info = self.inner.step(
            model, inner, loss, inputs, targets, key=key
        )
        return model, (inner, total + info.loss.astype(total.dtype)), info


def _optimizer_failures(opt):
    with pytest.raises(ect.ConformanceError) as info:
        ect.check_optimizer(opt, train_steps=2)
    return info.value.failures


def test_check_optimizer_names_a_recompiling_optimizer():
    failures = _optimizer_failures(_Recompiling(eqx_curv.SGD()))
    assert {"init", "no_recompile"} <= set(failures)
    assert "traced `step` again" in failures["no_recompile"]
    assert "[1] (int)" in failures["init"]
    assert failures.keys() == {"init", "no_recompile"}


def test_check_optimizer_names_a_nan_in_the_state():
    failures = _optimizer_failures(_NaNState(eqx_curv.SGD()))
    assert {"non_finite_skip"} <= set(failures)
    message = failures["non_finite_skip"]
    assert "a NaN in the batch: the state changed" in message
    assert "non-finite values in [1]" in message
