"""`check_operator`: the whole battery of curvature-operator properties in one call."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import ArrayLike, PRNGKeyArray

from .._misc import structure_of
from ._assertions import (
    as_matrix,
    check_square,
    default_rtol,
    entry_names,
    eps_of,
    flat,
    matrix_failure,
    semidefinite_failure,
    symmetry_failure,
)
from ._report import Battery, Skip


def _normal_like(key, structure):
    leaves, treedef = jax.tree.flatten(structure)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)],
    )


# The lineax views of an operator that solvers use, each compared with the matrix.
_VIEWS = {
    "linearise": lambda op, u: lx.linearise(op).mv(u),
    "conj": lambda op, u: lx.conj(op).mv(u),
    "materialise": lambda op, u: lx.materialise(op).as_matrix(),
    "diagonal": lambda op, u: lx.diagonal(op),
}


@eqx.filter_jit
def _probe(operator, u, v, alpha, transpose: bool, views: tuple):
    """One compilation for most properties: the matrix column by column from `mv`
    (vmapped over the basis), A u, the vmapped product of the stack of u, v and
    alpha u + v, (if `transpose`) A^T v through `operator.T`, and the lineax `views`
    that solvers use."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure())
    vector, unravel = jax.flatten_util.ravel_pytree(zeros)

    def column(e):
        return jax.flatten_util.ravel_pytree(operator.mv(unravel(e)))[0]

    basis = jnp.eye(vector.size, dtype=vector.dtype)
    w = jax.tree.map(lambda a, b: alpha.astype(a.dtype) * a + b, u, v)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), u, v, w)
    out: dict[str, Any] = dict(
        matrix=jax.vmap(column)(basis).T,
        au=operator.mv(u),
        batched=jax.vmap(operator.mv)(stacked),
    )
    if transpose:
        out["atv"] = operator.T.mv(v)
    out["views"] = {name: _VIEWS[name](operator, u) for name in views}
    return out


@eqx.filter_jit
def _solves(operator, b, solvers: dict):
    out = {}
    for name, solver in solvers.items():
        solution = lx.linear_solve(operator, b, solver, throw=False)
        out[name] = (solution.value, solution.result == lx.RESULTS.successful)
    return out


def _rows(batched, count: int) -> list:
    batched = jax.tree.map(np.asarray, batched)
    return [jax.tree.map(lambda x, i=i: x[i], batched) for i in range(count)]


def _name(function) -> str:
    return getattr(function, "__name__", repr(function))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _all_or_each(compute, names):
    """`compute(names)` in one compilation; if that raises, each name alone, so that
    a failure is pinned on the one that raises. Returns (results, errors)."""
    try:
        return compute(tuple(names)), {}
    except Exception:
        results, errors = {}, {}
        for name in names:
            try:
                results.update(compute((name,)))
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {_first_line(error)}"
        return results, errors


def _close(
    label: str, got, expected: np.ndarray, tolerance: float | np.floating
) -> None:
    got = flat(got)
    error = float(np.linalg.norm(got - expected))
    if not error <= tolerance:
        k = int(np.argmax(np.abs(got - expected)))
        raise AssertionError(
            f"{label}: error {error:.3g}, above the tolerance {tolerance:.3g} (entry "
            f"{k}: {got[k]:.6g} where {expected[k]:.6g} is expected)."
        )


def _default_solvers(operator, size: int, eps: float) -> dict:
    if lx.is_positive_semidefinite(operator):
        tolerance = max(1e3 * eps, 1e-12)
        return {
            "CG": lx.CG(rtol=tolerance, atol=tolerance, max_steps=20 * size),
            "Cholesky": lx.Cholesky(),
        }
    return {"LU": lx.LU()}


def check_operator(
    operator: lx.AbstractLinearOperator,
    *,
    dense: ArrayLike | None = None,
    symmetric: bool = True,
    rtol: float | None = None,
    solvers: Mapping[str, lx.AbstractLinearSolver] | None = None,
    key: PRNGKeyArray | None = None,
) -> dict[str, str]:
    r"""Run every conformance property on a curvature operator; report all failures.

    The properties, each reported by name:

    - `symmetric`: the matrix built from `mv` equals its transpose (unless
        `symmetric=False`); `symmetric_tag`: `lineax.is_symmetric` says so too (else
        CG and Cholesky refuse it).
    - `positive_semidefinite` / `negative_semidefinite`: the spectrum has the sign
        where the operator is tagged so.
    - `tags`: every other structural tag it carries holds (`diagonal`,
        `tridiagonal`, triangular, unit diagonal).
    - `linearity`: $A(\alpha u + v) = \alpha A u + A v$ for random $u, v$.
    - `mv_vs_as_matrix`: `as_matrix()` equals the matrix `mv` gives.
    - `dense`: both equal `dense`, where given.
    - `transpose`: `operator.T` maps `v` to $A^\top v$.
    - `jit`, `vmap`: `mv` under `eqx.filter_jit` with the operator as an argument
        agrees with `mv` under `jax.jit` with the operator closed over, and with
        `jax.vmap(operator.mv)` over a batch of vectors; `dtype`: the product has the
        operator's output structure and dtypes.
    - `lineax_queries`: every lineax query runs (`is_symmetric`, ...,
        `has_unit_diagonal`), and `linearise`, `materialise`, `diagonal` and `conj`
        agree with the matrix.
    - `solvers`: `lineax.linear_solve` solves a system to within the conditioning
        with each solver the tags allow (CG and Cholesky where tagged positive
        semidefinite, else LU) or those given; skipped for a numerically singular
        matrix.
    - `wrong_structure`: `mv` of a vector of the wrong structure or shape raises a
        `ValueError` or `TypeError` at trace time instead of returning something.

    Tolerances are relative, $10\,n\,\varepsilon$ by default for $n$ unknowns and the
    operator's machine epsilon, times the condition number for solves. The operator is
    materialised: build it on a small model (at most a few thousand parameters).

    **Arguments:**

    - `operator`: a square lineax operator on a parameter PyTree.
    - `dense`: its expected matrix (rows and columns in
        `jax.flatten_util.ravel_pytree` order), e.g. a `jax.hessian`; optional.
    - `symmetric`: whether the operator is meant to be symmetric (curvature
        matrices are).
    - `rtol`: the relative tolerance, instead of $10\,n\,\varepsilon$.
    - `solvers`: name -> lineax solver to try, instead of those the tags allow.
    - `key`: the randomness of the probe vectors (default `jax.random.key(0)`).

    **Returns:**

    A dict, property name -> `"passed"` or `"skipped: <why>"`.

    **Raises:**

    [`eqx_curv.testing.ConformanceError`][] listing every failing property (its
    `failures` attribute maps each name to its message).
    """
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise TypeError(
            "`operator` must be a lineax operator (e.g. an eqx_curv curvature "
            f"operator), not {type(operator).__name__}."
        )
    n = check_square(operator)
    structure = operator.in_structure()
    eps = eps_of(operator)
    rtol = default_rtol(n, eps) if rtol is None else rtol
    names = entry_names(structure)
    key = jax.random.key(0) if key is None else key
    battery = Battery()
    subject = f"The operator {type(operator).__name__}"

    ku, kv = jax.random.split(key)
    u, v = _normal_like(ku, structure), _normal_like(kv, structure)
    fu, fv = flat(u), flat(v)
    alpha = -1.75
    found = {}

    def probe():
        scalar = jnp.asarray(alpha)
        try:
            found.update(_probe(operator, u, v, scalar, True, tuple(_VIEWS)))
            found["view_errors"] = {}
            return
        except Exception:
            pass
        # Something raised: pin it on `mv` itself, `operator.T` or a lineax view.
        found.update(_probe(operator, u, v, scalar, False, ()))
        try:
            _probe(operator, u, v, scalar, True, ())
        except Exception as error:
            found["transpose_error"] = f"{type(error).__name__}: {_first_line(error)}"
        found["view_errors"] = {}
        for name in _VIEWS:
            try:
                found["views"].update(
                    _probe(operator, u, v, scalar, False, (name,))["views"]
                )
            except Exception as error:
                message = f"{type(error).__name__}: {_first_line(error)}"
                found["view_errors"][name] = message

    if not battery.run("mv", probe):
        return battery.finish(subject)
    a = np.asarray(found["matrix"], np.float64)
    scale = max(float(np.linalg.norm(a, 2)), float(np.finfo(np.float64).tiny))

    def check_symmetric():
        if not symmetric:
            raise Skip("`symmetric=False`")
        message = symmetry_failure(a, names, eps, rtol)
        if message is not None:
            raise AssertionError(message)

    def check_symmetric_tag():
        if not symmetric:
            raise Skip("`symmetric=False`")
        if not lx.is_symmetric(operator):
            raise AssertionError(
                "`lineax.is_symmetric(operator)` is False for a curvature operator: "
                "lineax.CG and lineax.Cholesky refuse it. Tag it "
                "`lineax.symmetric_tag` (or register `lineax.is_symmetric` for the "
                "class)."
            )

    def semidefinite(sign, query, tag_name):
        def check():
            if not query(operator):
                raise Skip(f"not tagged {tag_name}")
            failure = semidefinite_failure(a, names, eps, rtol, sign)
            if failure is not None:
                raise AssertionError(failure[0] + f" Yet it is tagged {tag_name}.")

        return check

    def check_tags():
        claims = {
            "diagonal": (lx.is_diagonal, np.tril(a, -1) + np.triu(a, 1)),
            "tridiagonal": (lx.is_tridiagonal, np.tril(a, -2) + np.triu(a, 2)),
            "lower triangular": (lx.is_lower_triangular, np.triu(a, 1)),
            "upper triangular": (lx.is_upper_triangular, np.tril(a, -1)),
            "unit diagonal": (lx.has_unit_diagonal, np.diag(np.diag(a) - 1)),
        }
        broken, claimed = [], []
        for tag, (query, excess) in claims.items():
            if query(operator):
                claimed.append(tag)
                size = float(np.abs(excess).max(initial=0.0))
                if size > rtol * scale:
                    broken.append(f"{tag} (an entry of size {size:.3g} it excludes)")
        if broken:
            raise AssertionError(
                "The lineax queries claim " + "; ".join(broken) + ", which the "
                "matrix from `mv` contradicts."
            )
        if not claimed:
            raise Skip("no structural tag claimed")

    def check_linearity():
        tolerance = (
            rtol * scale * (abs(alpha) * np.linalg.norm(fu) + np.linalg.norm(fv))
        )
        au, av, aw = (flat(row) for row in _rows(found["batched"], 3))
        _close(
            "A(alpha u + v) differs from alpha A u + A v",
            aw,
            alpha * au + av,
            tolerance,
        )
        _close(
            "`mv(u)` differs from the matrix `mv` gives column by column, times u",
            found["au"],
            a @ fu,
            rtol * scale * np.linalg.norm(fu),
        )

    def check_mv_vs_as_matrix():
        got = as_matrix(operator)
        found["as_matrix"] = got
        message = matrix_failure(
            "`as_matrix()`", got, a, names, rtol, what="the matrix `mv` gives"
        )
        if message is not None:
            raise AssertionError(message)

    def check_dense():
        if dense is None:
            raise Skip("no `dense` given")
        reference = np.asarray(dense, np.float64)
        if reference.shape != (n, n):
            raise AssertionError(
                f"`dense` has shape {reference.shape}, not ({n}, {n})."
            )
        messages = [
            matrix_failure(label, got, reference, names, rtol)
            for label, got in [("`mv`", a), ("`as_matrix()`", found.get("as_matrix"))]
            if got is not None
        ]
        messages = [m for m in messages if m is not None]
        if messages:
            raise AssertionError("\n".join(messages))

    def check_transpose():
        if "transpose_error" in found:
            raise AssertionError(f"`operator.T.mv` raised {found['transpose_error']}")
        if structure_of(operator.T.in_structure()) != structure_of(
            operator.out_structure()
        ):
            raise AssertionError(
                "`operator.T.in_structure()` is not `operator.out_structure()`."
            )
        _close(
            "`operator.T.mv(v)` differs from A^T v",
            found["atv"],
            a.T @ fv,
            rtol * scale * np.linalg.norm(fv),
        )

    def check_jit():
        # The products above ran with the operator as an argument of
        # `eqx.filter_jit`; here it is closed over (its arrays become constants).
        closed = jax.jit(lambda x: operator.mv(x))(u)
        _close(
            "`mv` under `jax.jit` with the operator closed over differs from `mv` "
            "under `eqx.filter_jit` with the operator as an argument",
            closed,
            flat(found["au"]),
            rtol * scale * np.linalg.norm(fu),
        )

    def check_vmap():
        batched_u, batched_v, _ = _rows(found["batched"], 3)
        _close(
            "`jax.vmap(operator.mv)` differs from `mv` on a vector",
            batched_u,
            flat(found["au"]),
            rtol * scale * np.linalg.norm(fu),
        )
        _close(
            "`jax.vmap(operator.mv)` differs from the matrix `mv` gives on a vector",
            batched_v,
            a @ fv,
            rtol * scale * np.linalg.norm(fv),
        )

    def check_dtype():
        got = structure_of(found["au"])
        want = structure_of(operator.out_structure())
        if got != want:
            raise AssertionError(
                f"`mv` returns {got}, but `out_structure()` promises {want}."
            )

    def check_queries():
        problems = []
        for query in (
            lx.is_symmetric,
            lx.is_positive_semidefinite,
            lx.is_negative_semidefinite,
            lx.is_diagonal,
            lx.is_tridiagonal,
            lx.is_lower_triangular,
            lx.is_upper_triangular,
            lx.has_unit_diagonal,
        ):
            try:
                answer = query(operator)
                if not isinstance(answer, (bool, np.bool_)):
                    problems.append(f"{_name(query)} returned {answer!r}")
            except Exception as error:
                problems.append(f"{_name(query)} raised {type(error).__name__}")
        views, errors = found["views"], found["view_errors"]
        problems += [f"{name} raised {error}" for name, error in errors.items()]
        expected = {
            "linearise": (a @ fu, np.linalg.norm(fu)),
            "conj": (a @ fu, np.linalg.norm(fu)),
            "materialise": (a.ravel(), np.sqrt(n)),
            "diagonal": (np.diag(a), 1.0),
        }
        for name, got in views.items():
            want, size = expected[name]
            error = float(np.linalg.norm(flat(got) - want))
            if not error <= rtol * scale * size:
                problems.append(f"{name} is off by {error:.3g}")
        if problems:
            raise AssertionError(
                "Lineax queries fail: " + "; ".join(problems) + ". Register each "
                "query for the operator's class (`lineax.is_symmetric.register`, ...)."
            )

    def check_solvers():
        chosen = _default_solvers(operator, n, eps) if solvers is None else solvers
        if not chosen:
            raise Skip("no solver to try")
        singular = np.linalg.svd(a, compute_uv=False)
        cond = float(singular[0] / singular[-1]) if singular[-1] > 0 else np.inf
        if not cond < 0.01 / eps:
            raise Skip(
                f"the matrix is numerically singular (condition number {cond:.3g})"
            )
        expected = np.linalg.solve(a, fv)
        results, errors = _all_or_each(
            lambda names: _solves(operator, v, {k: chosen[k] for k in names}), chosen
        )
        problems = [f"{name} raised {error}" for name, error in errors.items()]
        allowed = 100 * cond * max(n * eps, 1e3 * eps)
        for name, (value, ok) in results.items():
            if not bool(ok):
                problems.append(f"{name} reports failure")
                continue
            error = float(
                np.linalg.norm(flat(value) - expected) / np.linalg.norm(expected)
            )
            if not error <= allowed:
                problems.append(
                    f"{name}'s solution is off by {error:.3g} (relative; allowed "
                    f"{allowed:.3g} at condition number {cond:.3g})"
                )
        if problems:
            raise AssertionError("Linear solves fail: " + "; ".join(problems) + ".")

    def check_wrong_structure():
        leaves, treedef = jax.tree.flatten(structure)
        first = leaves[0]
        wrong_shape = jax.tree.unflatten(
            treedef,
            [jnp.zeros((first.size + 1,), first.dtype)]
            + [jnp.zeros(s.shape, s.dtype) for s in leaves[1:]],
        )
        cases = {
            "a PyTree of another structure": {"not a parameter": jnp.zeros(3)},
            "a first leaf of the wrong shape": wrong_shape,
        }
        problems = []
        for what, vector in cases.items():
            try:
                eqx.filter_eval_shape(operator.mv, vector)
            except (ValueError, TypeError) as error:
                if not str(error).strip():
                    problems.append(f"{what} raised an empty {type(error).__name__}")
                continue
            except Exception as error:
                problems.append(
                    f"{what} raised {type(error).__name__} (expected a ValueError or "
                    "TypeError naming the problem)"
                )
                continue
            problems.append(f"{what} was accepted without an error")
        if problems:
            raise AssertionError(
                "`mv` of a wrong vector: " + "; ".join(problems) + ". Check the "
                "vector against `in_structure()` and raise a sentence."
            )

    battery.run("symmetric", check_symmetric)
    battery.run("symmetric_tag", check_symmetric_tag)
    battery.run(
        "positive_semidefinite",
        semidefinite(1, lx.is_positive_semidefinite, "positive semidefinite"),
    )
    battery.run(
        "negative_semidefinite",
        semidefinite(-1, lx.is_negative_semidefinite, "negative semidefinite"),
    )
    battery.run("tags", check_tags)
    battery.run("linearity", check_linearity)
    battery.run("mv_vs_as_matrix", check_mv_vs_as_matrix)
    battery.run("dense", check_dense)
    battery.run("transpose", check_transpose)
    battery.run("jit", check_jit)
    battery.run("vmap", check_vmap)
    battery.run("dtype", check_dtype)
    battery.run("lineax_queries", check_queries)
    battery.run("solvers", check_solvers)
    battery.run("wrong_structure", check_wrong_structure)
    return battery.finish(subject)
