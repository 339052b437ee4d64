r"""The reference page's 2-D experiment: classical minimisers on a quartic.

Every method starts at $(-0.9, 0.4)$ and takes 15 steps on
`eqx_curv.experiments.problems.quartic`. The top row uses the page's fixed step sizes
(gradient descent 0.1; Newton, damped Newton with $H + I$ and saddle-free Newton 0.8;
BFGS from $B_0 = I$ and L-BFGS 0.15; diagonal Newton 0.5); the bottom row the same
methods with their line search (strong Wolfe) or trust region. One PNG holds a panel
per run: the loss contours over $[-1, 1] \times [-0.5, 0.5]$ and the trajectory. A table
gives each panel's final loss and gradient norm.

Run it as `eqx-curv toy2d --out DIR`.
"""

import argparse
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._optimizers.diagonal_newton import DiagonalNewton
from .._optimizers.gradient_descent import GradientDescent
from .._optimizers.newton import DampedNewton, Newton, SaddleFreeNewton
from .._optimizers.quasi_newton import BFGS, LBFGS
from .cli import SUBCOMMANDS
from .problems import quartic, QUARTIC_START


NUM_STEPS = 15
# Tolerances far below what 15 steps reach: every panel runs all its steps.
_RTOL, _ATOL = 0.0, 1e-10


def methods() -> list[tuple[str, optx.AbstractMinimiser]]:
    """(panel title, solver) for every panel, fixed-step row first."""
    fixed = [
        ("GD, lr 0.1", GradientDescent(rtol=_RTOL, atol=_ATOL, step_size=0.1)),
        ("Newton, step 0.8", Newton(rtol=_RTOL, atol=_ATOL, step_size=0.8)),
        (
            "damped Newton (H+I), step 0.8",
            DampedNewton(rtol=_RTOL, atol=_ATOL, step_size=0.8),
        ),
        (
            "saddle-free Newton |H|, step 0.8",
            SaddleFreeNewton(rtol=_RTOL, atol=_ATOL, step_size=0.8),
        ),
        ("BFGS (B0 = I), step 0.15", BFGS(rtol=_RTOL, atol=_ATOL, step_size=0.15)),
        ("L-BFGS, step 0.15", LBFGS(rtol=_RTOL, atol=_ATOL, step_size=0.15)),
        (
            "diagonal Newton, step 0.5",
            DiagonalNewton(rtol=_RTOL, atol=_ATOL, step_size=0.5),
        ),
    ]
    searched = [
        ("GD, strong Wolfe", GradientDescent(rtol=_RTOL, atol=_ATOL)),
        ("Newton, strong Wolfe", Newton(rtol=_RTOL, atol=_ATOL)),
        ("damped Newton (H+I), strong Wolfe", DampedNewton(rtol=_RTOL, atol=_ATOL)),
        ("saddle-free Newton, trust region", SaddleFreeNewton(rtol=_RTOL, atol=_ATOL)),
        ("BFGS, strong Wolfe", BFGS(rtol=_RTOL, atol=_ATOL)),
        ("L-BFGS, strong Wolfe", LBFGS(rtol=_RTOL, atol=_ATOL)),
        ("diagonal Newton, strong Wolfe", DiagonalNewton(rtol=_RTOL, atol=_ATOL)),
    ]
    return fixed + searched


def _fn(y, args):
    return quartic(y), None


def trajectory(
    solver: optx.AbstractMinimiser, num_steps: int = NUM_STEPS, dtype=jnp.float64
) -> np.ndarray:
    """The `num_steps + 1` iterates of `solver` from the page's start, as rows.

    Once the solver stops (converged, or a failure such as a non-finite step) the
    remaining iterates repeat the last point.
    """
    y0 = jnp.asarray(QUARTIC_START, dtype)
    f_struct = jax.ShapeDtypeStruct((), dtype)

    @jax.jit
    def run(y0):
        state = solver.init(_fn, y0, None, {}, f_struct, None, frozenset())

        def body(carry, _):
            y, state = carry
            new_y, new_state, _ = solver.step(_fn, y, None, {}, state, frozenset())
            done = state.terminate
            y = jnp.where(done, y, new_y)
            state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state, new_state)
            return (y, state), y

        _, ys = jax.lax.scan(body, (y0, state), None, length=num_steps)
        return jnp.concatenate([y0[None], ys])

    return np.asarray(run(y0))


def _table(rows: list[tuple[str, float, float]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'method':<{width}}  {'final loss':>12}  {'|grad|':>10}"]
    lines += [
        f"{name:<{width}}  {loss:>12.6f}  {grad:>10.3e}" for name, loss, grad in rows
    ]
    return "\n".join(lines)


def run_experiment(
    out_dir: str,
    num_steps: int = NUM_STEPS,
    panels: list[tuple[str, optx.AbstractMinimiser]] | None = None,
) -> tuple[str, str]:
    """Write `toy2d.png` into `out_dir`; return its path and the results table.

    `panels` defaults to `methods()`; they fill two rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    xs = np.linspace(-1.0, 1.0, 201)
    ys = np.linspace(-0.5, 0.5, 121)
    grid = jnp.stack(jnp.meshgrid(xs, ys), axis=-1)
    levels = np.asarray(jax.vmap(jax.vmap(quartic))(grid))
    value_and_grad = jax.jit(jax.value_and_grad(quartic))

    panels = methods() if panels is None else panels
    columns = (len(panels) + 1) // 2
    fig, axes = plt.subplots(
        2, columns, figsize=(3.2 * columns, 6.0), sharey=True, squeeze=False
    )
    rows = []
    for ax, (title, solver) in zip(axes.ravel(), panels):
        path = trajectory(solver, num_steps)
        loss, grad = value_and_grad(jnp.asarray(path[-1]))
        rows.append((title, float(loss), float(jnp.linalg.norm(grad))))
        ax.contour(xs, ys, levels, levels=30, linewidths=0.6, cmap="viridis")
        ax.plot(path[:, 0], path[:, 1], "o-", color="crimson", markersize=2.5, lw=1)
        ax.plot(*path[0], "ks", markersize=4)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-0.5, 0.5)
        ax.set_title(f"{title}\nloss {float(loss):.4f}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"The page's quartic from {QUARTIC_START}, {num_steps} steps: fixed steps "
        "(top), line search / trust region (bottom)",
        fontsize=10,
    )
    fig.tight_layout()
    png = os.path.join(out_dir, "toy2d.png")
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png, _table(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".", help="directory for toy2d.png")
    parser.add_argument(
        "--steps", type=int, default=NUM_STEPS, help="steps per method (default 15)"
    )


def run(args: argparse.Namespace) -> int:
    jax.config.update("jax_enable_x64", True)
    png, table = run_experiment(args.out, args.steps)
    print(table)
    print(f"wrote {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eqx-curv toy2d", description=SUBCOMMANDS["toy2d"][1]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
