"""Shared pytest configuration.

eqx_curv itself is imported lazily (inside tests and fixtures), never at the top of this
file: jaxtyping's import hook must be installed by its pytest plugin first.
"""

import os

import hypothesis
import jax
import pytest


# Float64 dense oracles need x64; tests that exercise float32 say so explicitly.
jax.config.update("jax_enable_x64", True)
# As lineax's own suite: no implicit dtype promotion and no implicit rank promotion, so
# the library never relies on either.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
    "dev", max_examples=10, deadline=None, print_blob=True
)
hypothesis.settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "gpu", max_examples=30, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def getkey():
    """A function returning a fresh key each call, deterministic per test."""
    state = {"key": jax.random.key(1234)}

    def _getkey():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compilation caches after each test module.

    A single process compiles thousands of programs over the suite; keeping them all
    grew its memory until XLA's CPU compiler crashed late in the run. Tests within a
    module still share their compiled programs.
    """
    yield
    jax.clear_caches()
