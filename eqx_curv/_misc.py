"""Small helpers shared across eqx_curv: precision, products, PyTree zeros, argument checks.

Argument checks follow one rule: a value known at trace time (a Python number, a NumPy
array, a JAX array outside `jax.jit`) is checked now and a bad one raises a sentence
naming the argument; a traced value is checked at run time with `eqx.error_if`.
"""

import functools
import operator
from typing import TYPE_CHECKING, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, PyTree, ScalarLike


if TYPE_CHECKING:
    # For the type checker: a real number, or an array holding one (which may be
    # traced). jaxtyping's `ScalarLike` includes `complex`, which has no order.
    RealScalarLike: TypeAlias = (
        bool | int | float | Array | np.ndarray | np.floating | np.integer
    )
else:
    # At run time (jaxtyping's checks under pytest) anything array-like passes, so a
    # bad value reaches the sentence that names it.
    RealScalarLike = ScalarLike


# GPUs otherwise run float32 matrix products in reduced-precision passes.
HIGHEST = jax.lax.Precision.HIGHEST


def matmul(a: ArrayLike, b: ArrayLike) -> Array:
    """`a @ b` at `Precision.HIGHEST`."""
    return jnp.matmul(a, b, precision=HIGHEST)


def structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    """The `jax.ShapeDtypeStruct` of every leaf (arrays, NumPy arrays or numbers)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def flat_size(structure: PyTree[jax.ShapeDtypeStruct]) -> int:
    """The number of entries of a PyTree of arrays or `jax.ShapeDtypeStruct`s."""
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(structure))


def zeros_from(structure: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    """Zeros with the shapes and dtypes of a PyTree of `jax.ShapeDtypeStruct`s."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structure)


def flat_groups(leaves: list[Array]) -> list[list[Array]]:
    """Floating-point (and complex) arrays grouped by size and dtype, each flattened.

    Leaves of one group can be added elementwise, so that one reduction covers them
    all; integer and boolean arrays are left out.
    """
    groups: dict[tuple[int, jnp.dtype], list[Array]] = {}
    for x in leaves:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            groups.setdefault((x.size, x.dtype), []).append(x.reshape(-1))
    return list(groups.values())


def tree_all_finite(tree: PyTree[ArrayLike]) -> Bool[Array, ""]:
    """Whether every entry of every leaf is finite (one boolean scalar).

    Exact, and one reduction per leaf size and dtype rather than one per leaf: `x * 0`
    is zero where `x` is finite and NaN where it is infinite or NaN, so the sum of
    `x * 0` over the leaves of one size (added elementwise, then reduced) is NaN
    exactly when one of them holds a non-finite entry (zeros never overflow).
    Integer and boolean leaves are finite. A reduction of a concatenation would not
    do: XLA splits it into one reduction per operand, and on CPU every reduction is
    one or two kernels of its own, whose launches cost far more than the arithmetic
    (hundreds of them for a transformer's gradient, update and state).
    """
    finite = [
        jnp.isfinite(jnp.sum(functools.reduce(operator.add, [x * 0 for x in group])))
        for group in flat_groups(jax.tree.leaves(tree))
    ]
    return functools.reduce(operator.and_, finite, jnp.array(True))


def known_values(x) -> np.ndarray | None:
    """The values of `x` where they are known at trace time, else `None` (a tracer).

    Arrays that live partly on other hosts are not checkable here either.
    """
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_positive_int(value, name: str, what: str = "") -> int:
    """A Python int >= 1 (not a `bool`, which is an int to Python); else a sentence.

    `what` says what the argument is, e.g. `"the number of probes"`.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = f" ({what})" if what else ""
        raise ValueError(
            f"`{name}` must be a positive Python int{what}, but is {value!r}."
        )
    return value


def _is_real_number(value) -> bool:
    """A Python int or float (not a bool) or an array of a real dtype."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return hasattr(value, "dtype") and (
        jnp.issubdtype(value.dtype, jnp.floating)
        or jnp.issubdtype(value.dtype, jnp.integer)
    )


def check_scalar(value, name: str, *, allow_zero: bool = True, fix: str = ""):
    """A finite, non-negative (or positive) real scalar.

    A value known at trace time is checked now (a `TypeError` or `ValueError` naming
    `name`); a traced one is returned with an `eqx.error_if` check attached. `fix` ends
    the message (e.g. `"; use e.g. 1e-6"`).
    """
    if not _is_real_number(value):
        raise TypeError(f"`{name}` must be a real number, not {value!r}{fix}.")
    if jnp.shape(value) != ():
        raise ValueError(
            f"`{name}` must be a scalar, but has shape {jnp.shape(value)}{fix}."
        )
    bound = "non-negative" if allow_zero else "positive"

    def bad(x):
        return ~((x > 0) | (allow_zero & (x == 0))) | (x == np.inf)

    concrete = known_values(value)
    if concrete is None:
        message = f"`{name}` must be a finite {bound} number{fix}."
        return eqx.error_if(value, bad(value), message)
    if bad(np.float64(concrete)):
        raise ValueError(
            f"`{name}` must be a finite {bound} number, but is {concrete.item()!r}{fix}."
        )
    return value


def is_traced(x) -> bool:
    """Whether `x` is an array whose value is not known at trace time."""
    return isinstance(x, jax.Array) and known_values(x) is None


def check_hyperparameter(ok, message: str) -> None:
    """Raise `ValueError(message)` where `ok` is a condition known false at trace time.

    Conditions on traced hyperparameters are left to `checked_hyperparameter`, since
    their value is known only at run time.
    """
    if isinstance(ok, bool | np.bool_) or (
        isinstance(ok, jax.Array) and not is_traced(ok)
    ):
        if not bool(ok):
            raise ValueError(message)


def checked_hyperparameter(value, ok, message: str):
    """`value`, carrying a run-time check (`eqx.error_if`) of `ok` where it is traced.

    Conditions known at trace time were judged by `check_hyperparameter`, so the common
    case, hyperparameters given as Python numbers, costs nothing at run time.
    """
    if is_traced(ok):
        return eqx.error_if(value, ~ok, message)
    return value


def shown(value) -> str:
    """`value` for an error message: a traced value has no number to show."""
    return "a traced value" if is_traced(value) else repr(value)


def check_number_fields(module: eqx.Module) -> None:
    """Every numeric field of `module` is a real number, and a finite one where known.

    Runs before a module's own conditions (`rtol >= 0`, ...), so that a string, a
    complex number, a boolean or an infinite value gets a sentence naming the field,
    not Python's "'>=' not supported". Submodules and callables are skipped, and
    `None` where it is the field's default; an int field (a static count) must be a
    positive int.
    """
    import dataclasses

    name = type(module).__name__
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        if value is None and field.default is not None:
            raise TypeError(
                f"`{name}(... {field.name}=...)` must be given a value, not None."
            )
        if value is None or isinstance(value, eqx.Module) or callable(value):
            continue
        if isinstance(field.default, int) and not isinstance(field.default, bool):
            check_positive_int(value, f"{name}.{field.name}")
            continue
        if not _is_real_number(value):
            raise TypeError(
                f"`{name}(... {field.name}=...)` must be a real number, not {value!r}."
            )
        concrete = known_values(value)
        if concrete is not None and not np.isfinite(concrete).all():
            raise ValueError(
                f"`{name}(... {field.name}=...)` must be finite, but is "
                f"{concrete.item() if concrete.size == 1 else concrete!r}."
            )
