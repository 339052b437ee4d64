"""Shared pytest configuration.

eqx_curv is imported only after jax's configuration below (never among the imports at
the top): float64 and the strict promotion rules hold from its first line. jaxtyping's
pytest plugin installs its import hook before conftest files are loaded, so the package
is still type-checked.
"""

import os

import jax
import pytest


# XLA's compile-time optimisations mostly off: the tests' programs are tiny, so most
# of the suite's time is compilation, and this cuts its CPU time by about a third
# (the programs compute the same values; the benchmarks, the train command and user
# code keep the optimisations). The environment variable reaches the tests'
# subprocesses (the CLI runs, the forced-device cases). EQX_CURV_TEST_OPTIMIZED=1
# keeps them on (the GPU check does).
if os.environ.get("EQX_CURV_TEST_OPTIMIZED", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


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
