"""Validation of hyperparameters that may be Python numbers or traced arrays."""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array


def check_hyperparameter(ok: Any, message: str) -> None:
    """Raise `ValueError(message)` where `ok` is a concrete false condition.

    Conditions on traced hyperparameters are left to `eqx.error_if` (see
    `checked_hyperparameter`), since their value is known only at run time.
    """
    if isinstance(ok, bool | np.bool_) or (
        isinstance(ok, jax.Array) and not isinstance(ok, jax.core.Tracer)
    ):
        if not bool(ok):
            raise ValueError(message)


def shown(value: Any) -> str:
    """`value` for an error message: traced values have no number to show."""
    return "a traced value" if isinstance(value, jax.core.Tracer) else repr(value)


def checked_hyperparameter(value: Array, ok: Any, message: str) -> Array:
    """`value`, carrying a run-time check of `ok` where `ok` is traced.

    Concrete conditions were judged at construction (`check_hyperparameter`), so the
    common case, hyperparameters given as Python numbers, costs nothing.
    """
    if isinstance(ok, jax.core.Tracer):
        return eqx.error_if(value, ~ok, message)
    return value
