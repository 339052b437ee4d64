"""The training loop of `eqx-curv train`: jitted `lax.scan` chunks, checkpoints, results.

Imported by `train.run` only after the device flag is set (this module imports JAX).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import eqx_curv

from .data import load_dataset
from .tinyvit import TinyViT
from .train import (
    batch_size,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SIZE,
    defaults,
    MODEL_SIZES,
    SCHEMA,
    SMOOTHING,
)


class SettingsError(ValueError):
    """A flag that cannot be honoured (reported as a sentence by the CLI)."""


class Problem(NamedTuple):
    """What every optimizer's run shares: model, data, loss, key and device layout."""

    params: Any  # the initial model's arrays
    static: Any  # the rest of the model
    train: tuple[jax.Array, jax.Array]  # uint8 images [N, H, W, C], int32 labels
    test: tuple[jax.Array, jax.Array, jax.Array]  # batched test images, labels, mask
    key: jax.Array
    mesh: Mesh | None
    settings: dict  # what a checkpoint must agree with
    accuracy: Any  # jitted `accuracy(params, test)`


def make_optimizer(
    name: str, dataset: str, **changes
) -> eqx_curv.AbstractNetworkOptimizer:
    """The optimizer `name` of `eqx-curv train` with its default settings on `dataset`
    (`train.defaults`), updated by `changes` (e.g. a traced `learning_rate`)."""
    cls, kwargs = defaults(name, dataset)
    return getattr(eqx_curv, cls)(**{**kwargs, **changes})


def smoothed(losses: np.ndarray, window: int = SMOOTHING) -> np.ndarray:
    """Trailing moving average over `window` steps (fewer at the start)."""
    losses = np.asarray(losses, np.float64)
    total = np.concatenate([[0.0], np.cumsum(losses)])
    ends = np.arange(1, len(losses) + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def _replicated(mesh: Mesh | None, tree):
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _batched_test(images: np.ndarray, labels: np.ndarray, batch: int = 500):
    """The test set as `[batches, batch, ...]` with a mask over the padding."""
    count = len(labels)
    batches = max(1, math.ceil(count / batch))
    pad = batches * batch - count
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    mask = np.arange(batches * batch) < count
    return (
        images.reshape(batches, batch, *images.shape[1:]),
        labels.reshape(batches, batch),
        mask.reshape(batches, batch),
    )


def make_problem(args: argparse.Namespace) -> Problem:
    if jax.device_count() < args.devices:
        raise SettingsError(
            f"`--devices {args.devices}` asks for {args.devices} devices but JAX sees "
            f"{jax.device_count()}. Forced CPU devices must be requested before JAX "
            "starts its backend: run `eqx-curv train --devices N` in a fresh process "
            "(or set XLA_FLAGS=--xla_force_host_platform_device_count=N)."
        )
    data = load_dataset(args.dataset, args.data_dir)
    size_name = args.model_size or DEFAULT_SIZE[args.dataset]
    size = MODEL_SIZES[size_name]
    height, width, channels = data.train_images.shape[1:]
    if height != width or height % size["patch_size"]:
        raise SettingsError(
            f"`--model-size {size_name}` has patches of side {size['patch_size']}, "
            f"which do not tile {args.dataset}'s {height}x{width} images: pick another "
            "model size."
        )
    # The run's key (batches, dropout, the optimizers' own draws) is an RBG key:
    # XLA's random-bit generator compiles to one operation where threefry unrolls
    # its rounds at every draw, which halved the compile time of a step on CPU.
    run_key = jax.random.key(args.seed, impl="rbg")
    model = TinyViT(
        jax.random.key(args.seed),
        num_classes=len(data.classes),
        channels=channels,
        dropout=0.3,
        dtype=jnp.float32,
        **size,
    )
    params, static = eqx.partition(model, eqx.is_array)
    mesh = None
    if args.devices > 1:
        mesh = Mesh(np.array(jax.devices()[: args.devices]), ("data",))
    train = (
        np.asarray(data.train_images, np.uint8),
        np.asarray(data.train_labels, np.int32),
    )
    test = _batched_test(
        np.asarray(data.test_images, np.uint8), np.asarray(data.test_labels, np.int32)
    )
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    # Each row's batch is added to these by `train_optimizer`.
    settings = {
        "dataset": data.name,
        "model": {
            "name": "TinyViT",
            "size": size_name,
            **size,
            "dropout": 0.3,
            "parameters": int(num_params),
        },  # fmt: skip
        "seed": args.seed,
        "devices": args.devices,
        "chunk": args.chunk,
        "eval_every": args.eval_every,
        "train_examples": len(train[1]),
        "test_examples": len(data.test_labels),
    }
    return Problem(
        _replicated(mesh, params),
        static,
        _replicated(mesh, train),
        _replicated(mesh, test),
        run_key,
        mesh,
        settings,
        _accuracy_program(static),
    )


def _programs(cls: str, kwargs: dict, state_static, problem: Problem, batch: int):
    """`run_chunk(params, state_arrays, data, key, start, learning_rate, length)` for
    the optimizer `eqx_curv.<cls>(**kwargs)`; `state_static` completes its state.

    The learning rate is an argument of the program (the optimizers' hyperparameters
    are PyTree leaves), so that a sweep over it compiles once."""
    loss = eqx_curv.SoftmaxCrossEntropy()
    static = problem.static
    batch_sharding = None
    if problem.mesh is not None:
        batch_sharding = NamedSharding(problem.mesh, PartitionSpec("data"))

    def run_chunk(params, state_arrays, data, key, start, learning_rate, length):
        images, labels = data
        opt = getattr(eqx_curv, cls)(**{**kwargs, "learning_rate": learning_rate})

        def body(carry, step):
            params, arrays = carry
            batch_key, step_key = jax.random.split(jax.random.fold_in(key, step))
            index = jax.random.randint(batch_key, (batch,), 0, labels.shape[0])
            x = jnp.take(images, index, axis=0).astype(jnp.float32) / 255
            y = jnp.take(labels, index, axis=0)
            if batch_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, batch_sharding)
                y = jax.lax.with_sharding_constraint(y, batch_sharding)
            model = eqx.combine(params, static)
            opt_state = eqx.combine(arrays, state_static)
            model, opt_state, info = opt.step(
                model, opt_state, loss, x, y, key=step_key
            )
            carry = (
                eqx.filter(model, eqx.is_array),
                eqx.filter(opt_state, eqx.is_array),
            )
            return carry, (info.loss.astype(jnp.float32), info.skipped)

        steps = start + jnp.arange(length, dtype=jnp.int32)
        (params, state_arrays), (losses, skipped) = jax.lax.scan(
            body, (params, state_arrays), steps
        )
        return params, state_arrays, losses, skipped

    if problem.mesh is None:
        return jax.jit(run_chunk, static_argnums=(6,))
    same = NamedSharding(problem.mesh, PartitionSpec())
    return jax.jit(run_chunk, static_argnums=(6,), out_shardings=same)


def _accuracy_program(static):
    """`accuracy(params, test)` on the batched test set, without dropout (one
    program for every optimizer: they share the model's structure)."""

    def accuracy(params, test):
        images, labels, mask = test
        model = eqx.combine(params, static)

        def one(correct, batch):
            x, y, m = batch
            logits = jax.vmap(model)(x.astype(jnp.float32) / 255)
            hits = (jnp.argmax(logits, axis=-1).astype(y.dtype) == y) & m
            return correct + jnp.sum(hits, dtype=jnp.int32), None

        zero = jnp.zeros((), jnp.int32)
        correct, _ = jax.lax.scan(one, zero, (images, labels, mask))
        return correct.astype(jnp.float32) / jnp.sum(mask, dtype=jnp.float32)

    return jax.jit(accuracy)


def _save(directory: Path, arrays, progress: dict) -> None:
    """The checkpoint: arrays first, then the progress that names their step."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "checkpoint.eqx.tmp"
    eqx.tree_serialise_leaves(tmp, arrays)
    os.replace(tmp, directory / "checkpoint.eqx")
    tmp = directory / "progress.json"
    (directory / "progress.json.tmp").write_text(json.dumps(progress))
    os.replace(directory / "progress.json.tmp", tmp)


def _load(directory: Path, like, settings: dict, steps: int):
    progress = json.loads((directory / "progress.json").read_text())
    if progress["settings"] != settings:
        differ = sorted(
            k
            for k in set(settings) | set(progress["settings"])
            if settings.get(k) != progress["settings"].get(k)
        )
        raise SettingsError(
            f"`--resume`: the checkpoint in {directory} was made with other settings "
            f"({', '.join(differ)} differ). Resume with the same flags, or pass "
            "another `--out`."
        )
    if progress["step"] > steps:
        raise SettingsError(
            f"`--resume`: the checkpoint in {directory} is at step {progress['step']}, "
            f"beyond `--steps {steps}`. Pass `--steps {progress['step']}` or more."
        )
    arrays = eqx.tree_deserialise_leaves(directory / "checkpoint.eqx", like)
    return arrays, progress


def train_optimizer(
    name: str,
    problem: Problem,
    args: argparse.Namespace,
    *,
    learning_rate: float | None = None,
    checkpoint: bool = True,
    cache: dict | None = None,
) -> dict:
    """Train a copy of the initial model with optimizer `name`; its result record.

    The batch is the row's (`train.batch_size`). `learning_rate` replaces the default
    one; `cache` (a dict kept by the caller)
    shares compiled chunks between calls for the same optimizer and flags, as a sweep
    over learning rates does. Checkpoints are written after every chunk unless
    `checkpoint` is false.
    """
    cls, kwargs = defaults(name, args.dataset)
    if learning_rate is not None:
        kwargs = {**kwargs, "learning_rate": learning_rate}
    batch = batch_size(name, args.batch_size)
    settings = {
        **problem.settings,
        "batch_size": batch,
        "optimizer": name,
        "class": cls,
        "kwargs": kwargs,
    }
    params = problem.params
    state_arrays, state_static = eqx.partition(
        getattr(eqx_curv, cls)(**kwargs).init(eqx.combine(params, problem.static)),
        eqx.is_array,
    )
    state_arrays = _replicated(problem.mesh, state_arrays)
    directory = Path(args.out) / "checkpoints" / name
    progress = {
        "settings": settings,
        "step": 0,
        "losses": [],
        "skipped": 0,
        "chunk_end_steps": [],
        "chunk_end_wall_s": [],
        "eval_steps": [],
        "test_accuracy": [],
        "compile_s": 0.0,
    }
    if checkpoint and args.resume and (directory / "progress.json").exists():
        (params, state_arrays), progress = _load(
            directory, (params, state_arrays), settings, args.steps
        )
        params, state_arrays = _replicated(problem.mesh, (params, state_arrays))
    cache = {} if cache is None else cache
    if "programs" not in cache:
        cache["programs"] = _programs(cls, kwargs, state_static, problem, batch)
    run_chunk = cache["programs"]
    rate = _replicated(problem.mesh, jnp.asarray(kwargs["learning_rate"], jnp.float32))
    step = progress["step"]
    wall = progress["chunk_end_wall_s"][-1] if progress["chunk_end_wall_s"] else 0.0
    bar = tqdm(
        total=args.steps, initial=step, desc=f"{name:>17}", disable=args.no_progress
    )
    while step < args.steps:
        length = min(args.chunk, args.steps - step)
        start = _replicated(problem.mesh, jnp.asarray(step, jnp.int32))
        call_args = (params, state_arrays, problem.train, problem.key, start, rate)
        if length not in cache:
            tic = time.perf_counter()
            cache[length] = run_chunk.lower(*call_args, length).compile()
            progress["compile_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        params, state_arrays, losses, skipped = jax.block_until_ready(
            cache[length](*call_args)
        )
        wall += time.perf_counter() - tic
        step += length
        progress["losses"] += np.asarray(losses, np.float64).tolist()
        progress["skipped"] += int(np.sum(np.asarray(skipped)))
        progress["chunk_end_steps"].append(step)
        progress["chunk_end_wall_s"].append(wall)
        previous = step - length
        if step // args.eval_every > previous // args.eval_every or step == args.steps:
            progress["eval_steps"].append(step)
            progress["test_accuracy"].append(
                float(problem.accuracy(params, problem.test))
            )
        progress["step"] = step
        if checkpoint:
            _save(directory, (params, state_arrays), progress)
        bar.update(length)
        bar.set_postfix(loss=f"{float(smoothed(progress['losses'])[-1]):.4f}")
    bar.close()
    return _record(progress)


def _record(progress: dict) -> dict:
    losses = np.asarray(progress["losses"], np.float64)
    curve = smoothed(losses)
    wall = progress["chunk_end_wall_s"][-1] if progress["chunk_end_wall_s"] else 0.0
    accuracy = progress["test_accuracy"]
    return {
        "class": progress["settings"]["class"],
        "settings": progress["settings"]["kwargs"],
        "batch_size": progress["settings"]["batch_size"],
        "steps": len(losses),
        "final_loss": float(curve[-1]) if len(curve) else None,
        "test_accuracy": accuracy[-1] if accuracy else None,
        "steps_per_s": len(losses) / wall if wall > 0 else None,
        "wall_s": wall,
        "compile_s": progress["compile_s"],
        "skipped_steps": progress["skipped"],
        "step_to_adam_loss": None,
        "time_to_adam_loss": None,
        "curves": {
            "loss": losses.tolist(),
            "smoothed_loss": curve.tolist(),
            "chunk_end_steps": progress["chunk_end_steps"],
            "chunk_end_wall_s": progress["chunk_end_wall_s"],
            "eval_steps": progress["eval_steps"],
            "test_accuracy": accuracy,
        },
    }


def time_at_step(step: int, chunk_end_steps, chunk_end_wall_s) -> float:
    """Run time (compilation excluded) when `step` steps were done, interpolated
    linearly within the chunk holding that step."""
    ends = [0, *chunk_end_steps]
    walls = [0.0, *chunk_end_wall_s]
    return float(np.interp(step, ends, walls))


def reach(record: dict, target: float) -> tuple[int | None, float | None]:
    """The first step (and its run time) at which the smoothed loss is <= `target`."""
    curve = np.asarray(record["curves"]["smoothed_loss"], np.float64)
    below = np.flatnonzero(np.isfinite(curve) & (curve <= target))
    if not len(below):
        return None, None
    step = int(below[0]) + 1
    curves = record["curves"]
    return step, time_at_step(
        step, curves["chunk_end_steps"], curves["chunk_end_wall_s"]
    )


def dumps(results: dict) -> str:
    """`results` as JSON, with non-finite numbers as `null`."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(results))


def describe_batches(names: list[str], flag: int | None) -> str:
    """'batch 128', or 'batch 128 (gauss-newton: 32)' when the rows' batches differ."""
    batches = {name: batch_size(name, flag) for name in names}
    if len(set(batches.values())) <= 1:
        return f"batch {next(iter(batches.values()), flag)}"
    others = [f"{n}: {b}" for n, b in batches.items() if b != DEFAULT_BATCH_SIZE]
    return f"batch {DEFAULT_BATCH_SIZE} ({'; '.join(others)})"


def run_study(names: list[str], args: argparse.Namespace) -> dict:
    """Train every optimizer in `names`; write and return `results.json`'s content."""
    problem = make_problem(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = problem.settings["model"]
    print(
        f"{problem.settings['dataset']}: {problem.settings['train_examples']} training "
        f"and {problem.settings['test_examples']} test images; TinyViT "
        f"({model['size']}), {model['parameters']} parameters; "
        f"{describe_batches(names, args.batch_size)}, {args.steps} steps, "
        f"{jax.device_count()} device(s) visible, {args.devices} used"
    )
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "dataset": problem.settings["dataset"],
        "model": model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "devices": args.devices,
        "chunk": args.chunk,
        "eval_every": args.eval_every,
        "smoothing": SMOOTHING,
        "adam_final_loss": None,
        "optimizers": {},
    }
    for name in names:
        results["optimizers"][name] = train_optimizer(name, problem, args)
        (out / "results.json").write_text(dumps(results))
    adam = results["optimizers"].get("adam")
    if adam is not None and adam["final_loss"] is not None:
        target = adam["final_loss"]
        results["adam_final_loss"] = target
        for record in results["optimizers"].values():
            record["step_to_adam_loss"], record["time_to_adam_loss"] = reach(
                record, target
            )
    (out / "results.json").write_text(dumps(results))
    return results
