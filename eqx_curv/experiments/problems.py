r"""Deterministic test problems for the classical minimisers.

Each is written as `fn(y, args) -> scalar`, the signature of `optimistix.minimise`.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar


def rosenbrock(x: Float[Array, " n"], args=None) -> Scalar:
    r"""The chained Rosenbrock function $\sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2$.

    Global minimum 0 at $(1, \dots, 1)$; for $n \ge 4$ there is also a local minimum
    near $(-1, 1, \dots, 1)$ with $f \approx 3.99$.
    """
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rosenbrock_start(n: int, dtype=jnp.float64) -> Float[Array, " n"]:
    """The classical start $(-1.2, 1, -1.2, 1, \\dots)$ in `n` (even) dimensions."""
    if n < 2 or n % 2:
        raise ValueError(f"`n` must be an even number >= 2, got {n}.")
    return jnp.tile(jnp.array([-1.2, 1.0], dtype), n // 2)


def beale(z: Float[Array, " 2"], args=None) -> Scalar:
    r"""Beale's function; global minimum 0 at $(3, 1/2)$. Classical start $(1, 1)$."""
    x, y = z[0], z[1]
    return (
        (1.5 - x + x * y) ** 2
        + (2.25 - x + x * y**2) ** 2
        + (2.625 - x + x * y**3) ** 2
    )


# `jax.random.uniform(jax.random.PRNGKey(1), (8,))` as the reference page drew it, with
# the threefry implementation JAX used before 0.5 (`jax_threefry_partitionable=False`);
# JAX >= 0.5 draws other numbers from the same key, and with those the page's
# gradient descent at learning rate 0.1 diverges. Kept as float32 literals so that the
# function does not depend on the JAX version (a test checks them against the draw).
_PAGE_DRAW = (
    0.20243525505065918,
    0.9623256921768188,
    0.060886263847351074,
    0.9574012756347656,
    0.8375757932662964,
    0.0591200590133667,
    0.022907614707946777,
    0.15803980827331543,
)


def quartic_multipliers(dtype=jnp.float64) -> Float[Array, " 8"]:
    """The quartic's feature weights: the page's uniform draw, entries 3 and 7 set to 1."""
    weights = jnp.asarray(_PAGE_DRAW, jnp.float32)
    return weights.at[3].set(1.0).at[7].set(1.0).astype(dtype)


def quartic(z: Float[Array, " 2"], args=None) -> Scalar:
    r"""The reference page's 2-D quartic.

    With $x' = 0.8x - 0.5$ and $y' = 2y$, the loss is $w^\top \phi + 0.1 x' y'$ where
    $\phi = (x', x'^2, x'^3, x'^4, y', y'^2, y'^3, y'^4)$ and $w$ is
    `quartic_multipliers` (positive quartic coefficients make it bounded below).
    Start: $(-0.9, 0.4)$.
    """
    xp = 0.8 * z[0] - 0.5
    yp = 2.0 * z[1]
    features = jnp.stack([xp, xp**2, xp**3, xp**4, yp, yp**2, yp**3, yp**4])
    return jnp.dot(quartic_multipliers(z.dtype), features) + 0.1 * xp * yp


QUARTIC_START = (-0.9, 0.4)
BEALE_START = (1.0, 1.0)
