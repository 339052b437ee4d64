"""The learning-rate sweep behind `eqx-curv train`'s per-optimizer defaults.

Each optimizer of `eqx-curv train` is trained with every learning rate of a small grid
(its class default, the reference page's rate where it has one, and neighbours) on
the train subcommand's own model, batches and protocol, and ranked by the final
training loss (mean of the last 100 steps). The learning rate is an argument of the
compiled chunk, so each optimizer compiles once. The chosen rates are
`eqx_curv.experiments.train.DEFAULTS`.

    python benchmarks/sweep_defaults.py                       # digits, small TinyViT
    python benchmarks/sweep_defaults.py --dataset cifar10 --data-dir DIR --subset 5000

Digits, TinyViT small (17,610 parameters), batch 128, 400 steps, seed 0, on a 2-core
CPU shared with other jobs (steps/s are only indicative); `*` marks the best rate:

| optimizer | learning rate | final loss | test accuracy | steps/s |
| --- | --- | --- | --- | --- |
| sgd | 0.01 | 2.2963 | 0.108 | 22.4 |
| sgd | 0.03 * | 0.5808 | 0.792 | 26.4 |
| sgd | 0.1 | 0.6030 | 0.792 | 33.4 |
| sgd | 0.3 | diverged | 0.100 | 30.3 |
| adam | 0.001 | 0.5942 | 0.847 | 20.4 |
| adam | 0.003 * | 0.2526 | 0.956 | 18.7 |
| adam | 0.01 | 0.2736 | 0.944 | 25.6 |
| adam-nomomentum | 0.0003 | 1.9646 | 0.578 | 19.8 |
| adam-nomomentum | 0.001 | 0.6294 | 0.853 | 21.1 |
| adam-nomomentum | 0.003 * | 0.3798 | 0.919 | 19.0 |
| adam-nosqrt | 0.001 * | 0.7257 | 0.825 | 9.5 |
| adam-nosqrt | 0.01 | 1.6664 | 0.489 | 15.6 |
| adam-nosqrt | 0.1 | 2.0656 | 0.292 | 9.8 |
| adam-true-fisher | 0.0001 | 2.3015 | 0.142 | 11.8 |
| adam-true-fisher | 0.0003 * | 1.9300 | 0.492 | 11.7 |
| adam-true-fisher | 0.001 | diverged | 0.100 | 27.7 |
| diag-newton | 0.01 | 0.7424 | 0.833 | 15.8 |
| diag-newton | 0.03 * | 0.5131 | 0.883 | 18.4 |
| diag-newton | 0.1 | 1.4526 | 0.586 | 16.5 |
| diag-newton | 0.3 | 52.6244 | 0.100 | 20.4 |
| adahessian | 0.015 | 1.2277 | 0.733 | 15.7 |
| adahessian | 0.05 * | 0.4769 | 0.881 | 15.6 |
| adahessian | 0.15 | 1.0482 | 0.706 | 13.7 |
| gauss-newton | 0.1 * | 0.2194 | 0.931 | 3.7 |
| gauss-newton | 0.3 | 0.2275 | 0.914 | 3.9 |
| gauss-newton | 1 | 0.3746 | 0.875 | 4.8 |

The page's rates lose here: SGD 0.01 (with momentum 0.9), Adam without momentum
1e-3, diagonal Newton 0.01, AdaHessian 0.015. The rows of natural-gradient, kfac,
shampoo, soap and muon are still to be measured (those optimizers keep their class
defaults), as is the CIFAR-10 subset.
"""

import argparse
import sys

import numpy as np


# name -> learning rates tried (class default, the page's rate where it has one).
GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adam": (1e-3, 3e-3, 1e-2),
    "adam-nomomentum": (3e-4, 1e-3, 3e-3),
    "adam-nosqrt": (1e-3, 1e-2, 1e-1),
    "adam-true-fisher": (1e-4, 3e-4, 1e-3),
    "diag-newton": (0.01, 0.03, 0.1, 0.3),
    "adahessian": (0.015, 0.05, 0.15),
    "gauss-newton": (0.1, 0.3, 1.0),
    "natural-gradient": (0.1, 0.3, 1.0),
    "kfac": (0.25, 0.5, 1.0),
    "shampoo": (1e-3, 3e-3, 1e-2),
    "soap": (3e-3, 1e-2, 3e-2),
    "muon": (5e-3, 2e-2, 5e-2),
}


def main(argv=None) -> None:
    from eqx_curv.experiments import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train.add_arguments(parser)
    parser.add_argument(
        "--subset", type=int, default=None, help="training images kept (CIFAR-10)"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=RATE,RATE",
        help="learning rates tried for optimizer NAME instead of its grid (repeatable)",
    )
    parser.set_defaults(steps=400, no_progress=True, out="sweep-results")
    args = parser.parse_args(argv)
    names = train._check_arguments(args)
    grids = dict(GRIDS)
    for spec in args.grid:
        name, _, rates = spec.partition("=")
        if name not in grids or not rates:
            parser.error(
                f"`--grid {spec}` is not NAME=RATE,RATE with NAME one of "
                f"{', '.join(grids)}: pass e.g. `--grid adam=1e-3,3e-3`."
            )
        grids[name] = tuple(float(rate) for rate in rates.split(","))
    train._force_devices(args.devices)

    from eqx_curv.experiments import study

    problem = study.make_problem(args)
    if args.subset is not None:
        images, labels = problem.train
        keep = np.random.default_rng(args.seed).permutation(len(labels))
        keep = np.sort(keep[: args.subset])
        problem = problem._replace(
            train=(images[keep], labels[keep]),
            settings={**problem.settings, "train_examples": len(keep)},
        )
    print(
        f"{problem.settings['dataset']}, {problem.settings['train_examples']} "
        f"training images, TinyViT {problem.settings['model']['size']} "
        f"({problem.settings['model']['parameters']} parameters), "
        f"{study.describe_batches(names, args.batch_size)}, {args.steps} steps, "
        f"seed {args.seed}"
    )
    print(
        "| optimizer | batch | learning rate | final loss | test accuracy | steps/s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        cache: dict = {}
        rows = []
        for rate in grids[name]:
            record = study.train_optimizer(
                name, problem, args, learning_rate=rate, checkpoint=False, cache=cache
            )
            rows.append((rate, record))
        losses = [r["final_loss"] for _, r in rows]
        finite = [x if x is not None and np.isfinite(x) else np.inf for x in losses]
        best = int(np.argmin(finite))
        for i, (rate, r) in enumerate(rows):
            loss = "diverged" if not np.isfinite(finite[i]) else f"{finite[i]:.4f}"
            mark = " *" if i == best else ""
            print(
                f"| {name} | {r['batch_size']} | {rate:g}{mark} | {loss} | "
                f"{r['test_accuracy']:.3f} | "
                f"{r['steps_per_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
