"""The table and figures of `eqx-curv train`, from its `results.json` content."""

from pathlib import Path


# The reference page's groups: figure name -> (title, optimizers). Adam (with
# momentum) is drawn dashed in every group, as the baseline.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sgd_diagonal": (
        "SGD, diagonal Newton and AdaHessian",
        ("sgd", "diag-newton", "adahessian"),
    ),
    "gauss_newton": (
        "Gauss-Newton and the natural gradient",
        ("gauss-newton", "natural-gradient"),
    ),
    "adam_sqrt": (
        "Adam without momentum, with and without the square root",
        ("adam-nomomentum", "adam-nosqrt"),
    ),
    "fisher": ("Adam: empirical vs true Fisher", ("adam", "adam-true-fisher")),
    "shampoo": ("Shampoo and its descendants", ("shampoo", "soap", "muon")),
    "kfac": ("K-FAC", ("kfac",)),
}


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    """The Markdown table of one run: a row per optimizer."""
    target = results["adam_final_loss"]
    batches = [r["batch_size"] for r in results["optimizers"].values()]
    if len(set(batches)) > 1:
        batch = "batch per row"
    else:
        batch = f"batch {batches[0] if batches else results['batch_size']}"
    lines = [
        f"{results['dataset']}, TinyViT ({results['model']['size']}, "
        f"{results['model']['parameters']} parameters), {results['steps']} steps, "
        f"{batch}, seed {results['seed']}. Loss: mean of the "
        f"last {results['smoothing']} training losses. Adam's final loss: "
        f"{_number(target, '.4f')}. Times exclude compilation (its own column) and "
        "test evaluations; the time to Adam's loss is interpolated within a chunk of "
        f"{results['chunk']} steps.",
        "",
        "| optimizer | settings | batch | final loss | test accuracy | steps/s | "
        "wall s | compile s | step to Adam's loss | s to Adam's loss | skipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["optimizers"].items():
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(
            f"| {name} | {r['class']}({settings}) | {r['batch_size']} | "
            f"{_number(r['final_loss'], '.4f')} | "
            f"{_number(r['test_accuracy'], '.3f')} | "
            f"{_number(r['steps_per_s'], '.1f')} | {r['wall_s']:.1f} | "
            f"{r['compile_s']:.1f} | {_number(r['step_to_adam_loss'], 'd')} | "
            f"{_number(r['time_to_adam_loss'], '.1f')} | {r['skipped_steps']} |"
        )
    return "\n".join(lines)


def write_table(results: dict, path: Path) -> str:
    text = table(results)
    Path(path).write_text(text + "\n")
    return text


def _draw(ax, name: str, record: dict, *, against_time: bool = False, **style):
    import numpy as np

    curve = np.asarray(record["curves"]["smoothed_loss"], np.float64)
    steps = np.arange(1, len(curve) + 1)
    if against_time:
        curves = record["curves"]
        x = np.interp(
            steps, [0, *curves["chunk_end_steps"]], [0.0, *curves["chunk_end_wall_s"]]
        )
    else:
        x = steps
    finite = curve[np.isfinite(curve)]
    if len(finite) and (len(finite) < len(curve) or finite[-1] > _LIMIT * finite[0]):
        name = f"{name} (diverged)"
    ax.plot(x, np.where(np.isfinite(curve), curve, np.nan), label=name, **style)


# A curve that ends above this multiple of where it started is marked as diverged,
# and the axes stop at this multiple of the highest starting loss, so that one
# diverged run does not flatten every other curve.
_LIMIT = 2.0


def _starts(records) -> tuple[float, float] | tuple[()]:
    """The highest starting and the lowest smoothed loss of `records`' curves."""
    import numpy as np

    starts, lows = [], []
    for record in records:
        curve = np.asarray(record["curves"]["smoothed_loss"], np.float64)
        curve = curve[np.isfinite(curve) & (curve > 0)]
        if len(curve):
            starts.append(float(curve[0]))
            lows.append(float(curve.min()))
    return (max(starts), min(lows)) if starts else ()


def _finish(fig, ax, title: str, path: Path, xlabel: str, starts=()) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    if starts:
        highest_start, lowest = starts
        ax.set_ylim(lowest / 1.2, _LIMIT * highest_start)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_figures(results: dict, out: Path) -> list[Path]:
    """PNG figures in `out`: one per group of the page (where any of its optimizers
    ran), every optimizer together, and the loss against run time. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    records = results["optimizers"]
    adam = records.get("adam")
    written = []
    for key, (title, names) in GROUPS.items():
        present = [name for name in names if name in records]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in present:
            _draw(ax, name, records[name])
        if adam is not None and "adam" not in present:
            _draw(ax, "adam", adam, color="black", linestyle="--")
        path = out / f"loss_{key}.png"
        shown = [records[name] for name in present] + ([adam] if adam else [])
        _finish(fig, ax, title, path, "step", _starts(shown))
        plt.close(fig)
        written.append(path)
    for name, against_time, xlabel in (
        ("loss_all.png", False, "step"),
        ("loss_vs_time.png", True, "run time, s (compilation excluded)"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (optimizer, record) in enumerate(records.items()):
            style = {"linestyle": "-" if i < 10 else "--"}
            _draw(ax, optimizer, record, against_time=against_time, **style)
        title = f"{results['dataset']}: every optimizer"
        _finish(fig, ax, title, out / name, xlabel, _starts(records.values()))
        plt.close(fig)
        written.append(out / name)
    return written
