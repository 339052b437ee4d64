"""Shared pytest configuration.

eqx_curv is imported only after jax's configuration below (never among the imports at
the top): float64 and the strict promotion rules hold from its first line. jaxtyping's
pytest plugin installs its import hook before conftest files are loaded, so the package
is still type-checked.
"""

import jax
import pytest


# Float64 dense oracles need x64; tests that exercise float32 say so explicitly.
jax.config.update("jax_enable_x64", True)
# As lineax's own suite: no implicit dtype promotion and no implicit rank promotion, so
# the library never relies on either.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def _load_hypothesis_profiles():
    # The profiles users get from eqx_curv.testing: `dev` (default), `ci`
    # (derandomised) and `gpu`, chosen by $HYPOTHESIS_PROFILE. Imported here, after
    # jaxtyping's import hook is installed (its plugin runs before conftest files).
    from eqx_curv.testing import load_profile, register_profiles

    register_profiles()
    load_profile()


_load_hypothesis_profiles()


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
