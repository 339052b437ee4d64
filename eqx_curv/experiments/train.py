r"""`eqx-curv train`: every network optimizer on one vision transformer, side by side.

The reference page's protocol: pixels divided by 255, dropout 0.3 on while training,
batches drawn with replacement, training-loss curves smoothed over 100 steps. Every
optimizer starts from the same initial model; rows of the same batch size see the same
batches, dropout masks and random draws (each step's key is `fold_in(key, step)`), so
they differ by the optimizer alone. The batch is 128 for every row and 32 for
`gauss-newton` and `natural-gradient` (`BATCH_SIZES`; their steps cost about 7 Adam
steps at 128), unless `--batch-size` sets every row; each row's batch is in the
results.

The whole step is jitted and the batch is drawn on the device: `lax.scan` runs `--chunk`
steps per call, with no host synchronisation in between. Each chunk's program is
compiled ahead of time, and timed apart (`compile_s`); `wall_s` and `steps_per_s`
count the chunks alone (test-set evaluations and checkpoints are not counted either).
The time at which an optimizer first reaches Adam's final smoothed loss is
interpolated linearly within the chunk where that step falls (chunks are timed whole,
after `block_until_ready`). The target is the same for every row whatever its batch:
a smoothed training loss estimates the expected loss at any batch size (a smaller
batch only makes it noisier); a row at batch 32 sees a quarter of the examples per
step, so its step count is not a count of examples, and its run time is what compares.

With `--devices N` the batch is split over a 1-D mesh of N devices along the axis
`"data"` (the parameters and the data set are replicated) and plain `jax.jit`
partitions the step. Without an accelerator the N devices are forced CPU devices:
the flag sets `XLA_FLAGS` before JAX starts, which is why this module imports JAX only
inside `run`.

Results: `results.json` (schema below), `results.md` (the table, also printed) and
PNG figures in `--out`. After every chunk a checkpoint is written to
`--out/checkpoints/<optimizer>/`; `--resume` continues from it and gives the result
of an uninterrupted run (a row's checkpoint records its batch, and is refused if the
flags now give the row another).

`results.json`:

```
{"schema": "eqx-curv-train/1", "dataset", "model": {...}, "steps",
 "batch_size": int | null (`--batch-size`; null: each row's default), "seed",
 "devices", "chunk", "eval_every", "smoothing": 100,
 "adam_final_loss": float | null,
 "optimizers": {name: {
     "class", "settings": {...}, "batch_size" (this row's), "steps",
     "final_loss" (mean of the last 100 losses), "test_accuracy" (at the end),
     "steps_per_s", "wall_s", "compile_s", "skipped_steps",
     "step_to_adam_loss": int | null, "time_to_adam_loss": float | null,
     "curves": {"loss": [...], "smoothed_loss": [...], "chunk_end_steps": [...],
                "chunk_end_wall_s": [...], "eval_steps": [...],
                "test_accuracy": [...]}}}}
```

Non-finite numbers are written as `null`.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any


OPTIMIZER_NAMES = (
    "sgd",
    "adam",
    "adam-nomomentum",
    "adam-nosqrt",
    "adam-true-fisher",
    "diag-newton",
    "adahessian",
    "gauss-newton",
    "natural-gradient",
    "kfac",
    "shampoo",
    "soap",
    "muon",
)

# name -> (eqx_curv class, keyword arguments). Every learning rate is the best of
# `benchmarks/sweep_defaults.py`'s grid on the digits model (400 steps, each row at its
# default batch; the script's docstring has the tables). On CIFAR-10 some rows take
# another (`DEFAULTS_CIFAR10`).
# `adam` is Adam with momentum, the baseline; the page's forms without momentum are
# rows of their own. `adam-nosqrt` is the page's Adam without the square root (no
# momentum), with FisherAdam's Levenberg-Marquardt damping (the page's diverges).
# `adam-true-fisher` differs from `adam` by the sampled-label Fisher alone.
# `natural-gradient` samples labels (its exact form equals the Gauss-Newton step for
# these losses).
DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"learning_rate": 0.03}),
    "adam": ("FisherAdam", {"learning_rate": 3e-3}),
    "adam-nomomentum": ("FisherAdam", {"learning_rate": 3e-3, "momentum": 0.0}),
    "adam-nosqrt": (
        "FisherAdam",
        {"learning_rate": 1e-3, "exponent": 1.0, "momentum": 0.0},
    ),
    "adam-true-fisher": ("FisherAdam", {"learning_rate": 3e-4, "fisher": "true"}),
    "diag-newton": ("StochasticDiagonalNewton", {"learning_rate": 0.03}),
    "adahessian": ("AdaHessian", {"learning_rate": 0.05}),
    "gauss-newton": ("GaussNewton", {"learning_rate": 0.1}),
    "natural-gradient": ("NaturalGradient", {"learning_rate": 0.3, "fisher": "mc"}),
    "kfac": ("KFAC", {"learning_rate": 1.0}),
    "shampoo": ("Shampoo", {"learning_rate": 3e-3}),
    "soap": ("SOAP", {"learning_rate": 1e-2}),
    "muon": ("Muon", {"learning_rate": 0.02}),
}

# Settings that replace `DEFAULTS`' with `--dataset cifar10`: the best rate of the
# sweep on a 5,000-image CIFAR-10 subset (200 steps) wherever the digits rate ends more
# than 1.5% higher there. Adam: 3e-3 ends 7.5% above 1e-3 on the subset, and 1e-3 more
# than twice as high as 3e-3 on the digits, so no one rate is good on both; Shampoo
# (2.7%; 2.1x on the digits) and SOAP (1.9%; 1.4x) likewise. K-FAC's two rates end
# 0.7% apart on the subset (and 2.5% the other way on the digits), Gauss-Newton's best
# is the same on both, and the natural gradient trained at none of its rates on the
# subset: they keep their digits rates (SGD's and Muon's best are the same on both).
# A later subset sweep of the diagonal rows and Adam's variants moved the diagonal
# Newton method (0.03 ends 14% above 0.01), AdaHessian (0.05: 4.8% above 0.015, the
# page's rate) and Adam without momentum (3e-3: 13% above 3e-4); true-Fisher Adam's
# and Adam-without-the-root's digits rates end within 1.5% of their best and stay.
DEFAULTS_CIFAR10: dict[str, dict[str, Any]] = {
    "adam": {"learning_rate": 1e-3},
    "adam-nomomentum": {"learning_rate": 3e-4},
    "diag-newton": {"learning_rate": 0.01},
    "adahessian": {"learning_rate": 0.015},
    "shampoo": {"learning_rate": 1e-3},
    "soap": {"learning_rate": 3e-3},
}
_DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"cifar10": DEFAULTS_CIFAR10}


def defaults(name: str, dataset: str) -> tuple[str, dict[str, Any]]:
    """The `eqx_curv` class name and keyword arguments of row `name` on `dataset`:
    `DEFAULTS[name]`, updated by the data set's overrides (`DEFAULTS_CIFAR10`)."""
    cls, kwargs = DEFAULTS[name]
    return cls, {**kwargs, **_DATASET_DEFAULTS.get(dataset, {}).get(name, {})}


# The batch of each row when `--batch-size` is not given (an explicit `--batch-size N`
# sets every row):
#
# | optimizer                          | batch |
# | ---------------------------------- | ----- |
# | gauss-newton, natural-gradient     | 32    |
# | every other row                    | 128   |
#
# A Gauss-Newton or natural-gradient step solves with 10 CG products on the GGN or the
# Fisher; at batch 128 it costs about 7 Adam steps on the page's TinyViT (a CPU). The
# reference page ran Gauss-Newton at batch 32, as these rows do: a step sees a quarter
# of the examples of the other rows', so compare them by run time as well as by step.
DEFAULT_BATCH_SIZE = 128
BATCH_SIZES: dict[str, int] = {"gauss-newton": 32, "natural-gradient": 32}


def batch_size(name: str, flag: int | None) -> int:
    """The batch of row `name`: `flag` (`--batch-size`) when given, else the row's
    default from `BATCH_SIZES` (`DEFAULT_BATCH_SIZE` for the rows not listed)."""
    if flag is not None:
        return flag
    return BATCH_SIZES.get(name, DEFAULT_BATCH_SIZE)


# TinyViT configurations: "page" is the reference page's CIFAR-10 model; "small" is
# the digits default (8x8 images: 2x2 patches, 16 tokens and a class token); "tiny"
# is for tests.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"features": 8, "patch_size": 4, "depth": 1, "num_heads": 1},
    "small": {"features": 32, "patch_size": 2, "depth": 2, "num_heads": 2},
    "page": {"features": 128, "patch_size": 8, "depth": 4, "num_heads": 4},
}
DEFAULT_SIZE = {"digits": "small", "cifar10": "page"}
SMOOTHING = 100
SCHEMA = "eqx-curv-train/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--optimizers",
        default="all",
        help="comma-separated names, or 'all' (default): " + ", ".join(OPTIMIZER_NAMES),
    )
    add("--steps", type=int, default=500, help="training steps per optimizer")
    add(
        "--batch-size",
        type=int,
        default=None,
        help="examples per step for every optimizer (default: 128, and 32 for "
        "gauss-newton and natural-gradient)",
    )
    add("--dataset", choices=("digits", "cifar10"), default="digits")
    add("--data-dir", default=None, help="where CIFAR-10 is (or is downloaded to)")
    add("--model-size", choices=tuple(MODEL_SIZES), default=None,
        help="TinyViT size (default: small for digits, page for cifar10)")  # fmt: skip
    add("--out", default="train-results", help="folder for results and figures")
    add("--seed", type=int, default=0)
    add("--resume", action="store_true", help="continue from --out's checkpoints")
    add(
        "--eval-every",
        type=int,
        default=250,
        help="test accuracy every this many steps",
    )
    add("--chunk", type=int, default=50, help="steps per jitted lax.scan call")
    add("--devices", type=int, default=1, help="split each batch over N devices")
    add("--no-progress", action="store_true", help="hide the progress bars")


def _optimizer_names(spec: str) -> list[str]:
    if spec.strip() == "all":
        return list(OPTIMIZER_NAMES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZER_NAMES]
    if unknown or not names:
        raise ValueError(
            f"`--optimizers` has unknown name(s) {', '.join(unknown) or '(none)'}: pass "
            f"'all' or a comma-separated list of {', '.join(OPTIMIZER_NAMES)}."
        )
    return list(dict.fromkeys(names))


def _check_arguments(args: argparse.Namespace) -> list[str]:
    names = _optimizer_names(args.optimizers)
    for flag in ("steps", "batch_size", "eval_every", "chunk", "devices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(
                f"`--{flag.replace('_', '-')}` must be a positive integer, got {value}."
            )
    if args.batch_size is not None and args.batch_size % args.devices:
        raise ValueError(
            f"`--batch-size` {args.batch_size} is not divisible by `--devices` "
            f"{args.devices}: each device takes an equal share of the batch. Pass a "
            f"batch size that is a multiple of {args.devices}."
        )
    for name in names:
        batch = batch_size(name, args.batch_size)
        if batch % args.devices:
            raise ValueError(
                f"The default batch of {name} ({batch}) is not divisible by "
                f"`--devices` {args.devices}: each device takes an equal share of the "
                f"batch. Pass `--batch-size` a multiple of {args.devices}."
            )
    return names


def _force_devices(count: int) -> None:
    """Ask for `count` host devices; takes effect only before JAX's backend starts."""
    if count > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flag = f"--xla_force_host_platform_device_count={count}"
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def run(args: argparse.Namespace) -> int:
    try:
        names = _check_arguments(args)
    except ValueError as error:
        print(f"eqx-curv train: error: {error}", file=sys.stderr)
        return 2
    _force_devices(args.devices)
    # jaxlib's CPU eigendecompositions, inverses and QRs (K-FAC's inverses, Shampoo's
    # and SOAP's refreshes) go through OpenBLAS, whose threads would fight XLA's for
    # the cores; it reads this when it loads, with NumPy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from . import study  # imports JAX, after the device flag is set

    try:
        results = study.run_study(names, args)
    except study.SettingsError as error:
        print(f"eqx-curv train: error: {error}", file=sys.stderr)
        return 2
    from .plots import write_figures, write_table

    out = Path(args.out)
    table = write_table(results, out / "results.md")
    write_figures(results, out)
    print(table)
    return 0
