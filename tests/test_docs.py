"""The docs' code blocks run.

Every ```python block of README.md and docs/*.md runs, in order, one namespace per page.
Snippets may use the names a reader would have at hand, which the namespace provides:
the usual imports (`jax`, `jnp`, `np`, `eqx`, `lx`, `optx`, `eqx_curv`), `model` (a small tanh MLP, 8 inputs and 10 classes, float64), `x` and `y` (a batch of
16 examples and integer labels), `loss` (`SoftmaxCrossEntropy()`), `grads` (the gradient
of the mean loss at `model`, a parameter PyTree), `operator` (the damped GGN there),
`rhs` (= `grads`), `diag` (the operator's exact diagonal) and `previous` (a zero
initial guess). A page's own definitions replace them.
"""

import pathlib
import re

import pytest


_ROOT = pathlib.Path(__file__).resolve().parent.parent
_PAGES = [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("**/*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _namespace():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np
    import optimistix as optx

    import eqx_curv

    mkey, xkey, ykey = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(8, 10, 6, 1, activation=jnp.tanh, key=mkey)
    x = jax.random.normal(xkey, (16, 8))
    y = jax.random.randint(ykey, (16,), 0, 10)
    loss = eqx_curv.SoftmaxCrossEntropy()
    grads = eqx.filter(
        eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(model),
        eqx.is_inexact_array,
    )
    operator = eqx_curv.DampedOperator(eqx_curv.GGNOperator(model, loss, x, y), 1e-3)
    diag = eqx_curv.exact_diagonal(operator)
    previous = jax.tree.map(jnp.zeros_like, grads)
    return dict(
        jax=jax,
        jnp=jnp,
        np=np,
        eqx=eqx,
        lx=lx,
        optx=optx,
        eqx_curv=eqx_curv,
        model=model,
        x=x,
        y=y,
        loss=loss,
        grads=grads,
        operator=operator,
        rhs=grads,
        diag=diag,
        previous=previous,
    )


def _blocks(page):
    return _BLOCK.findall(page.read_text())


@pytest.mark.parametrize(
    "page",
    [p for p in _PAGES if _blocks(p)],
    ids=lambda p: str(p.relative_to(_ROOT)),
)
def test_code_blocks_run(page):
    import jax

    namespace = _namespace()
    # Pages are written for users, who run with JAX's default promotion rules.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for number, block in enumerate(_blocks(page), start=1):
            try:
                exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"{page.relative_to(_ROOT)}, code block {number} fails:\n{block}"
                ) from error


def test_every_page_with_code_is_collected():
    # The pattern finds the blocks of a page known to have them (guards the regex).
    assert _blocks(_ROOT / "docs" / "classical.md")
