r"""`eqx-curv compare`: every curvature operator on one network, side by side.

Trains a small MLP on scikit-learn's digits with plain gradient steps, then builds each
curvature operator at the trained parameters (Hessian, GGN, exact and Monte-Carlo
Fisher, empirical Fisher), damps it, solves the damped Newton system
$(C + \lambda I)\,d = \nabla L$ with `eqx_curv.CG`, and takes a step along $-d$ with a
backtracking (Armijo) step size. Prints one row per operator.
"""

import argparse
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from tqdm import tqdm

import eqx_curv

from .data import digits


_RESULT_NAMES = (
    "successful",
    "max_steps_reached",
    "breakdown",
    "nonfinite_input",
    "singular",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--num-examples", type=int, default=None, help="examples used (default: all)")
    add("--width", type=int, default=64, help="hidden width of the MLP")
    add("--depth", type=int, default=2, help="number of hidden layers")
    add("--train-steps", type=int, default=300, help="full-batch gradient steps")
    add("--learning-rate", type=float, default=0.5, help="gradient-descent step size")
    add("--damping", type=float, default=1e-3, help="lambda in (C + lambda I) d = g")
    add("--rtol", type=float, default=1e-4, help="CG relative residual tolerance")
    add("--max-cg-steps", type=int, default=200, help="CG step budget")
    add("--mc-samples", type=int, default=1, help="targets per example, MC Fisher")
    add("--seed", type=int, default=0)
    add("--no-progress", action="store_true", help="hide the progress bar")


def _result_name(result: lx.RESULTS) -> str:
    for name in _RESULT_NAMES:
        if result == getattr(lx.RESULTS, name):
            return name
    return "unknown"


@eqx.filter_jit
def _solve(operator: lx.AbstractLinearOperator, rhs, solver: eqx_curv.CG):
    sol = lx.linear_solve(operator, rhs, solver, throw=False)
    return sol.value, sol.result, sol.stats["num_steps"], sol.stats["residual_norm"]


def _backtracking(
    loss_at: Callable, params, direction, slope: float, loss0: float
) -> tuple[float, float]:
    """Largest `t` in 1, 1/2, 1/4, ... with the Armijo decrease; `(0, loss0)` if none."""
    t = 1.0
    for _ in range(30):
        trial = jax.tree.map(lambda p, d, t=t: p + t * d, params, direction)
        value = float(loss_at(trial))
        if value <= loss0 + 1e-4 * t * slope:
            return t, value
        t /= 2
    return 0.0, loss0


def run(args: argparse.Namespace) -> int:
    key = jax.random.key(args.seed)
    model_key, fisher_key = jax.random.split(key)
    x, y = digits(args.num_examples, seed=args.seed)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = eqx.nn.MLP(
        x.shape[1],
        10,
        args.width,
        args.depth,
        activation=jnp.tanh,
        key=model_key,
        dtype=x.dtype,
    )
    loss = eqx_curv.SoftmaxCrossEntropy()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def batch_loss(p):
        return loss(jax.vmap(eqx.combine(p, static))(x), y)

    loss_and_grad = eqx.filter_jit(jax.value_and_grad(batch_loss))
    loss_at = eqx.filter_jit(batch_loss)

    @eqx.filter_jit
    def train_step(p):
        g = jax.grad(batch_loss)(p)
        return jax.tree.map(lambda a, b: a - args.learning_rate * b, p, g)

    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"digits: {x.shape[0]} examples; MLP {x.shape[1]}-"
        f"{'-'.join([str(args.width)] * args.depth)}-10 (tanh), {num_params} parameters"
    )
    for _ in tqdm(
        range(args.train_steps), desc="gradient descent", disable=args.no_progress
    ):
        params = train_step(params)
    loss0, grads = loss_and_grad(params)
    loss0 = float(loss0)
    gnorm = float(jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))))
    print(
        f"after {args.train_steps} gradient steps: loss {loss0:.5f}, "
        f"gradient norm {gnorm:.3e}"
    )

    trained = eqx.combine(params, static)
    psd = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    builders: list[tuple[str, Callable[[], lx.AbstractLinearOperator]]] = [
        # The Hessian is indefinite away from a minimum. CG is told it is PSD and, if
        # it meets negative curvature, stops and reports breakdown, keeping the last
        # iterate (a descent direction, as in Steihaug's truncated CG).
        (
            "Hessian (assumed PSD)",
            lambda: lx.TaggedLinearOperator(
                eqx_curv.DampedOperator(
                    eqx_curv.HessianOperator(batch_loss, params), args.damping
                ),
                psd,
            ),
        ),
        (
            "GGN",
            lambda: eqx_curv.DampedOperator(
                eqx_curv.GGNOperator(trained, loss, x, y), args.damping
            ),
        ),
        (
            "Fisher (exact)",
            lambda: eqx_curv.DampedOperator(
                eqx_curv.FisherOperator(trained, loss, x, key=None), args.damping
            ),
        ),
        (
            f"Fisher (MC, {args.mc_samples} sample{'s' * (args.mc_samples > 1)})",
            lambda: eqx_curv.DampedOperator(
                eqx_curv.FisherOperator(
                    trained, loss, x, key=fisher_key, num_samples=args.mc_samples
                ),
                args.damping,
            ),
        ),
        (
            "empirical Fisher",
            lambda: eqx_curv.DampedOperator(
                eqx_curv.EmpiricalFisherOperator(trained, loss, x, y), args.damping
            ),
        ),
    ]
    solver = eqx_curv.CG(rtol=args.rtol, atol=0.0, max_steps=args.max_cg_steps)
    header = (
        f"{'operator (+ damping ' + format(args.damping, 'g') + ')':<28}"
        f"{'CG result':<19}{'steps':>6}{'rel. residual':>15}{'solve ms':>10}"
        f"{'step size':>11}{'loss after':>12}"
    )
    rows = [header, "-" * len(header)]
    for name, build in tqdm(builders, desc="operators", disable=args.no_progress):
        operator = build()
        jax.block_until_ready(_solve(operator, grads, solver))  # compile
        start = time.perf_counter()
        solution, result, steps, residual = jax.block_until_ready(
            _solve(operator, grads, solver)
        )
        elapsed = 1e3 * (time.perf_counter() - start)
        direction = jax.tree.map(jnp.negative, solution)
        slope = float(
            sum(
                jnp.vdot(g, d)
                for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
            )
        )
        if slope < 0:
            t, after = _backtracking(loss_at, params, direction, slope, loss0)
        else:  # not a descent direction: no step
            t, after = 0.0, loss0
        rows.append(
            f"{name:<28}{_result_name(result):<19}{int(steps):>6}"
            f"{float(residual) / gnorm:>15.2e}{elapsed:>10.1f}{t:>11.4g}{after:>12.5f}"
        )
    print("\n".join(rows))
    print(
        "rel. residual = ||b - A d|| / ||b|| with b the gradient; solve ms after "
        "compilation; step size from Armijo backtracking along -d."
    )
    return 0
