"""Network optimizers: one protocol suite over `helpers.NETWORK_OPTIMIZERS`, dense
references for FisherAdam's statistics, the optax adapters, and the misuse sentences.

Compilation dominates the cost, so every small case goes through ONE jitted step
(`_step`) on one small model and loss: the non-finite cases differ only in array
values (a NaN input, an infinite loss shift, a zero under a square root), never in
structure, and reuse the compiled step.
"""

import collections
import functools
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NETWORK_OPTIMIZERS


_TRACES = collections.Counter()
_NAMES = list(NETWORK_OPTIMIZERS)


@functools.cache
def _losses():
    # One class for the whole file: a new class would be a new static type to
    # `eqx.filter_jit`, and recompile the shared step.
    import eqx_curv

    class ShiftedCrossEntropy(eqx_curv.AbstractLoss):
        """Softmax cross-entropy plus a constant `shift` (inf: a non-finite loss whose
        gradient is finite). Curvature and sampling are the cross-entropy's."""

        shift: jax.Array
        hessian_depends_on_targets = False

        def __call__(self, outputs, targets):
            base = eqx_curv.SoftmaxCrossEntropy()(outputs, targets)
            return base + self.shift.astype(base.dtype)

        def hvp(self, outputs, tangents, *, targets=None):
            return eqx_curv.SoftmaxCrossEntropy().hvp(outputs, tangents)

        def hessian_sqrt(self, outputs, *, targets=None):
            return eqx_curv.SoftmaxCrossEntropy().hessian_sqrt(outputs)

        def sample(self, key, outputs):
            return eqx_curv.SoftmaxCrossEntropy().sample(key, outputs)

        def num_positions(self, outputs):
            return 1

    return ShiftedCrossEntropy


class _Net(eqx.Module):
    """A tanh MLP with dropout on its inputs (active when called with a key), times
    `1 + 0 * sqrt(s)`: with `s = 0` the loss is finite but the gradient with respect
    to `s` is NaN (0 * inf)."""

    dropout: eqx.nn.Dropout
    mlp: eqx.nn.MLP
    s: jax.Array

    def __init__(self, dtype, s=1.0):
        self.dropout = eqx.nn.Dropout(0.25)
        self.mlp = eqx.nn.MLP(4, 3, 6, 1, jnp.tanh, key=jax.random.key(0), dtype=dtype)
        self.s = jnp.asarray(s, dtype)

    def __call__(self, x, *, key=None):
        x = self.dropout(x, key=key, inference=key is None)
        return self.mlp(x) * (1 + 0 * jnp.sqrt(self.s))


def _problem(dtype=jnp.float64, s=1.0, shift=0.0, nan_input=False, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (8, 4), dtype)
    if nan_input:
        x = x.at[3, 1].set(jnp.nan)
    y = jax.random.randint(ky, (8,), 0, 3)
    return _Net(dtype, s), _losses()(jnp.asarray(shift, dtype)), x, y


@eqx.filter_jit
def _step(opt, model, state, loss, x, y, key):
    _TRACES[type(opt).__name__] += 1  # runs only while tracing
    return opt.step(model, state, loss, x, y, key=key)


def _same(a, b):
    """Bitwise equality of two PyTrees of arrays."""
    a, b = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _finite(tree):
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


def _dtypes(tree):
    return [x.dtype for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]


# ---------------------------------------------------------------------------------------
# The protocol, for every registered optimizer.


@pytest.mark.parametrize("name", _NAMES)
def test_constructs_with_no_arguments(name):
    import eqx_curv

    opt = NETWORK_OPTIMIZERS[name]()
    assert isinstance(opt, eqx_curv.AbstractNetworkOptimizer)
    # The class itself constructs with no arguments, and that is a usable optimizer:
    # its init gives a state on a model.
    default = type(opt)()
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    assert isinstance(default.init(model), eqx.Module)


@pytest.mark.parametrize("name", _NAMES)
def test_trains_digits(name):
    import eqx_curv
    from eqx_curv.experiments.data import digits

    inputs, labels = digits()
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    opt = NETWORK_OPTIMIZERS[name]()
    model = eqx.nn.MLP(
        64, 10, 32, 1, jnp.tanh, key=jax.random.key(0), dtype=jnp.float32
    )
    loss = eqx_curv.SoftmaxCrossEntropy()
    params, static = eqx.partition(model, eqx.is_array)

    @eqx.filter_jit
    def train(params, state):
        def body(carry, key):
            params, state = carry
            k1, k2 = jax.random.split(key)
            batch = jax.random.choice(k1, labels.shape[0], (64,), replace=False)
            model, state, info = opt.step(
                eqx.combine(params, static),
                state,
                loss,
                inputs[batch],
                labels[batch],
                key=k2,
            )
            return (eqx.filter(model, eqx.is_array), state), info

        keys = jax.random.split(jax.random.key(1), 150)
        return jax.lax.scan(body, (params, state), keys)

    def full_loss(params):
        return float(loss(jax.vmap(eqx.combine(params, static))(inputs), labels))

    (trained, _), infos = train(params, opt.init(model))
    before, after = full_loss(params), full_loss(trained)
    assert not bool(infos.skipped.any())
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", _NAMES)
def test_dtypes_and_no_recompilation(name, dtype):
    opt = NETWORK_OPTIMIZERS[name]()
    model, loss, x, y = _problem(dtype)
    state = opt.init(model)
    model, state, info = _step(opt, model, state, loss, x, y, jax.random.key(0))
    traces = _TRACES[type(opt).__name__]
    _, x2, y2 = _problem(dtype, seed=1)[1:]
    new_model, new_state, info = _step(
        opt, model, state, loss, x2, y2, jax.random.key(1)
    )
    assert _TRACES[type(opt).__name__] == traces, "the second step recompiled"
    assert _dtypes(new_model) == _dtypes(model) == [dtype] * 5
    assert jax.tree.map(lambda a: a.dtype, state) == jax.tree.map(
        lambda a: a.dtype, new_state
    )
    assert all(d == dtype for d in _dtypes(new_state.stats))
    assert int(new_state.count) == 2
    assert info.loss.dtype == dtype and info.loss.shape == ()
    assert info.skipped.dtype == jnp.bool_ and not bool(info.skipped)
    assert info.learning_rate.dtype == info.update_norm.dtype == dtype
    assert float(info.update_norm) > 0


@pytest.mark.parametrize(
    "case", ["nan_input", "infinite_loss", "nan_gradient"], ids=lambda c: c
)
@pytest.mark.parametrize("name", _NAMES)
def test_non_finite_step_is_skipped(name, case):
    opt = NETWORK_OPTIMIZERS[name]()
    model, loss, x, y = _problem()
    # A state that has seen a step, so momentum and moments are non-zero.
    model, state, _ = _step(opt, model, opt.init(model), loss, x, y, jax.random.key(0))
    bad = {
        "nan_input": dict(nan_input=True),
        "infinite_loss": dict(shift=jnp.inf),
        "nan_gradient": dict(s=0.0),
    }[case]
    bad_model, bad_loss, bad_x, _ = _problem(**bad)
    # Keep the trained weights; only `s` changes in the NaN-gradient case.
    bad_model = eqx.tree_at(lambda m: m.s, model, bad_model.s)
    new_model, new_state, info = _step(
        opt, bad_model, state, bad_loss, bad_x, y, jax.random.key(1)
    )
    assert bool(info.skipped)
    assert _same(new_model, bad_model) and _same(new_state, state)
    assert _finite(eqx.filter(new_model, eqx.is_array)) and _finite(new_state)
    assert float(info.update_norm) == 0
    if case == "nan_gradient":
        assert bool(jnp.isfinite(info.loss))
    if case == "infinite_loss":
        assert not bool(jnp.isfinite(info.loss))


@pytest.mark.parametrize("case", ["update", "state"])
def test_step_is_skipped_when_only_the_update_or_the_new_state_is_not_finite(case):
    # A finite batch, loss and gradient, and still a non-finite step: an update that
    # overflows (a huge learning rate), or a new state that does while the update
    # stays finite (Adam's second moment of a gradient of 1e25 is infinite in float32,
    # and the update m / sqrt(v) is then 0).
    import eqx_curv

    model = eqx.nn.Linear(4, 3, key=jax.random.key(0), dtype=jnp.float32)
    loss = eqx_curv.SoftmaxCrossEntropy()
    x = jax.random.normal(jax.random.key(1), (8, 4), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
    if case == "update":
        opt, x = eqx_curv.SGD(learning_rate=3e38), 100 * x
    else:
        opt, x = eqx_curv.FisherAdam(), 1e25 * x
    grads = jax.grad(lambda m: loss(jax.vmap(m)(x), y))(model)
    assert _finite(grads) and bool(jnp.isfinite(loss(jax.vmap(model)(x), y)))
    scale = 3e38 if case == "update" else grads.weight  # the premise: g * scale
    assert not _finite(jnp.asarray(scale, jnp.float32) * grads.weight)
    state = opt.init(model)
    new_model, new_state, info = _step(opt, model, state, loss, x, y, None)
    assert bool(info.skipped) and float(info.update_norm) == 0
    assert _same(new_model, model) and _same(new_state, state)


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_tree_all_finite_finds_one_non_finite_entry_anywhere(bad):
    # The guard's check sums `x * 0` over the leaves of each size: exact for values
    # whose sum would overflow, for 16-bit and complex leaves, and for leaves of
    # 4096 entries or more (where a max of NaNs once gave -inf on CPU).
    from eqx_curv._misc import tree_all_finite

    tree = {
        "big": jnp.full((70, 80), 3e38, jnp.float32),
        "same_size": [jnp.full((80, 70), 3e38, jnp.float32), jnp.zeros(5600)],
        "half": jnp.ones((3, 4), jnp.bfloat16),
        "double": jnp.ones(7, jnp.float64),
        "scalar": jnp.asarray(1.0, jnp.float32),
        "complex": jnp.ones(2, jnp.complex64),
        "ints": jnp.arange(4),
        "empty": jnp.zeros((0, 3)),
    }
    check = jax.jit(tree_all_finite)  # one compilation: only values change below
    assert bool(check(tree)) and bool(tree_all_finite(tree))
    leaves, treedef = jax.tree.flatten(tree)
    for i, leaf in enumerate(leaves):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact) or leaf.size == 0:
            continue  # integers are finite; nothing to set in an empty leaf
        value = complex(0, bad) if jnp.iscomplexobj(leaf) else bad
        for j in sorted({0, leaf.size // 2, leaf.size - 1}):
            bad_leaf = leaf.reshape(-1).at[j].set(value).reshape(leaf.shape)
            bad_tree = jax.tree.unflatten(
                treedef, [*leaves[:i], bad_leaf, *leaves[i + 1 :]]
            )
            assert not bool(check(bad_tree)), (i, j)


def test_tree_all_finite_reduces_once_per_leaf_size():
    # One reduction per leaf size and dtype, not one per leaf: 30 leaves of two sizes
    # give two (every reduction is a kernel of its own on CPU).
    from eqx_curv._misc import tree_all_finite

    tree = [jnp.ones((4, 5)), jnp.ones(20), jnp.ones(3)] * 10
    eqns = jax.make_jaxpr(tree_all_finite)(tree).eqns
    reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_and")]
    assert len(reductions) == 2


def test_guard_neither_branches_nor_copies_the_incoming_state():
    # The guard selects the new or the incoming leaves by a `where` fused into the
    # computation of each new leaf. A `lax.cond` returning the incoming model and
    # state from a branch made XLA copy all of them (inputs that are not donated)
    # at every step.
    import eqx_curv

    opt = eqx_curv.FisherAdam()
    model = eqx.nn.MLP(4, 3, 8, 4, key=jax.random.key(0))
    loss = eqx_curv.SoftmaxCrossEntropy()
    x, y = jnp.zeros((8, 4)), jnp.zeros((8,), jnp.int32)
    step = eqx.filter_jit(lambda o, m, s: o.step(m, s, loss, x, y))
    text = step.lower(opt, model, opt.init(model)).compile().compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert " conditional(" not in entry
    assert entry.count(" copy(") < len(leaves), entry.count(" copy(")


@pytest.mark.parametrize("name", _NAMES)
def test_state_round_trips_and_resumes_bitwise(name):
    opt = NETWORK_OPTIMIZERS[name]()
    model, loss, x, y = _problem()
    state = opt.init(model)
    keys = jax.random.split(jax.random.key(5), 4)
    for key in keys[:2]:
        model, state, _ = _step(opt, model, state, loss, x, y, key)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, opt.init(model))
    assert _same(restored, state)
    m1, s1, m2, s2 = model, state, model, restored
    for key in keys[2:]:
        m1, s1, _ = _step(opt, m1, s1, loss, x, y, key)
        m2, s2, _ = _step(opt, m2, s2, loss, x, y, key)
    assert _same(m1, m2) and _same(s1, s2)


@pytest.mark.parametrize("name", _NAMES)
def test_dropout_gets_per_example_keys(name):
    from eqx_curv._operators.ggn import apply_batched

    opt = NETWORK_OPTIMIZERS[name]()
    model, loss, x, y = _problem()
    key = jax.random.key(7)
    _, _, info = _step(opt, model, opt.init(model), loss, x, y, key)
    # The documented split: the model's key is the first half, split per example.
    model_key = jax.random.split(key)[0]
    expected = loss(apply_batched(model, x, model_key), y)
    np.testing.assert_allclose(info.loss, expected, rtol=1e-12)
    one_key = jax.vmap(lambda xi: model(xi, key=model_key))(x)
    assert not np.allclose(info.loss, loss(one_key, y))
    assert not np.allclose(info.loss, loss(jax.vmap(model)(x), y))


# ---------------------------------------------------------------------------------------
# Dense references (float64, tiny model).


@eqx.filter_jit
def _batch_grad(model, loss, x, y, model_key=None):
    from eqx_curv._operators.ggn import apply_batched

    return eqx.filter_grad(lambda m: loss(apply_batched(m, x, model_key), y))(model)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_fisher_adam_second_moment_is_ema_of_squared_gradients(fisher):
    import eqx_curv
    from eqx_curv._operators.ggn import apply_batched

    opt = eqx_curv.FisherAdam(fisher=fisher, fisher_decay=0.9, learning_rate=0.05)
    model, loss, x, y = _problem()
    state = opt.init(model)
    expected = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    keys = jax.random.split(jax.random.key(11), 3)
    for key in keys:
        # The step's split: dropout from the first half (per example), sampled
        # labels from the second.
        model_key, own_key = jax.random.split(key)
        if fisher == "empirical":
            labels = y
        else:
            labels = loss.sample(own_key, apply_batched(model, x, model_key))
        g = eqx.filter(
            _batch_grad(model, loss, x, labels, model_key), eqx.is_inexact_array
        )
        expected = jax.tree.map(lambda v, gi: 0.9 * v + 0.1 * gi**2, expected, g)
        model, state, _ = _step(opt, model, state, loss, x, y, key)
        np.testing.assert_allclose(
            jax.flatten_util.ravel_pytree(state.stats.fisher)[0],
            jax.flatten_util.ravel_pytree(expected)[0],
            rtol=1e-10,
            atol=1e-14,
        )


def _optax_run(tx, model, loss, x, y, steps):
    import optax

    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        # optax itself mixes Python floats with int32 counts, which the suite's strict
        # promotion refuses; ours runs strict.
        grads = eqx.filter(
            _batch_grad(eqx.combine(params, static), loss, x, y), eqx.is_inexact_array
        )
        with jax.numpy_dtype_promotion("standard"):
            updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _step_run(opt, model, loss, x, y, steps):
    state = opt.init(model)
    for _ in range(steps):
        model, state, _ = _step(opt, model, state, loss, x, y, None)
    return eqx.filter(model, eqx.is_inexact_array)


def _reference_cases():
    import optax

    import eqx_curv

    return {
        "sgd": (eqx_curv.SGD(learning_rate=0.1), optax.sgd(0.1, momentum=0.9)),
        "sgd_nesterov": (
            eqx_curv.SGD(learning_rate=0.1, nesterov=True),
            optax.sgd(0.1, momentum=0.9, nesterov=True),
        ),
        "sgd_plain": (eqx_curv.SGD(momentum=0.0), optax.sgd(0.01)),
        "adam": (eqx_curv.FisherAdam(learning_rate=0.01), optax.adam(0.01)),
        "adam_schedule": (
            eqx_curv.FisherAdam(learning_rate=optax.linear_schedule(0.01, 0.001, 3)),
            optax.adam(optax.linear_schedule(0.01, 0.001, 3)),
        ),
    }


@pytest.mark.parametrize(
    "case", ["sgd", "sgd_nesterov", "sgd_plain", "adam", "adam_schedule"]
)
def test_matches_optax_and_own_adapter(case):
    opt, reference = _reference_cases()[case]
    model, loss, x, y = _problem()
    ours = _step_run(opt, model, loss, x, y, 3)
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    # optax evaluates its schedules in float32.
    rtol = 1e-6 if case == "adam_schedule" else 1e-12
    np.testing.assert_allclose(
        flat(ours), flat(_optax_run(reference, model, loss, x, y, 3)), rtol=rtol
    )
    np.testing.assert_allclose(
        flat(ours), flat(_optax_run(opt.as_optax(), model, loss, x, y, 3)), rtol=1e-13
    )


def test_optax_adapters_with_weight_decay_and_natural_form():
    import eqx_curv

    model, loss, x, y = _problem()
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    for opt in [
        eqx_curv.SGD(weight_decay=0.1, nesterov=True),
        eqx_curv.FisherAdam(exponent=1.0, adaptive_damping=False, momentum=0.0),
    ]:
        ours = _step_run(opt, model, loss, x, y, 3)
        adapted = _optax_run(opt.as_optax(), model, loss, x, y, 3)
        np.testing.assert_allclose(flat(ours), flat(adapted), rtol=1e-13)


def test_optax_adapter_refuses_what_needs_more_than_gradients():
    import eqx_curv

    with pytest.raises(ValueError, match="fisher='true'"):
        eqx_curv.FisherAdam(fisher="true").as_optax()
    with pytest.raises(ValueError, match="adaptive_damping"):
        eqx_curv.FisherAdam(exponent=1.0).as_optax()
    tx = eqx_curv.SGD(weight_decay=0.1).as_optax()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="`params`"):
        tx.update(params, tx.init(params))


def test_adaptive_damping_rejects_a_step_that_raises_the_loss():
    import eqx_curv

    # A learning rate far too large for the natural-gradient form: the first steps
    # are rejected and the damping grows until steps decrease the batch loss.
    opt = eqx_curv.FisherAdam(exponent=1.0, learning_rate=1.0, damping=1e-4)
    model, loss, x, y = _problem()
    state = opt.init(model)
    accepted, dampings, losses = [], [], []
    for _ in range(40):  # no key: dropout off, one batch loss to compare
        model, state, info = _step(opt, model, state, loss, x, y, None)
        accepted.append(bool(info.stats["accepted"]))
        dampings.append(float(info.stats["damping"]))
        losses.append(float(info.loss))
    assert not accepted[0] and any(accepted)
    assert dampings[-1] > dampings[0]
    assert losses[-1] < losses[0]
    assert all(b <= a for a, b in zip(losses, losses[1:]))


# ---------------------------------------------------------------------------------------
# Misuse: a sentence naming the argument.


def test_bad_hyperparameters_are_sentences():
    import eqx_curv

    with pytest.raises(ValueError, match="`learning_rate` must be non-negative"):
        eqx_curv.SGD(learning_rate=-0.1)
    with pytest.raises(ValueError, match="`learning_rate` must be non-negative"):
        eqx_curv.FisherAdam(learning_rate=-1e-3)
    for exponent in [0.0, -0.5, 1.5]:
        with pytest.raises(ValueError, match=r"`exponent` must lie in \(0, 1\]"):
            eqx_curv.FisherAdam(exponent=exponent)
    with pytest.raises(ValueError, match="`momentum`"):
        eqx_curv.SGD(momentum=1.0)
    with pytest.raises(ValueError, match="`weight_decay`"):
        eqx_curv.SGD(weight_decay=-1.0)
    with pytest.raises(ValueError, match="`damping`"):
        eqx_curv.FisherAdam(damping=0.0)
    # The Literal is checked by jaxtyping under pytest, else by the class: either way
    # the message names `fisher`.
    with pytest.raises((ValueError, TypeError), match="fisher"):
        eqx_curv.FisherAdam(fisher="exact")  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="nesterov"):
        eqx_curv.SGD(nesterov=1)  # pyright: ignore[reportArgumentType]


def test_bad_step_arguments_are_sentences():
    import eqx_curv

    model, loss, x, y = _problem()
    key = jax.random.key(0)
    true_fisher = eqx_curv.FisherAdam(fisher="true")
    state = true_fisher.init(model)

    def plain_loss(outputs, targets):
        return eqx_curv.SoftmaxCrossEntropy()(outputs, targets)

    with pytest.raises(TypeError, match="`loss` must be an eqx_curv loss"):
        true_fisher.step(model, state, plain_loss, x, y, key=key)
    with pytest.raises(ValueError, match="`key` is needed"):
        true_fisher.step(model, state, loss, x, y)
    with pytest.raises(ValueError, match="`inputs` and `targets` must hold the same"):
        true_fisher.step(model, state, loss, x, y[:5], key=key)
    # Any callable loss works where no curvature is needed.
    sgd = eqx_curv.SGD()
    sgd.step(model, sgd.init(model), plain_loss, x, y)
    no_floats = eqx.nn.Lambda(jnp.tanh)
    for opt in [sgd, true_fisher]:
        with pytest.raises(ValueError, match="`model` has no floating-point arrays"):
            opt.init(no_floats)
        with pytest.raises(ValueError, match="`model` has no floating-point arrays"):
            opt.step(no_floats, state, loss, x, y, key=key)
    other = _Net(jnp.float32)
    with pytest.raises(ValueError, match="`state` does not match `model`"):
        sgd.step(other, sgd.init(model), loss, x.astype(jnp.float32), y)
    with pytest.raises(
        ValueError, match="`learning_rate` schedule must return a scalar"
    ):
        eqx_curv.SGD(learning_rate=lambda count: jnp.ones(2)).step(
            model, sgd.init(model), loss, x, y
        )
