r"""Losses that know their output-space curvature.

Every loss is the MEAN over the leading (batch) axis of a per-example loss
$\ell(o_i, y_i)$, and knows three things about $\ell$ as a function of the model's
outputs $o_i$:

- the Hessian-vector product of the mean loss, $\frac{1}{N} H_i t_i$ for each example,
    with $H_i = \nabla^2_{o} \ell(o_i, y_i)$ (what the generalised Gauss-Newton needs);
- a square-root factor $S_i$ with $S_i S_i^\top = H_i$ (what exact, "type-2" Fisher
    factors need);
- samples $y \sim p(y \mid o_i)$ from the predictive distribution whose negative
    log-likelihood $\ell$ is (what Monte-Carlo Fisher estimates need).

All three losses use the canonical link of an exponential family, so $H_i$ does not
depend on the targets and equals the Fisher $\mathbb{E}_{y}[\nabla_o \ell \nabla_o
\ell^\top]$: the exact Fisher equals the GGN.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray


def _check_outputs(loss: str, outputs) -> None:
    if not jnp.issubdtype(jnp.result_type(outputs), jnp.floating):
        raise TypeError(
            f"`outputs` of `{loss}` must be floating-point model outputs, but have "
            f"dtype {jnp.result_type(outputs)}."
        )
    if jnp.ndim(outputs) < 1:
        raise ValueError(
            f"`outputs` of `{loss}` must have a leading batch axis, but is a scalar. "
            "Apply the model with `jax.vmap` over the batch."
        )


def _check_same_shape(loss: str, outputs, targets) -> None:
    _check_outputs(loss, outputs)
    if jnp.shape(targets) != jnp.shape(outputs):
        raise ValueError(
            f"`targets` of `{loss}` must have the shape of `outputs` "
            f"{jnp.shape(outputs)}, but have shape {jnp.shape(targets)}. Reshape them "
            "so that each output has one target."
        )
    if not jnp.issubdtype(jnp.result_type(targets), jnp.number) and not (
        jnp.result_type(targets) == jnp.bool_
    ):
        raise TypeError(
            f"`targets` of `{loss}` must be numeric, but have dtype "
            f"{jnp.result_type(targets)}."
        )


def _sum_event(x: Array) -> Array:
    """Sum over every axis but the leading (batch) one."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


class AbstractLoss(eqx.Module):
    r"""A loss $\frac{1}{N}\sum_i \ell(o_i, y_i)$ over a batch of model outputs.

    Subclasses implement `__call__`, `hvp`, `hessian_sqrt` and `sample`; the base class
    derives `symmetric_hessian_sqrt` from `hessian_sqrt`.
    """

    @abc.abstractmethod
    def __call__(self, outputs: Float[Array, "batch ..."], targets: ArrayLike) -> Array:
        """The mean loss over the batch (a scalar)."""

    @abc.abstractmethod
    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        targets: ArrayLike,
        tangents: Float[Array, "batch ..."],
    ) -> Float[Array, "batch ..."]:
        r"""The Hessian of the mean loss with respect to `outputs`, applied to `tangents`.

        The Hessian is block diagonal over the batch: example $i$ gets
        $\frac{1}{N} H_i t_i$.
        """

    @abc.abstractmethod
    def hessian_sqrt(
        self, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch dim dim"]:
        r"""Per-example factors $S_i$ with $S_i S_i^\top = H_i$ (of $\ell$, not the mean).

        The output axes after the batch axis are flattened into one of size `dim`.
        """

    def symmetric_hessian_sqrt(
        self, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch dim dim"]:
        r"""Per-example symmetric square roots $R_i = R_i^\top$ with $R_i^2 = H_i$.

        Built from `hessian_sqrt` as $R_i = V_i \Lambda_i^{1/2} V_i^\top$, where
        $V_i \Lambda_i V_i^\top$ is the eigendecomposition of $S_i S_i^\top = H_i$
        (rounding-negative eigenvalues clipped at zero). It costs one `dim x dim`
        eigendecomposition per example, so prefer `hessian_sqrt` wherever only
        $S_i S_i^\top = H_i$ matters (Fisher factors, K-FAC).
        """
        highest = jax.lax.Precision.HIGHEST
        factors = self.hessian_sqrt(outputs)
        hessians = jnp.matmul(factors, jnp.swapaxes(factors, -1, -2), precision=highest)
        # Symmetrise before eigh: the product is symmetric only up to rounding.
        hessians = 0.5 * (hessians + jnp.swapaxes(hessians, -1, -2))
        values, vectors = jnp.linalg.eigh(hessians)
        roots = jnp.sqrt(jnp.clip(values, 0, None))
        return jnp.matmul(
            vectors * roots[..., None, :],
            jnp.swapaxes(vectors, -1, -2),
            precision=highest,
        )

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]) -> Array:
        """Targets drawn from the predictive distribution at `outputs` (no gradient)."""


class SoftmaxCrossEntropy(AbstractLoss):
    r"""Cross-entropy of softmax probabilities against integer class labels.

    $\ell(o, y) = \log \sum_c e^{o_c} - o_y$ with logits `outputs` of shape
    `[batch, classes]` and integer `targets` of shape `[batch]`. With $p =
    \mathrm{softmax}(o)$, the output Hessian is $H = \mathrm{diag}(p) - p p^\top$.

    `hessian_sqrt` returns $S = \mathrm{diag}(\sqrt p) - p \sqrt{p}^\top$, for which $S
    S^\top = H$ because $\sqrt p$ has unit norm. It is not symmetric: the symmetric root
    of $H$ has no closed form (it needs a $C \times C$ eigendecomposition per example),
    and every use of the factor ($F = J^\top S S^\top J$, K-FAC type-2 factors) needs
    only $S S^\top = H$.
    """

    def _check(self, outputs, targets) -> None:
        _check_outputs("SoftmaxCrossEntropy", outputs)
        if jnp.ndim(outputs) != 2:
            raise ValueError(
                "`outputs` of `SoftmaxCrossEntropy` must be logits of shape "
                f"[batch, classes], but have shape {jnp.shape(outputs)}."
            )
        if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            raise TypeError(
                "`targets` of `SoftmaxCrossEntropy` must be integer class indices, but "
                f"have dtype {jnp.result_type(targets)}. Convert one-hot targets with "
                "`jnp.argmax(targets, axis=-1)`."
            )
        if jnp.shape(targets) != jnp.shape(outputs)[:1]:
            raise ValueError(
                "`targets` of `SoftmaxCrossEntropy` must have shape [batch] = "
                f"{jnp.shape(outputs)[:1]} (one class index per example), but have "
                f"shape {jnp.shape(targets)}."
            )

    def __call__(
        self, outputs: Float[Array, "batch classes"], targets: ArrayLike
    ) -> Float[Array, ""]:
        self._check(outputs, targets)
        logz = jax.nn.logsumexp(outputs, axis=-1)
        picked = jnp.take_along_axis(outputs, jnp.asarray(targets)[:, None], axis=-1)
        return jnp.mean(logz - picked[:, 0])

    def hvp(
        self,
        outputs: Float[Array, "batch classes"],
        targets: ArrayLike,
        tangents: Float[Array, "batch classes"],
    ) -> Float[Array, "batch classes"]:
        self._check(outputs, targets)
        p = jax.nn.softmax(outputs, axis=-1)
        pt = jnp.sum(p * tangents, axis=-1, keepdims=True)
        return p * (tangents - pt) / outputs.shape[0]

    def hessian_sqrt(
        self, outputs: Float[Array, "batch classes"]
    ) -> Float[Array, "batch classes classes"]:
        p = jax.nn.softmax(outputs, axis=-1)
        sqrt_p = jnp.sqrt(p)
        return jax.vmap(jnp.diag)(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch classes"]
    ) -> Int[Array, " batch"]:
        return jax.random.categorical(key, jax.lax.stop_gradient(outputs), axis=-1)


class MeanSquaredError(AbstractLoss):
    r"""Half the squared error, summed over output dimensions: $\ell(o, y) =
    \tfrac12 \lVert o - y \rVert^2$.

    The negative log-likelihood (up to a constant) of a unit-variance Gaussian centred
    on the outputs; $H = I$, and `hessian_sqrt` is the identity.
    """

    def __call__(
        self, outputs: Float[Array, "batch ..."], targets: ArrayLike
    ) -> Float[Array, ""]:
        _check_same_shape("MeanSquaredError", outputs, targets)
        targets = jnp.asarray(targets).astype(outputs.dtype)
        return jnp.mean(0.5 * _sum_event(jnp.square(outputs - targets)))

    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        targets: ArrayLike,
        tangents: Float[Array, "batch ..."],
    ) -> Float[Array, "batch ..."]:
        _check_same_shape("MeanSquaredError", outputs, targets)
        return tangents / outputs.shape[0]

    def hessian_sqrt(
        self, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch dim dim"]:
        _check_outputs("MeanSquaredError", outputs)
        n = outputs.shape[0]
        dim = outputs.size // n
        return jnp.broadcast_to(jnp.eye(dim, dtype=outputs.dtype), (n, dim, dim))

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch ..."]:
        outputs = jax.lax.stop_gradient(outputs)
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


class SigmoidBinaryCrossEntropy(AbstractLoss):
    r"""Binary cross-entropy of sigmoid probabilities, summed over output dimensions.

    $\ell(o, y) = \sum_k \log(1 + e^{o_k}) - y_k o_k$ for logits $o$ and targets $y \in
    [0, 1]$ of the same shape (integer or boolean 0/1 labels are accepted). With $s =
    \sigma(o)$, $H = \mathrm{diag}(s(1-s))$ and `hessian_sqrt` is its (symmetric)
    square root $\mathrm{diag}(\sqrt{s(1-s)})$.
    """

    def __call__(
        self, outputs: Float[Array, "batch ..."], targets: ArrayLike
    ) -> Float[Array, ""]:
        _check_same_shape("SigmoidBinaryCrossEntropy", outputs, targets)
        targets = jnp.asarray(targets).astype(outputs.dtype)
        return jnp.mean(_sum_event(jax.nn.softplus(outputs) - targets * outputs))

    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        targets: ArrayLike,
        tangents: Float[Array, "batch ..."],
    ) -> Float[Array, "batch ..."]:
        _check_same_shape("SigmoidBinaryCrossEntropy", outputs, targets)
        s = jax.nn.sigmoid(outputs)
        return s * (1 - s) * tangents / outputs.shape[0]

    def hessian_sqrt(
        self, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch dim dim"]:
        _check_outputs("SigmoidBinaryCrossEntropy", outputs)
        s = jax.nn.sigmoid(outputs.reshape(outputs.shape[0], -1))
        return jax.vmap(jnp.diag)(jnp.sqrt(s * (1 - s)))

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch ..."]:
        p = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(key, p).astype(outputs.dtype)
