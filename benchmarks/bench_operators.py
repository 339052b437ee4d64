"""Cost of curvature-vector products relative to one gradient, on TinyViT.

    python benchmarks/bench_operators.py [--batch-size 128] [--repeats 30]

Everything is jitted and timed on synthetic CIFAR-shaped data. Each timed call starts
from the parameters (it includes the forward pass), as a product inside an optimizer
step does. Calls are interleaved round robin, so that load from other processes
affects every row alike, and the median is reported. Rows:

- gradient: `jax.grad` of the mean softmax cross-entropy.
- `<X>`-vp, operator: `eqx_curv.<X>Operator(...).mv(v)`.
- `<X>`-vp, direct: the same product written by hand with `jax.jvp` / `jax.vjp`.
- `<X>`-vp, linearised: `lineax.linearise(op).mv(v)` with the linearisation done
  outside the timed call: the cost of one further product, e.g. a CG iteration.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from _timing import interleaved_medians

import eqx_curv
from eqx_curv.experiments.tinyvit import TinyViT


def _batched(params, static, x):
    return jax.vmap(eqx.combine(params, static))(x)


def make_functions(static, loss, key):
    def loss_fn(params, x, y):
        return loss(_batched(params, static, x), y)

    def gradient(params, x, y, v):
        return jax.grad(loss_fn)(params, x, y)

    def hvp_operator(params, x, y, v):
        return eqx_curv.HessianOperator(lambda p: loss_fn(p, x, y), params).mv(v)

    def hvp_direct(params, x, y, v):
        return jax.jvp(jax.grad(lambda p: loss_fn(p, x, y)), (params,), (v,))[1]

    def ggn_operator(params, x, y, v):
        model = eqx.combine(params, static)
        return eqx_curv.GGNOperator(model, loss, x, y).mv(v)

    def _jvp_vjp(params, x, v):
        f = lambda p: _batched(p, static, x)  # noqa: E731
        outputs, jv = jax.jvp(f, (params,), (v,))
        _, vjp_fn = jax.vjp(f, params)
        return outputs, jv, vjp_fn

    def ggn_direct(params, x, y, v):
        outputs, jv, vjp_fn = _jvp_vjp(params, x, v)
        hjv = jax.jvp(jax.grad(lambda o: loss(o, y)), (outputs,), (jv,))[1]
        return vjp_fn(hjv)[0]

    def _outer(r, jv, n):
        return r * jnp.sum(r * jv, axis=-1, keepdims=True) / n

    def fisher_operator(params, x, y, v):
        model = eqx.combine(params, static)
        return eqx_curv.FisherOperator(model, loss, x, key=key).mv(v)

    def fisher_direct(params, x, y, v):
        outputs, jv, vjp_fn = _jvp_vjp(params, x, v)
        sampled = loss.sample(jax.random.split(key, 1)[0], outputs)
        n = outputs.shape[0]
        r = jax.grad(loss)(outputs, sampled) * n
        return vjp_fn(_outer(r, jv, n))[0]

    def empirical_operator(params, x, y, v):
        model = eqx.combine(params, static)
        return eqx_curv.EmpiricalFisherOperator(model, loss, x, y).mv(v)

    def empirical_direct(params, x, y, v):
        outputs, jv, vjp_fn = _jvp_vjp(params, x, v)
        n = outputs.shape[0]
        r = jax.grad(loss)(outputs, y) * n
        return vjp_fn(_outer(r, jv, n))[0]

    builders = {
        "HVP": lambda p, x, y: eqx_curv.HessianOperator(lambda q: loss_fn(q, x, y), p),
        "GGN-vp": lambda p, x, y: eqx_curv.GGNOperator(
            eqx.combine(p, static), loss, x, y
        ),
        "Fisher-vp (MC, 1 sample)": lambda p, x, y: eqx_curv.FisherOperator(
            eqx.combine(p, static), loss, x, key=key
        ),
        "empirical-Fisher-vp": lambda p, x, y: eqx_curv.EmpiricalFisherOperator(
            eqx.combine(p, static), loss, x, y
        ),
    }
    rows = {
        "gradient": gradient,
        "HVP": (hvp_operator, hvp_direct),
        "GGN-vp": (ggn_operator, ggn_direct),
        "Fisher-vp (MC, 1 sample)": (fisher_operator, fisher_direct),
        "empirical-Fisher-vp": (empirical_operator, empirical_direct),
    }
    return rows, builders


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    kmodel, kx, ky, kv, kfisher = jax.random.split(jax.random.key(args.seed), 5)
    model = TinyViT(kmodel)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.uniform(kx, (args.batch_size, 32, 32, 3), jnp.float32)
    y = jax.random.randint(ky, (args.batch_size,), 0, 10)
    leaves, treedef = jax.tree.flatten(params)
    vkeys = jax.random.split(kv, len(leaves))
    v = jax.tree.unflatten(
        treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(vkeys, leaves)]
    )
    loss = eqx_curv.SoftmaxCrossEntropy()
    rows, builders = make_functions(static, loss, kfisher)

    # Every timed callable takes no arguments and returns a PyTree to block on.
    calls = {}
    for name, fns in rows.items():
        if name == "gradient":
            calls[(name, "")] = _jitted(fns, params, x, y, v)
            continue
        operator_fn, direct_fn = fns
        calls[(name, "operator")] = _jitted(operator_fn, params, x, y, v)
        calls[(name, "direct")] = _jitted(direct_fn, params, x, y, v)
        lin = eqx.filter_jit(
            lambda p, x, y, b=builders[name]: lx.linearise(b(p, x, y))
        )(params, x, y)
        calls[(name, "linearised")] = _jitted(lambda lin, v: lin.mv(v), lin, v)

    # Correctness first: operator and direct products agree.
    for name in builders:
        a = calls[(name, "operator")]()
        b = calls[(name, "direct")]()
        c = calls[(name, "linearised")]()
        scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(b))
        err = max(
            float(jnp.abs(p - q).max())
            for p, q in zip(
                jax.tree.leaves(a) + jax.tree.leaves(c), 2 * jax.tree.leaves(b)
            )
        )
        print(
            f"check {name}: max |operator - direct| / max |direct| = {err / scale:.1e}"
        )

    median = interleaved_medians(calls, args.repeats)
    grad_ms = median[("gradient", "")]

    count = sum(leaf.size for leaf in leaves)
    print(
        f"\nTinyViT ({count:,} parameters), batch {args.batch_size}, float32, "
        f"{jax.devices()[0].device_kind}, median of {args.repeats} interleaved runs\n"
    )
    header = (
        f"{'product':<26}{'variant':<12}{'ms':>9}{'x gradient':>12}{'op / direct':>13}"
    )
    print(header)
    print("-" * len(header))
    for (name, variant), ms in median.items():
        ratio = ""
        if variant == "operator":
            ratio = f"{ms / median[(name, 'direct')]:.3f}"
        print(f"{name:<26}{variant:<12}{ms:>9.2f}{ms / grad_ms:>12.2f}{ratio:>13}")

    overhead = max(median[(n, "operator")] / median[(n, "direct")] for n in builders)
    targets = [
        ("operator / direct, worst row", overhead, 1.05),
        ("GGN-vp / gradient", median[("GGN-vp", "operator")] / grad_ms, 2.5),
        ("HVP / gradient", median[("HVP", "operator")] / grad_ms, 4.0),
    ]
    print()
    for label, value, bound in targets:
        verdict = "met" if value <= bound else "NOT met"
        print(f"target {label}: {value:.2f} <= {bound} {verdict}")


def _jitted(fn, *args):
    compiled = eqx.filter_jit(fn)
    jax.block_until_ready(compiled(*args))  # compile and warm up
    jax.block_until_ready(compiled(*args))
    return lambda: compiled(*args)


if __name__ == "__main__":
    main()
