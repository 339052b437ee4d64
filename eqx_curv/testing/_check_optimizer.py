"""`check_optimizer`: the network-optimizer protocol suite on any optimizer.

The protocol (see `eqx_curv.AbstractNetworkOptimizer`):

```python
state = opt.init(model)
model, state, info = opt.step(model, state, loss, inputs, targets, key=key)
```

with `info.loss` the batch loss at the incoming model and `info.skipped` a boolean
scalar. The suite needs nothing else of the optimizer: it need not subclass anything
of eqx_curv.
"""

import io
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._losses import AbstractLoss, SoftmaxCrossEntropy
from ._report import Battery, Skip


_BATCH = 8
_DATASET = 256


class _ShiftedCrossEntropy(AbstractLoss):
    """Softmax cross-entropy plus a constant `shift` (an infinite shift gives a
    non-finite loss with a finite gradient); curvature and sampling are the
    cross-entropy's."""

    shift: Array
    hessian_depends_on_targets: ClassVar[bool] = False

    def __call__(self, outputs, targets):
        value = SoftmaxCrossEntropy()(outputs, targets)
        return value + self.shift.astype(value.dtype)

    def hvp(self, outputs, tangents, *, targets=None):
        return SoftmaxCrossEntropy().hvp(outputs, tangents)

    def hessian_sqrt(self, outputs, *, targets=None):
        return SoftmaxCrossEntropy().hessian_sqrt(outputs)

    def sample(self, key, outputs):
        return SoftmaxCrossEntropy().sample(key, outputs)

    def num_positions(self, outputs):
        return 1


class _ProtocolNet(eqx.Module):
    """A tanh MLP (4 -> 16 -> 3) times `1 + 0 * sqrt(s)`: with `s = 0` the loss is
    finite and its gradient with respect to `s` is NaN (0 * inf)."""

    mlp: eqx.nn.MLP
    s: Array

    def __init__(self, dtype, s=1.0):
        self.mlp = eqx.nn.MLP(4, 3, 16, 1, jnp.tanh, key=jax.random.key(0), dtype=dtype)
        self.s = jnp.asarray(s, dtype)

    def __call__(self, x):
        return self.mlp(x) * (1 + 0 * jnp.sqrt(self.s))


def _dataset(dtype):
    """Three well-separated Gaussian classes in 4 dimensions."""
    kc, kx, ky = jax.random.split(jax.random.key(42), 3)
    centres = 3.0 * jax.random.normal(kc, (3, 4), dtype)
    labels = jax.random.randint(ky, (_DATASET,), 0, 3)
    noise = 0.5 * jax.random.normal(kx, (_DATASET, 4), dtype)
    return centres[labels] + noise, labels


def _batch(data, index):
    inputs, labels = data
    start = (index * _BATCH) % _DATASET
    return inputs[start : start + _BATCH], labels[start : start + _BATCH]


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def _bitwise_equal(a, b) -> bool:
    a, b = _arrays(a), _arrays(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _non_finite_paths(tree) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(_arrays(tree))
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
        and not bool(jnp.isfinite(leaf).all())
    ]


def _dtypes(tree):
    return [
        (jax.tree_util.keystr(path), leaf.dtype)
        for path, leaf in jax.tree_util.tree_leaves_with_path(_arrays(tree))
    ]


def _float_dtypes(tree):
    return {
        leaf.dtype for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    }


def check_optimizer(
    optimizer: Any,
    *,
    train_steps: int = 200,
    key: PRNGKeyArray | None = None,
) -> dict[str, str]:
    """Run the network-optimizer protocol suite on an optimizer; report all failures.

    The properties, each reported by name, on a small tanh MLP with softmax
    cross-entropy, batches of 8:

    - `init`: `init(model)` gives a PyTree whose leaves are all arrays (a Python number
        in the state is static to `jax.jit`: it recompiles, and does not serialise).
    - `info`: `step` returns `(model, state, info)` with `info.loss` the batch loss at
        the incoming model (a scalar of the model's dtype) and `info.skipped` a
        boolean scalar, `False` on a finite batch.
    - `no_recompile`: a second step with same-shaped arguments (new batch, new key)
        under `eqx.filter_jit` does not trace `step` again.
    - `scan`: three steps inside `jax.lax.scan` equal three jitted steps.
    - `dtypes`: float32 and float64 models keep their dtypes, the state keeps the
        structure and dtypes `init` gave it.
    - `non_finite_skip`: a NaN in the batch, an infinite loss and a NaN gradient
        each give `info.skipped`, return the incoming model and state bitwise, and
        keep the state finite.
    - `resume`: a state saved with `eqx.tree_serialise_leaves` and loaded into
        `init(model)` continues bitwise identically to the original.
    - `trains`: `train_steps` steps on three well-separated Gaussian classes at
        least halve the full-data loss, with no step skipped.

    Every step gets a `key` (a fresh one each step).

    **Arguments:**

    - `optimizer`: an object with `init(model)` and
        `step(model, state, loss, inputs, targets, *, key)` (e.g. any
        `eqx_curv.AbstractNetworkOptimizer`), constructed with the settings to check.
    - `train_steps`: the number of steps of the training check.
    - `key`: the randomness of the steps' keys (default `jax.random.key(0)`).

    **Returns:**

    A dict, property name -> `"passed"` or `"skipped: <why>"`.

    **Raises:**

    [`eqx_curv.testing.ConformanceError`][] listing every failing property.
    """
    for method in ("init", "step"):
        if not callable(getattr(optimizer, method, None)):
            raise TypeError(
                f"`optimizer` must have an `{method}` method (the network-optimizer "
                f"protocol: `init(model)` and `step(model, state, loss, inputs, "
                f"targets, *, key)`); {type(optimizer).__name__} has none."
            )
    if isinstance(train_steps, bool) or not isinstance(train_steps, int):
        raise TypeError(f"`train_steps` must be an int, not {train_steps!r}.")
    key = jax.random.key(0) if key is None else key
    keys = list(jax.random.split(key, 10))
    battery = Battery()
    subject = f"The optimizer {type(optimizer).__name__}"
    traces = [0]

    @eqx.filter_jit
    def step(opt, model, state, loss, inputs, targets, step_key):
        traces[0] += 1  # runs only while tracing
        return opt.step(model, state, loss, inputs, targets, key=step_key)

    @eqx.filter_jit
    def scanned(opt, model, state, loss, inputs, targets, step_keys):
        params, static = eqx.partition(model, eqx.is_array)

        def body(carry, xs):
            params, state = carry
            x, y, k = xs
            model, state, info = opt.step(
                eqx.combine(params, static), state, loss, x, y, key=k
            )
            return (eqx.filter(model, eqx.is_array), state), info.loss

        (params, state), _ = jax.lax.scan(
            body, (params, state), (inputs, targets, step_keys)
        )
        return eqx.combine(params, static), state

    data64, data32 = _dataset(jnp.float64), _dataset(jnp.float32)
    loss = _ShiftedCrossEntropy(jnp.asarray(0.0, jnp.float64))
    model64 = _ProtocolNet(jnp.float64)
    found = {}

    def check_init():
        state = optimizer.init(model64)
        found["state"] = state
        static = [
            f"{jax.tree_util.keystr(path)} ({type(leaf).__name__})"
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if not eqx.is_array(leaf)
        ]
        if static:
            raise AssertionError(
                "The state holds leaves that are not arrays: "
                + ", ".join(static)
                + ". `jax.jit` treats them as static (each new value recompiles) and "
                "`eqx.tree_serialise_leaves` cannot restore them; store them as "
                "arrays (`jnp.asarray(...)`)."
            )

    battery.run("init", check_init)
    if "state" not in found:
        return battery.finish(subject)

    def check_info():
        x, y = _batch(data64, 0)
        model, state, info = step(
            optimizer, model64, found["state"], loss, x, y, keys[0]
        )
        found["after_one"] = (model, state)
        problems = []
        expected = float(loss(jax.vmap(model64)(x), y))
        value = getattr(info, "loss", None)
        skipped = getattr(info, "skipped", None)
        if value is None or skipped is None:
            raise AssertionError(
                "`info` must have the fields `loss` and `skipped`; it is "
                f"{type(info).__name__}."
            )
        if jnp.shape(value) != () or jnp.result_type(value) != jnp.float64:
            problems.append(
                f"`info.loss` has shape {jnp.shape(value)} and dtype "
                f"{jnp.result_type(value)}, not a float64 scalar"
            )
        elif not np.isclose(float(value), expected, rtol=1e-9, atol=0):
            problems.append(
                f"`info.loss` is {float(value):.10g}, but the batch loss at the "
                f"incoming model is {expected:.10g}"
            )
        if jnp.shape(skipped) != () or jnp.result_type(skipped) != jnp.bool_:
            problems.append(
                f"`info.skipped` has shape {jnp.shape(skipped)} and dtype "
                f"{jnp.result_type(skipped)}, not a boolean scalar"
            )
        elif bool(skipped):
            problems.append("`info.skipped` is True on a finite batch")
        if problems:
            raise AssertionError("; ".join(problems) + ".")

    def check_no_recompile():
        if "after_one" not in found:
            raise Skip("the first step failed (see `info`)")
        model, state = found["after_one"]
        before = traces[0]
        x, y = _batch(data64, 1)
        model2, state2, _ = step(optimizer, model, state, loss, x, y, keys[1])
        found["after_two"] = (model2, state2)
        if traces[0] != before:
            changed = [
                jax.tree_util.keystr(path)
                for (path, a), b in zip(
                    jax.tree_util.tree_leaves_with_path(state),
                    jax.tree.leaves(state2),
                )
                if not eqx.is_array(a) and not (a is b or a == b)
            ]
            detail = (
                f" Non-array state leaves that changed: {', '.join(changed)}."
                if changed
                else ""
            )
            raise AssertionError(
                "The second step with same-shaped arguments traced `step` again: "
                "something `eqx.filter_jit` treats as static (a Python number, a "
                "string, a shape) differs from the first step's." + detail
            )

    def check_scan():
        if "after_one" not in found:
            raise Skip("the first step failed (see `info`)")
        model, state = model64, found["state"]
        batches = [_batch(data64, i) for i in range(3)]
        for (x, y), k in zip(batches, keys[2:5]):
            model, state, _ = step(optimizer, model, state, loss, x, y, k)
        inputs = jnp.stack([b[0] for b in batches])
        targets = jnp.stack([b[1] for b in batches])
        scan_model, scan_state = scanned(
            optimizer,
            model64,
            found["state"],
            loss,
            inputs,
            targets,
            jnp.stack(keys[2:5]),
        )
        for label, a, b in [("model", scan_model, model), ("state", scan_state, state)]:
            a, b = _arrays(a), _arrays(b)
            if jax.tree.structure(a) != jax.tree.structure(b):
                raise AssertionError(
                    f"The {label} after `lax.scan` has another structure."
                )
            for (path, x), y in zip(
                jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
            ):
                if not np.allclose(np.asarray(x), np.asarray(y), rtol=1e-8, atol=1e-12):
                    raise AssertionError(
                        f"Three steps inside `jax.lax.scan` differ from three jitted "
                        f"steps: {label} leaf {jax.tree_util.keystr(path)}."
                    )

    def check_dtypes():
        problems = []
        for dtype, data in [(jnp.float32, data32), (jnp.float64, data64)]:
            model = _ProtocolNet(dtype)
            state = optimizer.init(model)
            x, y = _batch(data, 0)
            new_model, new_state, info = step(
                optimizer,
                model,
                state,
                _ShiftedCrossEntropy(jnp.asarray(0.0, dtype)),
                x,
                y,
                keys[5],
            )
            name = jnp.dtype(dtype).name
            if _float_dtypes(new_model) != {jnp.dtype(dtype)}:
                problems.append(
                    f"a {name} model comes back with dtypes {_float_dtypes(new_model)}"
                )
            if _dtypes(new_state) != _dtypes(state):
                problems.append(
                    f"with a {name} model the state's structure or dtypes change in "
                    "a step"
                )
            if jnp.result_type(info.loss) != dtype:
                problems.append(
                    f"with a {name} model `info.loss` has dtype "
                    f"{jnp.result_type(info.loss)}"
                )
            if dtype == jnp.float32:
                found["f32"] = (new_model, new_state)
        if problems:
            raise AssertionError("; ".join(problems) + ".")

    def check_non_finite():
        if "after_one" not in found:
            raise Skip("the first step failed (see `info`)")
        model, state = found["after_one"]
        x, y = _batch(data64, 1)
        cases = {
            "a NaN in the batch": (model, loss, x.at[3, 1].set(jnp.nan)),
            "an infinite loss": (
                model,
                _ShiftedCrossEntropy(jnp.asarray(jnp.inf, jnp.float64)),
                x,
            ),
            "a NaN gradient": (
                eqx.tree_at(lambda m: m.s, model, jnp.asarray(0.0, jnp.float64)),
                loss,
                x,
            ),
        }
        problems = []
        for what, (bad_model, bad_loss, bad_x) in cases.items():
            new_model, new_state, info = step(
                optimizer, bad_model, state, bad_loss, bad_x, y, keys[6]
            )
            if not bool(info.skipped):
                problems.append(f"{what}: `info.skipped` is False")
            if not _bitwise_equal(new_model, bad_model):
                problems.append(f"{what}: the model changed")
            if not _bitwise_equal(new_state, state):
                problems.append(f"{what}: the state changed")
            bad = _non_finite_paths(new_state)
            if bad:
                problems.append(
                    f"{what}: the state holds non-finite values in {', '.join(bad)}"
                )
        if problems:
            raise AssertionError(
                "A non-finite step must be skipped, returning the incoming model and "
                "state: " + "; ".join(problems) + "."
            )

    def check_resume():
        if "after_two" not in found:
            raise Skip("the first steps failed (see `info`, `no_recompile`)")
        model, state = found["after_two"]
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, state)
        buffer.seek(0)
        restored = eqx.tree_deserialise_leaves(buffer, optimizer.init(model))
        if not _bitwise_equal(restored, state):
            raise AssertionError(
                "The state loaded with `eqx.tree_deserialise_leaves` into "
                "`init(model)` differs from the one saved."
            )
        a, b = (model, state), (model, restored)
        for i in range(2):
            x, y = _batch(data64, 2 + i)
            a = step(optimizer, a[0], a[1], loss, x, y, keys[7 + i])[:2]
            b = step(optimizer, b[0], b[1], loss, x, y, keys[7 + i])[:2]
        if not (_bitwise_equal(a[0], b[0]) and _bitwise_equal(a[1], b[1])):
            raise AssertionError(
                "Two steps from the restored state differ from two steps from the "
                "saved one: the state does not hold everything `step` depends on."
            )

    def check_trains():
        model = _ProtocolNet(jnp.float32)
        state = optimizer.init(model)
        loss32 = _ShiftedCrossEntropy(jnp.asarray(0.0, jnp.float32))
        full = eqx.filter_jit(lambda m: loss32(jax.vmap(m)(data32[0]), data32[1]))
        before = float(full(model))
        skipped = 0
        for i, k in enumerate(jax.random.split(keys[9], train_steps)):
            x, y = _batch(data32, i)
            model, state, info = step(optimizer, model, state, loss32, x, y, k)
            skipped += int(info.skipped)
        after = float(full(model))
        if skipped or not after < 0.5 * before:
            raise AssertionError(
                f"After {train_steps} steps on three separable classes the full-data "
                f"loss went from {before:.4g} to {after:.4g} (needed below half), "
                f"with {skipped} steps skipped."
            )

    battery.run("info", check_info)
    if not battery.run("no_recompile", check_no_recompile):
        # Every further step would compile again: report what was found so far.
        for name in ("scan", "dtypes", "non_finite_skip", "resume", "trains"):
            battery.skip(name, "every step recompiles (see `no_recompile`)")
        return battery.finish(subject)
    battery.run("scan", check_scan)
    battery.run("dtypes", check_dtypes)
    battery.run("non_finite_skip", check_non_finite)
    battery.run("resume", check_resume)
    battery.run("trains", check_trains)
    return battery.finish(subject)
