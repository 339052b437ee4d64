"""`eigh_with_retry`: float32 eigendecompositions whose failures are recomputed in
float64, on the device (64-bit mode) or on the host (NumPy, through a callback); and
the `eigh_retry` options of K-FAC and SOAP.

The genuine failure: `jnp.linalg.eigh` symmetrises as (A + A^T) / 2, which overflows
for entries above half of float32's largest value, so that a finite matrix with
representable eigenvalues comes out NaN. The optimizers' factors never get there, so
their tests poison float32 `jnp.linalg.eigh` (NaN results) instead.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


_EPS32 = float(np.finfo(np.float32).eps)


def _batch():
    """Three ordinary symmetric 5 x 5 matrices, and a fourth whose entries overflow
    when summed with its transpose (eigenvalues 1.5e38 to 3e38, within float32)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 5))
    ordinary = x + np.swapaxes(x, -1, -2)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    huge = (q * np.linspace(1.5e38, 3e38, 5)) @ q.T
    huge = 0.5 * (huge + huge.T)
    return np.concatenate([ordinary, huge[None]]).astype(np.float32)


def _check_against_float64(result, matrices):
    """Eigenvalues to float32 rounding of NumPy's float64 ones; eigenvectors that
    reconstruct the matrix and are orthonormal to float32 accuracy."""
    a = np.asarray(matrices, np.float64)
    w = np.asarray(result.eigenvalues, np.float64)
    v = np.asarray(result.eigenvectors, np.float64)
    reference = np.linalg.eigh(a)[0]
    scale = np.max(np.abs(reference), axis=-1, keepdims=True)
    np.testing.assert_allclose(w / scale, reference / scale, rtol=0, atol=4 * _EPS32)
    rebuilt = np.einsum("...ij,...j,...kj->...ik", v, w, v)
    residual = np.linalg.norm(rebuilt - a, axis=(-2, -1))
    assert np.all(residual <= 8 * _EPS32 * np.linalg.norm(a, axis=(-2, -1)))
    gram = np.einsum("...ji,...jk->...ik", v, v)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(5), gram.shape), atol=1e-6)


@pytest.mark.parametrize("x64", [False, True], ids=["host", "device"])
def test_overflowing_matrix_is_recovered_and_the_others_are_plain_eigh(x64):
    import eqx_curv

    with jax.enable_x64(x64):
        matrices = jnp.asarray(_batch())
        plain = jnp.linalg.eigh(matrices)
        assert not np.isfinite(plain.eigenvalues[3]).any()  # the genuine failure
        result = jax.jit(eqx_curv.eigh_with_retry)(matrices)
        assert result.eigenvalues.dtype == result.eigenvectors.dtype == jnp.float32
        assert int(result.retries) == 1 and int(result.failures) == 0
        # The common path (the first three) is bitwise jnp.linalg.eigh.
        assert np.array_equal(result.eigenvalues[:3], plain.eigenvalues[:3])
        assert np.array_equal(result.eigenvectors[:3], plain.eigenvectors[:3])
        _check_against_float64(result, matrices)


def test_nothing_failed_gives_plain_eigh_bitwise():
    import eqx_curv

    matrices = jnp.asarray(_batch()[:3])
    plain = jnp.linalg.eigh(matrices)
    for result in [
        eqx_curv.eigh_with_retry(matrices),
        jax.jit(eqx_curv.eigh_with_retry)(matrices[0]),
    ]:
        assert int(result.retries) == 0 and int(result.failures) == 0
        n = result.eigenvalues.ndim
        assert np.array_equal(result.eigenvalues, plain.eigenvalues[(0,) * (2 - n)])
        assert np.array_equal(result.eigenvectors, plain.eigenvectors[(0,) * (2 - n)])


@pytest.mark.parametrize("x64", [False, True], ids=["host", "device"])
def test_vmap_counts_per_matrix(x64):
    import eqx_curv

    with jax.enable_x64(x64):
        matrices = jnp.asarray(_batch())
        result = jax.jit(jax.vmap(eqx_curv.eigh_with_retry))(matrices)
        np.testing.assert_array_equal(result.retries, [0, 0, 0, 1])
        np.testing.assert_array_equal(result.failures, [0, 0, 0, 0])
        _check_against_float64(result, matrices)


def test_zero_tolerance_recomputes_everything_as_numpy_float64():
    # Every residual is above 0, so every matrix goes through NumPy's float64 eigh
    # on the host: the result is exactly its rounding to float32.
    import eqx_curv

    with jax.enable_x64(False):
        matrices = jnp.asarray(_batch()[:3])
        result = eqx_curv.eigh_with_retry(matrices, rtol=0.0)
        assert int(result.retries) == 3 and int(result.failures) == 0
        w, v = np.linalg.eigh(np.asarray(matrices, np.float64))
        assert np.array_equal(result.eigenvalues, w.astype(np.float32))
        assert np.array_equal(result.eigenvectors, v.astype(np.float32))


def test_non_finite_input_stays_non_finite_and_is_reported():
    import eqx_curv

    with jax.enable_x64(False):
        matrices = jnp.asarray(_batch()).at[1, 0, 0].set(jnp.nan)
        result = eqx_curv.eigh_with_retry(matrices)
        # The NaN one is not retried (float64 cannot help) and still fails; the
        # overflowing one is recovered.
        assert int(result.retries) == 1 and int(result.failures) == 1
        assert not np.isfinite(result.eigenvalues[1]).all()
        assert np.isfinite(result.eigenvalues[3]).all()
        # Without the retry, the overflowing one is reported as well.
        off = eqx_curv.eigh_with_retry(matrices, retry=False)
        assert int(off.retries) == 0 and int(off.failures) == 2
        plain = jnp.linalg.eigh(matrices)
        assert np.array_equal(off.eigenvalues, plain.eigenvalues, equal_nan=True)


def test_bad_arguments_are_sentences():
    import eqx_curv

    with pytest.raises(TypeError, match="`matrix` must be real float32"):
        eqx_curv.eigh_with_retry(jnp.eye(3, dtype=jnp.bfloat16))
    # The shape is also caught by the jaxtyping annotation under pytest; the
    # library's own check gives the message users see without it.
    from eqx_curv._linalg.eigh import check_eigh_input

    with pytest.raises(ValueError, match="`matrix` must be a square matrix"):
        check_eigh_input(jnp.ones((3, 4), jnp.float32))
    with pytest.raises(ValueError, match="`rtol` must be a non-negative"):
        eqx_curv.eigh_with_retry(jnp.eye(3, dtype=jnp.float32), rtol=-1.0)
    with pytest.raises(
        ValueError, match='`eigh_retry=True` needs `damping_method="exact"`'
    ):
        eqx_curv.KFAC(eigh_retry=True)


# ---------------------------------------------------------------------------------------
# The optimizers' options.


def _poison_float32_eigh(monkeypatch):
    """Make float32 `jnp.linalg.eigh` return NaN (float64 stays right)."""
    real = jnp.linalg.eigh

    def poisoned(a, *args, **kwargs):
        w, v = real(a, *args, **kwargs)
        if a.dtype == jnp.float32:
            w, v = jnp.full_like(w, jnp.nan), jnp.full_like(v, jnp.nan)
        return w, v

    monkeypatch.setattr(jnp.linalg, "eigh", poisoned)


def _problem():
    import eqx_curv

    model = eqx.nn.MLP(4, 3, 6, 1, jnp.tanh, key=jax.random.key(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (8, 4), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
    return model, eqx_curv.SoftmaxCrossEntropy(), x, y


def _run(opt, steps=3):
    """`steps` steps of `opt` (a fresh jitted function: no trace is reused across
    a monkeypatch); the parameters and infos of each."""
    model, loss, x, y = _problem()
    state = opt.init(model)
    step = eqx.filter_jit(lambda m, s, k: opt.step(m, s, loss, x, y, key=k))
    params, infos = [], []
    for i in range(steps):
        model, state, info = step(model, state, jax.random.key(10 + i))
        params.append(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        infos.append(info)
    return params, infos


def _all_finite(params):
    return all(np.isfinite(p).all() for leaves in params for p in leaves)


@pytest.mark.slow  # two compiled K-FAC steps: ~23 s
def test_kfac_retries_failed_factors_and_is_otherwise_unchanged(monkeypatch):
    import eqx_curv

    make = lambda retry: eqx_curv.KFAC(  # noqa: E731
        damping_method="exact", inverse_every=1, eigh_retry=retry
    )
    # Nothing fails: the eigendecompositions are bitwise those without the
    # option (checked on factors directly: a second compiled step costs more), and
    # the steps report 0 retries.
    from eqx_curv._operators.kfac import eigen

    x = jax.random.normal(jax.random.key(3), (2, 9, 5), jnp.float32)
    left = jnp.einsum("kij,klj->kil", x, x)
    right = left[:, :5, :5]
    assert bool(eqx.tree_equal(eigen(left, right, True), eigen(left, right, False)))
    params, infos = _run(make(True))
    assert all(int(info.stats["eigh_retries"]) == 0 for info in infos)
    assert _all_finite(params)
    _poison_float32_eigh(monkeypatch)
    # Every float32 eigh returns NaN (which without the option skips the steps):
    # both factors of the two layers are recomputed in float64.
    params, infos = _run(make(True))
    assert all(int(info.stats["eigh_retries"]) == 4 for info in infos)
    assert not any(bool(info.skipped) for info in infos) and _all_finite(params)


@pytest.mark.slow  # two compiled SOAP steps: ~11 s
def test_soap_retries_failed_statistics_and_is_otherwise_unchanged(monkeypatch):
    import eqx_curv

    make = lambda retry: eqx_curv.SOAP(  # noqa: E731
        refresh="eigh", refresh_every=1, eigh_retry=retry
    )
    with jax.enable_x64(False):  # the host path, inside SOAP's conditionals
        with_retry, infos = _run(make(True))
        assert all(int(info.stats["eigh_retries"]) == 0 for info in infos)
        without, _ = _run(make(False))
        assert all(
            np.array_equal(a, b)
            for s, t in zip(with_retry, without)
            for a, b in zip(s, t)
        )
        _poison_float32_eigh(monkeypatch)
        # Every float32 eigh returns NaN: the two weight matrices' statistics (one
        # per side) are recomputed in float64.
        params, infos = _run(make(True))
        assert all(int(info.stats["eigh_retries"]) == 4 for info in infos)
        assert not any(bool(info.skipped) for info in infos) and _all_finite(params)
