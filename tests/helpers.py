"""Registries and small utilities shared by the tests.

Generic tests parametrize over the registries below, so that a new operator or optimizer
is enrolled in every generic test by adding one entry here.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Leafwise `numpy.testing.assert_allclose` over two PyTrees of the same structure."""
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def ravel(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def random_like(key, tree):
    """A standard-normal PyTree with the structure, shapes and dtypes of `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves)
        ],
    )


# ---------------------------------------------------------------------------------------
# Curvature operators and their dense float64 oracles.
#
# Each entry: name -> (build, oracle, psd). `build(model, loss, inputs, targets, key)`
# returns the operator; `oracle(...)` (same arguments) its dense matrix, computed
# independently with `jax.hessian` / `jax.jacfwd` / per-example gradients, with rows
# and columns in `ravel_pytree` order.


def _flat_problem(model, inputs, state=None, axis_name=None):
    """Flat parameters, and the batched outputs as a function of them.

    With a `state`, the model is called as `model(x, state)[0]` (the state held fixed);
    `axis_name` names the vmapped batch axis (`eqx.nn.BatchNorm` in training mode).
    """
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def outputs(f):
        m = eqx.combine(unravel(f), static)
        if state is None:
            return jax.vmap(m, axis_name=axis_name)(inputs)
        # The state goes through vmap (a fresh copy), so `state.set` in training mode
        # cannot invalidate the caller's.
        call = lambda x, s: m(x, s)[0]  # noqa: E731
        return jax.vmap(call, in_axes=(0, None), axis_name=axis_name)(inputs, state)

    return flat, outputs


def head_filter_spec(model, count=2):
    """A bool filter spec selecting the last `count` floating-point arrays of `model`."""
    leaves, treedef = jax.tree.flatten(model)
    chosen = [i for i, leaf in enumerate(leaves) if eqx.is_inexact_array(leaf)][-count:]
    return jax.tree.unflatten(treedef, [i in chosen for i in range(len(leaves))])


def parameter_mask(model, filter_spec):
    """Which entries of `ravel(eqx.filter(model, eqx.is_inexact_array))` are selected."""
    leaves = jax.tree.leaves(model)
    flags = jax.tree.leaves(filter_spec)
    return np.concatenate(
        [
            np.full(leaf.size, flag, bool)
            for leaf, flag in zip(leaves, flags, strict=True)
            if eqx.is_inexact_array(leaf)
        ]
    )


def sub_block(dense, mask):
    """Rows and columns `mask` of a dense matrix: the curvature of the selected part."""
    return dense[np.ix_(mask, mask)]


@eqx.filter_jit
def dense_hessian(model, loss, inputs, targets, key=None):
    flat, outputs = _flat_problem(model, inputs)
    return jax.hessian(lambda f: loss(outputs(f), targets))(flat)


@eqx.filter_jit
def dense_ggn(model, loss, inputs, targets, key=None, *, state=None, axis_name=None):
    flat, outputs = _flat_problem(model, inputs, state, axis_name)
    jac = jax.jacfwd(outputs)(flat)  # [batch, *out, params]
    n = inputs.shape[0]
    jac = jac.reshape(n, -1, flat.size)
    out = outputs(flat)
    hess = jax.hessian(lambda o: loss(o, targets))(out)  # [batch, *out, batch, *out]
    hess = hess.reshape(n, jac.shape[1], n, jac.shape[1])
    return jnp.einsum("ncp,ncmd,mdq->pq", jac, hess, jac)


def per_example_gradients(model, loss, inputs, targets):
    """Rows g_i: the gradient of example i's loss (a batch of one) at its target."""
    flat, _ = _flat_problem(model, inputs)

    def one(x, y):
        _, outputs = _flat_problem(model, x[None])
        return jax.grad(lambda f: loss(outputs(f), y[None]))(flat)

    return jax.vmap(one)(inputs, targets)


@eqx.filter_jit
def dense_empirical_fisher(model, loss, inputs, targets, key=None):
    g = per_example_gradients(model, loss, inputs, targets)
    return g.T @ g / g.shape[0]


@eqx.filter_jit
def dense_mc_fisher(model, loss, inputs, key, num_samples):
    """Mean of empirical Fishers at the targets the operator samples from `key`."""
    from eqx_curv._operators.ggn import sample_targets

    _, outputs = _flat_problem(model, inputs)
    flat, _ = _flat_problem(model, inputs)
    sampled = sample_targets(loss, key, num_samples, outputs(flat))
    mats = [
        dense_empirical_fisher(model, loss, inputs, sampled[s])
        for s in range(num_samples)
    ]
    return sum(mats) / num_samples


DAMPING = 0.3


def _operators():
    import eqx_curv

    return {
        "hessian": (
            lambda m, loss, x, y, k: eqx_curv.HessianOperator(
                _loss_fn(m, loss, x, y), _params(m)
            ),
            dense_hessian,
            False,
        ),
        "ggn": (
            lambda m, loss, x, y, k: eqx_curv.GGNOperator(m, loss, x, y),
            dense_ggn,
            True,
        ),
        "fisher_exact": (
            lambda m, loss, x, y, k: eqx_curv.FisherOperator(m, loss, x),
            dense_ggn,
            True,
        ),
        "fisher_mc": (
            lambda m, loss, x, y, k: eqx_curv.FisherOperator(
                m, loss, x, key=k, num_samples=2
            ),
            lambda m, loss, x, y, k: dense_mc_fisher(m, loss, x, k, 2),
            True,
        ),
        "empirical_fisher": (
            lambda m, loss, x, y, k: eqx_curv.EmpiricalFisherOperator(m, loss, x, y),
            dense_empirical_fisher,
            True,
        ),
        "ggn_head": (
            lambda m, loss, x, y, k: eqx_curv.GGNOperator(
                m, loss, x, filter_spec=head_filter_spec(m)
            ),
            lambda m, loss, x, y, k: sub_block(
                dense_ggn(m, loss, x, y), parameter_mask(m, head_filter_spec(m))
            ),
            True,
        ),
        "damped_ggn": (
            lambda m, loss, x, y, k: eqx_curv.DampedOperator(
                eqx_curv.GGNOperator(m, loss, x, y), DAMPING
            ),
            lambda *a: dense_ggn(*a) + DAMPING * jnp.eye(dense_ggn(*a).shape[0]),
            True,
        ),
        "damped_hessian": (
            lambda m, loss, x, y, k: eqx_curv.DampedOperator(
                eqx_curv.HessianOperator(_loss_fn(m, loss, x, y), _params(m)), DAMPING
            ),
            lambda *a: (
                dense_hessian(*a) + DAMPING * jnp.eye(dense_hessian(*a).shape[0])
            ),
            False,
        ),
    }


def _params(model):
    import equinox as eqx

    return eqx.filter(model, eqx.is_inexact_array)


def _loss_fn(model, loss, inputs, targets):
    import equinox as eqx

    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)

    def fn(params):
        return loss(jax.vmap(eqx.combine(params, static))(inputs), targets)

    return fn


OPERATOR_NAMES = [
    "hessian",
    "ggn",
    "fisher_exact",
    "fisher_mc",
    "empirical_fisher",
    "ggn_head",
    "damped_ggn",
    "damped_hessian",
]


def operator_entry(name):
    """(build, oracle, psd) for a registered operator name."""
    if name in STRUCTURED_NAMES:
        return _structured_entry(name)
    return _operators()[name]


# ---------------------------------------------------------------------------------------
# Structured operators, built from fixed small float64 matrices: entries of the same
# (build, oracle, psd) form, whose `build` and `oracle` ignore the model problem they
# are given. Their oracles are `numpy` products of the same matrices.


def _orthogonal(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def _spectrum_matrix(values, seed):
    q = _orthogonal(len(values), seed)
    return (q * np.asarray(values)) @ q.T


def block_diagonal_dense(*blocks):
    """The dense block-diagonal matrix of square NumPy blocks, in order."""
    n = sum(b.shape[0] for b in blocks)
    out, i = np.zeros((n, n)), 0
    for b in blocks:
        out[i : i + b.shape[0], i : i + b.shape[0]] = b
        i += b.shape[0]
    return out


def _structured():
    """name -> (build(), dense, psd), built from the matrices below."""
    import lineax as lx

    import eqx_curv

    psd_tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    a = _spectrum_matrix([2.0, 1.0, 0.5], 0)
    b = _spectrum_matrix([1.5, 0.4], 1)
    indefinite = _spectrum_matrix([1.0, -0.7, 0.3], 2)
    qa, qb = _orthogonal(3, 3), _orthogonal(2, 4)
    s = np.array([[1.0, 0.5], [2.0, 0.25], [0.8, 1.2]])
    w = np.array([1.3, -0.6, 0.9, 0.2, -1.1])
    qw = _orthogonal(5, 5)
    d = {"b": np.linspace(0.5, 1.5, 5), "w": np.full((4, 3), 0.3)}
    v = np.random.default_rng(6).standard_normal((17, 3))
    d_flat = np.concatenate([d["b"], d["w"].ravel()])  # ravel_pytree order: b, w

    def woodbury():
        _, unravel = jax.flatten_util.ravel_pytree(
            {"b": jnp.zeros(5), "w": jnp.zeros((4, 3))}
        )
        factor = lx.FunctionLinearOperator(
            lambda u: unravel(jnp.asarray(v) @ u),
            jax.ShapeDtypeStruct((3,), jnp.float64),
        )
        diagonal = jax.tree.map(jnp.asarray, d)
        return eqx_curv.WoodburyOperator(
            diagonal, factor, tags=lx.positive_semidefinite_tag
        )

    def block_diagonal():
        return eqx_curv.BlockDiagonalOperator(
            {
                "w": eqx_curv.KroneckerOperator(
                    jnp.asarray(a), jnp.asarray(b), tags=psd_tags
                ),
                "b": lx.TaggedLinearOperator(
                    lx.DiagonalLinearOperator(jnp.asarray(d["b"])), psd_tags
                ),
            }
        )

    eigen = np.kron(qa, qb)
    return {
        "kronecker": (
            lambda: eqx_curv.KroneckerOperator(
                jnp.asarray(a), jnp.asarray(b), tags=psd_tags
            ),
            np.kron(a, b),
            True,
        ),
        "kronecker_indefinite": (
            lambda: eqx_curv.KroneckerOperator(jnp.asarray(indefinite), jnp.asarray(b)),
            np.kron(indefinite, b),
            False,
        ),
        "kronecker_eigen": (
            lambda: eqx_curv.KroneckerEigenOperator(
                jnp.asarray(qa), jnp.asarray(qb), jnp.asarray(s), tags=psd_tags
            ),
            (eigen * s.ravel()) @ eigen.T,
            True,
        ),
        "eigh": (
            lambda: eqx_curv.EighOperator(
                eigenvalues=jnp.asarray(w),
                eigenvectors=jnp.asarray(qw),
                structure={
                    "a": jax.ShapeDtypeStruct((2,), jnp.float64),
                    "b": jax.ShapeDtypeStruct((3,), jnp.float64),
                },
            ),
            (qw * w) @ qw.T,
            False,
        ),
        "woodbury": (woodbury, np.diag(d_flat) + v @ v.T, True),
        # ravel_pytree orders the dict keys: "b", then "w".
        "block_diagonal": (
            block_diagonal,
            block_diagonal_dense(np.diag(d["b"]), np.kron(a, b)),
            True,
        ),
    }


def _structured_entry(name):
    build, dense, psd = _structured()[name]
    return (
        lambda m, loss, x, y, k: build(),
        lambda m, loss, x, y, k: jnp.asarray(dense),
        psd,
    )


STRUCTURED_NAMES = [
    "kronecker",
    "kronecker_indefinite",
    "kronecker_eigen",
    "eigh",
    "woodbury",
    "block_diagonal",
]


# ---------------------------------------------------------------------------------------
# Network optimizers (the stochastic `init` / `step` protocol). Each entry: name -> a
# constructor taking no arguments; the protocol suite in test_network_optimizers.py runs
# on every entry. The first entry of each class is its default construction.


def _eqx_curv():
    import eqx_curv

    return eqx_curv


NETWORK_OPTIMIZERS = {
    "sgd": lambda: _eqx_curv().SGD(),
    "fisher_adam": lambda: _eqx_curv().FisherAdam(),
    "fisher_adam_true": lambda: _eqx_curv().FisherAdam(fisher="true"),
    "fisher_adam_natural": lambda: _eqx_curv().FisherAdam(exponent=1.0, momentum=0.0),
    "shampoo": lambda: _eqx_curv().Shampoo(),
    "soap": lambda: _eqx_curv().SOAP(),
    "muon": lambda: _eqx_curv().Muon(),
    "gauss_newton": lambda: _eqx_curv().GaussNewton(),
    "natural_gradient_mc": lambda: _eqx_curv().NaturalGradient(fisher="mc"),
    "adahessian": lambda: _eqx_curv().AdaHessian(),
    "diagonal_newton": lambda: _eqx_curv().StochasticDiagonalNewton(),
    "kfac": lambda: _eqx_curv().KFAC(),
}
