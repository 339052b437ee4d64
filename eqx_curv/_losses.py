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

All three built-in losses use the canonical link of an exponential family, so $H_i$
does not depend on the targets (`hessian_depends_on_targets = False`) and equals the
Fisher $\mathbb{E}_{y}[\nabla_o \ell \nabla_o \ell^\top]$: the exact Fisher equals the
GGN.
"""

import abc
from typing import ClassVar, TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._misc import HIGHEST, known_values


# As optimistix does: type checkers see a ClassVar, which a subclass's ClassVar may
# override; at run time Equinox checks that a final class sets it.
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


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


def _check_tangents(loss: str, outputs, tangents) -> None:
    if jnp.shape(tangents) != jnp.shape(outputs):
        raise ValueError(
            f"`tangents` of `{loss}.hvp` must have the shape of `outputs` "
            f"{jnp.shape(outputs)}, but have shape {jnp.shape(tangents)}. Pass one "
            "tangent per output, in the same layout."
        )


def _check_same_shape(loss: str, outputs, targets) -> None:
    _check_outputs(loss, outputs)
    if targets is None:
        return
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

    To write your own loss, subclass `AbstractLoss` and give it:

    - `hessian_depends_on_targets: ClassVar[bool]`: whether
        $H_i = \nabla^2_o \ell(o_i, y_i)$ depends on $y_i$. `False` for the negative
        log-likelihood of an exponential family with its canonical link (softmax
        cross-entropy, squared error, logistic, Poisson with log link); `True` for,
        e.g., a log-cosh or Huber regression loss. Operators such as
        [`eqx_curv.GGNOperator`][] need targets only where it is `True`.
    - `__call__(outputs, targets)`: the MEAN of $\ell$ over the leading batch axis of
        `outputs` (shape `[batch, ...]`), a scalar of the dtype of `outputs`.
    - `hvp(outputs, tangents, *, targets=None)`: the Hessian of that mean with
        respect to `outputs`, applied to `tangents` (shape of `outputs`): example $i$
        gets $\frac1N H_i t_i$ (mind the $\frac1N$). Where
        `hessian_depends_on_targets` is `True` and `targets` is `None`, raise a
        `ValueError` that says the targets are needed.
    - `hessian_sqrt(outputs, *, targets=None)`: per-example factors $S_i$ of shape
        `[batch, dim, dim]`, `dim` the number of outputs per example (the axes after
        the batch axis flattened in row-major order), with $S_i S_i^\top = H_i$ for
        the per-example loss (no $\frac1N$).
    - `sample(key, outputs)`: targets drawn from the model's predictive distribution
        at `outputs`, one per example, in the layout `__call__` takes; no gradient
        flows through them.
    - `num_positions(outputs)`: how many positions $T$ the per-example loss is the
        MEAN over, as a Python int: $\ell_i = \frac1T \sum_t -\log p(y_{it} \mid
        o_{it})$. 1 for a loss that sums its per-example terms (the usual case);
        the number of tokens for a per-token loss. The Monte-Carlo Fisher needs it:
        $\mathbb{E}[\nabla \ell_i \nabla \ell_i^\top] = H_i / T$ there, since the
        $T$ terms' gradients are independent with mean zero, so it scales the sampled
        outer products by $T$ to estimate $H_i$.

    Check a new loss against `jax.hessian(lambda o: loss(o, y))(o)`: it is block
    diagonal over the batch, with block $i$ equal to $\frac1N H_i$. The page
    "Losses" of the documentation works through an example.

    The base class derives `symmetric_hessian_sqrt` from `hessian_sqrt`.
    """

    hessian_depends_on_targets: AbstractClassVar[bool]

    @abc.abstractmethod
    def __call__(self, outputs: Float[Array, "batch ..."], targets: ArrayLike) -> Array:
        """The mean loss over the batch (a scalar)."""

    @abc.abstractmethod
    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        tangents: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch ..."]:
        r"""The Hessian of the mean loss with respect to `outputs`, applied to `tangents`.

        The Hessian is block diagonal over the batch: example $i$ gets
        $\frac{1}{N} H_i t_i$.

        **Arguments:**

        - `outputs`: the model's outputs on the batch, `[batch, ...]`.
        - `tangents`: the vectors to multiply, with the shape of `outputs`.
        - `targets`: the batch's targets. Needed only where
            `hessian_depends_on_targets` is `True`; otherwise they are only checked
            against `outputs` when given.

        **Returns:**

        An array with the shape and dtype of `outputs`.
        """

    @abc.abstractmethod
    def hessian_sqrt(
        self,
        outputs: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch dim dim"]:
        r"""Per-example factors $S_i$ with $S_i S_i^\top = H_i$ (of $\ell$, not the mean).

        The output axes after the batch axis are flattened (row-major) into one of
        size `dim`. `targets` as in `hvp`.
        """

    def symmetric_hessian_sqrt(
        self,
        outputs: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch dim dim"]:
        r"""Per-example symmetric square roots $R_i = R_i^\top$ with $R_i^2 = H_i$.

        Built from `hessian_sqrt` as $R_i = V_i \Lambda_i^{1/2} V_i^\top$, where
        $V_i \Lambda_i V_i^\top$ is the eigendecomposition of $S_i S_i^\top = H_i$
        (rounding-negative eigenvalues clipped at zero). It costs one `dim x dim`
        eigendecomposition per example, so prefer `hessian_sqrt` wherever only
        $S_i S_i^\top = H_i$ matters (Fisher factors, K-FAC). `targets` as in `hvp`.
        """
        factors = self.hessian_sqrt(outputs, targets=targets)
        hessians = jnp.matmul(factors, jnp.swapaxes(factors, -1, -2), precision=HIGHEST)
        # Symmetrise before eigh: the product is symmetric only up to rounding.
        hessians = 0.5 * (hessians + jnp.swapaxes(hessians, -1, -2))
        values, vectors = jnp.linalg.eigh(hessians)
        roots = jnp.sqrt(jnp.clip(values, 0, None))
        return jnp.matmul(
            vectors * roots[..., None, :],
            jnp.swapaxes(vectors, -1, -2),
            precision=HIGHEST,
        )

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]) -> Array:
        """Targets drawn from the predictive distribution at `outputs` (no gradient)."""

    @abc.abstractmethod
    def num_positions(self, outputs: Float[Array, "batch ..."]) -> int:
        """How many positions the per-example loss is the mean over (1 if none)."""


_NAME = "SoftmaxCrossEntropy"


def _check_labels(labels, classes: int) -> None:
    """Concrete integer labels must lie in [0, classes); traced ones are not seen."""
    values = known_values(labels)
    if values is None or values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"`targets` of `{_NAME}` must be class indices in [0, {classes}) (the last "
            f"axis of `outputs` has {classes} classes), but range from {low} to "
            f"{high}. Give every example a class in that range (a padding or 'ignore' "
            "label such as -1 is not supported: drop those examples), or give the "
            "model enough outputs."
        )


def _check_probabilities(probabilities, dtype) -> None:
    """Concrete probability targets must sum to 1 over the class axis."""
    values = known_values(probabilities)
    if values is None or values.size == 0:
        return
    sums = values.sum(axis=-1)
    tol = float(np.sqrt(max(jnp.finfo(values.dtype).eps, jnp.finfo(dtype).eps)))
    if not np.all(np.abs(sums - 1) <= tol):
        raise ValueError(
            f"`targets` of `{_NAME}` given as probabilities must sum to 1 over the "
            f"class (last) axis, which the output Hessian diag(p) - p p^T assumes, but "
            f"their sums range from {sums.min()} to {sums.max()}. Normalise them with "
            "`targets / targets.sum(axis=-1, keepdims=True)`."
        )


class SoftmaxCrossEntropy(AbstractLoss):
    r"""Cross-entropy of softmax probabilities, for classification and sequences.

    With logits $o$ (the last axis of `outputs`, $C$ classes) and $p =
    \mathrm{softmax}(o)$, the loss at one position is $\log \sum_c e^{o_c} - o_y$ for
    an integer label $y$, or $-\sum_c y_c \log p_c$ for a probability vector $y$
    (one-hot, label-smoothed, or a teacher's soft labels).

    **Shapes.** `outputs` is `[batch, classes]`, or `[batch, *tokens, classes]` with
    any number of token axes (sequence models: one prediction per token). `targets`
    are integer labels `[batch, *tokens]`, or floating-point probabilities of the
    shape of `outputs`. The per-example loss is the MEAN over the $T$ token
    positions, and the result is the mean over examples (so the mean over every
    position of the batch).

    **Curvature.** Each position's output Hessian is $\mathrm{diag}(p) - p p^\top$;
    the per-example Hessian $H_i$ is block diagonal over tokens with these blocks
    divided by $T$. Probability targets are assumed to sum to 1 over the classes
    (for a general $y$ the Hessian is $(\sum_c y_c)(\mathrm{diag}(p) - p p^\top)$):
    targets known at trace time are checked, traced ones are not. The Hessian does
    not depend on the targets otherwise, so `hvp` and `hessian_sqrt` need none.

    `hessian_sqrt` returns, per position, $S = \mathrm{diag}(\sqrt p) - p \sqrt{p}^\top$
    (times $1/\sqrt T$), for which $S S^\top = \mathrm{diag}(p) - pp^\top$ because
    $\sqrt p$ has unit norm; with tokens, the per-example factor is the block-diagonal
    `[T*C, T*C]` matrix of these (dense, so for small $T C$). $S$ is not symmetric:
    the symmetric root has no closed form (it needs a $C \times C$ eigendecomposition,
    see `symmetric_hessian_sqrt`), and every use of the factor ($F = J^\top S S^\top
    J$, K-FAC type-2 factors) needs only $S S^\top = H$.

    **Labels out of range.** Integer labels outside $[0, C)$ known at trace time
    (NumPy arrays, jax arrays outside `jax.jit`) raise a `ValueError`. Traced ones
    cannot be checked: their examples get a NaN loss and a NaN gradient, so a
    non-finite guard (an optimizer's skipped step) sees them. (A bare
    `jnp.take_along_axis` would read -1 as the last class, and give a label $\geq C$
    a NaN loss but a zero gradient.)

    `sample` draws integer labels `[batch, *tokens]`, one per position.
    """

    hessian_depends_on_targets: ClassVar[bool] = False

    def _check(self, outputs, targets) -> None:
        _check_outputs(_NAME, outputs)
        if jnp.ndim(outputs) < 2:
            raise ValueError(
                f"`outputs` of `{_NAME}` must be logits of shape [batch, classes] or "
                f"[batch, *tokens, classes], but have shape {jnp.shape(outputs)}."
            )
        if targets is None:
            return
        dtype, shape = jnp.result_type(targets), jnp.shape(targets)
        label_shape = jnp.shape(outputs)[:-1]
        if jnp.issubdtype(dtype, jnp.integer):
            if shape != label_shape:
                raise ValueError(
                    f"Integer `targets` of `{_NAME}` must have shape [batch, *tokens] "
                    f"= {label_shape} (one class index per position of `outputs` "
                    f"{jnp.shape(outputs)}), but have shape {shape}. Probabilities "
                    "(one-hot or soft) go as floats of the shape of `outputs`."
                )
            _check_labels(targets, jnp.shape(outputs)[-1])
        elif jnp.issubdtype(dtype, jnp.floating):
            if shape == label_shape:
                raise TypeError(
                    f"`targets` of `{_NAME}` of shape {shape} must be integer class "
                    f"indices, but have dtype {dtype}. Convert them with "
                    "`targets.astype(jnp.int32)`, or give probabilities of the shape "
                    f"of `outputs` {jnp.shape(outputs)}."
                )
            if shape != jnp.shape(outputs):
                raise ValueError(
                    f"Floating-point `targets` of `{_NAME}` are class probabilities "
                    f"and must have the shape of `outputs` {jnp.shape(outputs)}, but "
                    f"have shape {shape}. Give integer class indices of shape "
                    f"{label_shape} instead, or reshape the probabilities."
                )
            _check_probabilities(targets, jnp.result_type(outputs))
        else:
            raise TypeError(
                f"`targets` of `{_NAME}` must be integer class indices or "
                f"floating-point probabilities, but have dtype {dtype}. Cast one-hot "
                "boolean targets with `targets.astype(outputs.dtype)`."
            )

    def __call__(
        self, outputs: Float[Array, "batch *tokens classes"], targets: ArrayLike
    ) -> Float[Array, ""]:
        self._check(outputs, targets)
        targets = jnp.asarray(targets)
        log_p = jax.nn.log_softmax(outputs, axis=-1)
        if jnp.issubdtype(targets.dtype, jnp.floating):
            per_position = -jnp.sum(targets.astype(outputs.dtype) * log_p, axis=-1)
        else:
            classes = outputs.shape[-1]
            # "clip" only keeps the gather in bounds; the factor below is what marks
            # a bad label. Multiplying by NaN makes both the loss and its gradient
            # (NaN * (p - e_y)) non-finite for that position; valid ones get * 1.
            picked = jnp.take_along_axis(
                log_p, targets[..., None], axis=-1, mode="clip"
            )[..., 0]
            valid = (targets >= 0) & (targets < classes)
            one = jnp.ones((), outputs.dtype)
            marker = jnp.where(valid, one, jnp.full((), jnp.nan, outputs.dtype))
            per_position = -picked * marker
        return jnp.mean(per_position)

    def hvp(
        self,
        outputs: Float[Array, "batch *tokens classes"],
        tangents: Float[Array, "batch *tokens classes"],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch *tokens classes"]:
        self._check(outputs, targets)
        _check_tangents(_NAME, outputs, tangents)
        p = jax.nn.softmax(outputs, axis=-1)
        pt = jnp.sum(p * tangents, axis=-1, keepdims=True)
        # 1/N for the batch mean and 1/T for the token mean: one over all positions.
        positions = outputs.size // outputs.shape[-1]
        return p * (tangents - pt) / positions

    def hessian_sqrt(
        self,
        outputs: Float[Array, "batch *tokens classes"],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch dim dim"]:
        self._check(outputs, targets)
        n, classes = outputs.shape[0], outputs.shape[-1]
        p = jax.nn.softmax(outputs, axis=-1).reshape(n, -1, classes)  # [N, T, C]
        tokens = p.shape[1]
        sqrt_p = jnp.sqrt(p)
        eye = jnp.eye(classes, dtype=outputs.dtype)[None, None]
        blocks = sqrt_p[..., :, None] * eye - p[..., :, None] * sqrt_p[..., None, :]
        if tokens == 1:
            return blocks[:, 0]
        # Block diagonal over tokens, each block scaled by 1/sqrt(T) (the token mean),
        # built by broadcasting (exact) rather than a matmul with an identity.
        blocks = blocks / float(np.sqrt(tokens))
        token_eye = jnp.eye(tokens, dtype=outputs.dtype)[None, :, None, :, None]
        full = token_eye * blocks[:, :, :, None, :]  # [N, T, C, T, C]
        return full.reshape(n, tokens * classes, tokens * classes)

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch *tokens classes"]
    ) -> Int[Array, " batch *tokens"]:
        return jax.random.categorical(key, jax.lax.stop_gradient(outputs), axis=-1)

    def num_positions(self, outputs: Float[Array, "batch *tokens classes"]) -> int:
        # The mean over every token axis.
        return int(np.prod(jnp.shape(outputs)[1:-1], dtype=int))


class MeanSquaredError(AbstractLoss):
    r"""Half the squared error, summed over output dimensions: $\ell(o, y) =
    \tfrac12 \lVert o - y \rVert^2$.

    The negative log-likelihood (up to a constant) of a unit-variance Gaussian centred
    on the outputs; $H = I$, and `hessian_sqrt` is the identity. `targets` have the
    shape of `outputs`.
    """

    hessian_depends_on_targets: ClassVar[bool] = False

    def __call__(
        self, outputs: Float[Array, "batch ..."], targets: ArrayLike
    ) -> Float[Array, ""]:
        _check_same_shape("MeanSquaredError", outputs, targets)
        targets = jnp.asarray(targets).astype(outputs.dtype)
        return jnp.mean(0.5 * _sum_event(jnp.square(outputs - targets)))

    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        tangents: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch ..."]:
        _check_same_shape("MeanSquaredError", outputs, targets)
        _check_tangents("MeanSquaredError", outputs, tangents)
        return tangents / outputs.shape[0]

    def hessian_sqrt(
        self,
        outputs: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch dim dim"]:
        _check_same_shape("MeanSquaredError", outputs, targets)
        n = outputs.shape[0]
        dim = outputs.size // n
        return jnp.broadcast_to(jnp.eye(dim, dtype=outputs.dtype), (n, dim, dim))

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch ..."]:
        outputs = jax.lax.stop_gradient(outputs)
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)

    def num_positions(self, outputs: Float[Array, "batch ..."]) -> int:
        return 1  # summed over output dimensions, not averaged


class SigmoidBinaryCrossEntropy(AbstractLoss):
    r"""Binary cross-entropy of sigmoid probabilities, summed over output dimensions.

    $\ell(o, y) = \sum_k \log(1 + e^{o_k}) - y_k o_k$ for logits $o$ and targets $y \in
    [0, 1]$ of the same shape (integer or boolean 0/1 labels are accepted). With $s =
    \sigma(o)$, $H = \mathrm{diag}(s(1-s))$ and `hessian_sqrt` is its (symmetric)
    square root $\mathrm{diag}(\sqrt{s(1-s)})$.
    """

    hessian_depends_on_targets: ClassVar[bool] = False

    def __call__(
        self, outputs: Float[Array, "batch ..."], targets: ArrayLike
    ) -> Float[Array, ""]:
        _check_same_shape("SigmoidBinaryCrossEntropy", outputs, targets)
        targets = jnp.asarray(targets).astype(outputs.dtype)
        return jnp.mean(_sum_event(jax.nn.softplus(outputs) - targets * outputs))

    def hvp(
        self,
        outputs: Float[Array, "batch ..."],
        tangents: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch ..."]:
        _check_same_shape("SigmoidBinaryCrossEntropy", outputs, targets)
        _check_tangents("SigmoidBinaryCrossEntropy", outputs, tangents)
        s = jax.nn.sigmoid(outputs)
        return s * (1 - s) * tangents / outputs.shape[0]

    def hessian_sqrt(
        self,
        outputs: Float[Array, "batch ..."],
        *,
        targets: ArrayLike | None = None,
    ) -> Float[Array, "batch dim dim"]:
        _check_same_shape("SigmoidBinaryCrossEntropy", outputs, targets)
        s = jax.nn.sigmoid(outputs.reshape(outputs.shape[0], -1))
        return jax.vmap(jnp.diag)(jnp.sqrt(s * (1 - s)))

    def sample(
        self, key: PRNGKeyArray, outputs: Float[Array, "batch ..."]
    ) -> Float[Array, "batch ..."]:
        p = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(key, p).astype(outputs.dtype)

    def num_positions(self, outputs: Float[Array, "batch ..."]) -> int:
        return 1  # summed over output dimensions, not averaged
