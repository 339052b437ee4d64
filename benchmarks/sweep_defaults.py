"""The learning-rate sweep behind `eqx-curv train`'s per-optimizer defaults.

Each optimizer of `eqx-curv train` is trained with every learning rate of a small grid
(its class default, the reference page's rate where it has one, and neighbours) on
the train subcommand's own model, batches and protocol, and ranked by the final
training loss (mean of the last 100 steps). The learning rate is an argument of the
compiled chunk, so each optimizer compiles once. The chosen rates are
`eqx_curv.experiments.train.DEFAULTS`.

    python benchmarks/sweep_defaults.py                       # digits, small TinyViT
    python benchmarks/sweep_defaults.py --dataset cifar10 --data-dir DIR --subset 5000
    python benchmarks/sweep_defaults.py --optimizers adam --grid adam=3e-4,1e-3

Digits (1,437 training images), TinyViT small (17,610 parameters), 400 steps, seed 0,
each row at its batch of `eqx-curv train` (128, and 32 for gauss-newton and
natural-gradient; gauss-newton was also swept at 128 before those rows got their
batch), on a 2-core CPU shared with other jobs (steps/s are only indicative); `*` marks
the best rate of each optimizer at its default batch:

| optimizer | batch | learning rate | final loss | test accuracy | steps/s |
| --- | --- | --- | --- | --- | --- |
| sgd | 128 | 0.01 | 2.2963 | 0.108 | 22.4 |
| sgd | 128 | 0.03 * | 0.5808 | 0.792 | 26.4 |
| sgd | 128 | 0.1 | 0.6030 | 0.792 | 33.4 |
| sgd | 128 | 0.3 | diverged | 0.100 | 30.3 |
| adam | 128 | 0.001 | 0.5942 | 0.847 | 20.4 |
| adam | 128 | 0.003 * | 0.2526 | 0.956 | 18.7 |
| adam | 128 | 0.01 | 0.2736 | 0.944 | 25.6 |
| adam-nomomentum | 128 | 0.0003 | 1.9646 | 0.578 | 19.8 |
| adam-nomomentum | 128 | 0.001 | 0.6294 | 0.853 | 21.1 |
| adam-nomomentum | 128 | 0.003 * | 0.3798 | 0.919 | 19.0 |
| adam-nosqrt | 128 | 0.001 * | 0.7257 | 0.825 | 9.5 |
| adam-nosqrt | 128 | 0.01 | 1.6664 | 0.489 | 15.6 |
| adam-nosqrt | 128 | 0.1 | 2.0656 | 0.292 | 9.8 |
| adam-true-fisher | 128 | 0.0001 | 2.3015 | 0.142 | 11.8 |
| adam-true-fisher | 128 | 0.0003 * | 1.9300 | 0.492 | 11.7 |
| adam-true-fisher | 128 | 0.001 | diverged | 0.100 | 27.7 |
| diag-newton | 128 | 0.01 | 0.7424 | 0.833 | 15.8 |
| diag-newton | 128 | 0.03 * | 0.5131 | 0.883 | 18.4 |
| diag-newton | 128 | 0.1 | 1.4526 | 0.586 | 16.5 |
| diag-newton | 128 | 0.3 | 52.6244 | 0.100 | 20.4 |
| adahessian | 128 | 0.015 | 1.2277 | 0.733 | 15.7 |
| adahessian | 128 | 0.05 * | 0.4769 | 0.881 | 15.6 |
| adahessian | 128 | 0.15 | 1.0482 | 0.706 | 13.7 |
| gauss-newton | 128 | 0.1 (*) | 0.2194 | 0.931 | 3.7 |
| gauss-newton | 128 | 0.3 | 0.2275 | 0.914 | 3.9 |
| gauss-newton | 128 | 1 | 0.3746 | 0.875 | 4.8 |
| gauss-newton | 32 | 0.1 * | 0.4446 | 0.897 | 20.0 |
| gauss-newton | 32 | 0.3 | 0.5960 | 0.878 | 17.8 |
| gauss-newton | 32 | 1 | 1.3754 | 0.336 | 14.5 |
| natural-gradient | 32 | 0.1 | 1.4931 | 0.719 | 17.7 |
| natural-gradient | 32 | 0.3 * | 1.0639 | 0.786 | 15.8 |
| natural-gradient | 32 | 1 | 1.0757 | 0.639 | 14.5 |
| kfac | 128 | 0.25 | 0.2371 | 0.936 | 22.0 |
| kfac | 128 | 0.5 | 0.1112 | 0.950 | 12.6 |
| kfac | 128 | 1 * | 0.1085 | 0.961 | 3.2 |
| shampoo | 128 | 0.001 | 0.3942 | 0.894 | 49.7 |
| shampoo | 128 | 0.003 * | 0.1872 | 0.942 | 44.5 |
| shampoo | 128 | 0.01 | 0.2105 | 0.953 | 43.8 |
| soap | 128 | 0.003 | 0.1984 | 0.950 | 48.2 |
| soap | 128 | 0.01 * | 0.1449 | 0.950 | 35.6 |
| soap | 128 | 0.03 | 0.2475 | 0.900 | 30.6 |
| muon | 128 | 0.005 | 0.2062 | 0.956 | 47.0 |
| muon | 128 | 0.02 * | 0.1838 | 0.942 | 48.8 |
| muon | 128 | 0.05 | 0.3406 | 0.908 | 41.8 |

The page's rates lose here: SGD 0.01 (with momentum 0.9), Adam without momentum
1e-3, diagonal Newton 0.01, AdaHessian 0.015. The class defaults of natural-gradient
(1.0), kfac, shampoo, soap and muon: K-FAC, Shampoo, SOAP and Muon keep theirs; the
natural gradient at batch 32 takes 0.3 (1.0 ends level at 1.0757 but with test accuracy
0.639 against 0.786).

CIFAR-10, a 5,000-image subset of the training set (the 10,000 test images for the
accuracy), the page's TinyViT (556,042 parameters), 200 steps, seed 0, batch 128:

    python benchmarks/sweep_defaults.py --dataset cifar10 --data-dir DIR \
        --subset 5000 --steps 200 --grid sgd=0.01,0.03,0.1 \
        --optimizers adam,sgd,muon,soap,shampoo,kfac,...  # the rest in that order

The machine's load average was 4-6 on its 2 cores (other jobs at normal priority, this
one at `nice 19`), so steps/s say little. The sweep was stopped after SOAP (Shampoo's
three runs had not finished after 20 minutes) so that the full CIFAR-10 run of
`docs/study.md` could start; after it, on a quieter machine (load average about 1.6),
a second sweep took the natural gradient, Gauss-Newton, Shampoo and K-FAC with
smaller grids (`--grid natural-gradient=0.03,0.1,0.3 --grid gauss-newton=0.03,0.1,0.3
--grid shampoo=1e-3,3e-3 --grid kfac=0.5,1`). A third sweep, at the end, took the
diagonal rows and Adam's variants (`--grid diag-newton=0.01,0.03,0.1 --grid
adahessian=0.015,0.05,0.15 --grid adam-nomomentum=3e-4,1e-3,3e-3 --grid
adam-true-fisher=1e-4,3e-4,1e-3 --grid adam-nosqrt=1e-3,1e-2`, nothing else running
at first, then the test suite at normal priority; its rows are the table's last).

| optimizer | batch | learning rate | final loss | test accuracy | steps/s |
| --- | --- | --- | --- | --- | --- |
| adam | 128 | 0.001 * | 1.8485 | 0.357 | 3.1 |
| adam | 128 | 0.003 | 1.9876 | 0.304 | 2.9 |
| adam | 128 | 0.01 | 2.2604 | 0.185 | 3.2 |
| sgd | 128 | 0.01 | 2.0769 | 0.278 | 3.2 |
| sgd | 128 | 0.03 * | 1.9734 | 0.290 | 3.1 |
| sgd | 128 | 0.1 | diverged | 0.100 | 3.4 |
| muon | 128 | 0.005 | 1.6737 | 0.404 | 3.3 |
| muon | 128 | 0.02 * | 1.5221 | 0.358 | 3.5 |
| muon | 128 | 0.05 | 1.7935 | 0.290 | 2.0 |
| soap | 128 | 0.003 * | 1.5739 | 0.429 | 1.5 |
| soap | 128 | 0.01 | 1.6044 | 0.379 | 1.5 |
| soap | 128 | 0.03 | 2.1917 | 0.294 | 1.0 |
| natural-gradient | 32 | 0.03 | 2.8061 | 0.100 | 3.6 |
| natural-gradient | 32 | 0.1 * | 2.7205 | 0.175 | 3.6 |
| natural-gradient | 32 | 0.3 | 2.8099 | 0.138 | 3.4 |
| gauss-newton | 32 | 0.03 | 2.0625 | 0.276 | 3.5 |
| gauss-newton | 32 | 0.1 * | 1.9530 | 0.306 | 3.6 |
| gauss-newton | 32 | 0.3 | 2.1479 | 0.177 | 2.8 |
| shampoo | 128 | 0.001 * | 1.6219 | 0.415 | 4.9 |
| shampoo | 128 | 0.003 | 1.6656 | 0.374 | 4.9 |
| kfac | 128 | 0.5 * | 1.5842 | 0.402 | 3.7 |
| kfac | 128 | 1 | 1.5955 | 0.402 | 3.7 |
| diag-newton | 128 | 0.01 * | 2.1255 | 0.270 | 0.6 |
| diag-newton | 128 | 0.03 | 2.4294 | 0.161 | 4.7 |
| diag-newton | 128 | 0.1 | 76.7116 | 0.101 | 4.5 |
| adahessian | 128 | 0.015 * | 1.9954 | 0.310 | 4.0 |
| adahessian | 128 | 0.05 | 2.0903 | 0.267 | 4.9 |
| adahessian | 128 | 0.15 | 2.4097 | 0.180 | 4.5 |
| adam-nomomentum | 128 | 0.0003 * | 1.9647 | 0.287 | 10.0 |
| adam-nomomentum | 128 | 0.001 | 2.0135 | 0.285 | 9.5 |
| adam-nomomentum | 128 | 0.003 | 2.2166 | 0.206 | 9.7 |
| adam-true-fisher | 128 | 0.0001 * | 2.0852 | 0.256 | 7.1 |
| adam-true-fisher | 128 | 0.0003 | 2.0886 | 0.267 | 7.1 |
| adam-true-fisher | 128 | 0.001 | diverged (6.7e24) | 0.100 | 7.2 |
| adam-nosqrt | 128 | 0.001 | 2.1641 | 0.199 | 6.1 |
| adam-nosqrt | 128 | 0.01 * | 2.1359 | 0.215 | 6.3 |

Where the two sweeps disagree the defaults are per data set
(`eqx_curv.experiments.train.DEFAULTS_CIFAR10`): a row takes its CIFAR-10 best when
its digits rate ends more than 1.5% higher on the subset. Adam's best CIFAR-10 rate,
1e-3, ends more than twice as high as 3e-3 on the digits (0.5942 against 0.2526), and
3e-3 ends 7.5% above 1e-3 on CIFAR-10, so no one rate is good on both; Shampoo (3e-3
ends 2.7% above 1e-3 on CIFAR-10, 1e-3 2.1x above 3e-3 on the digits) and SOAP (1.9%;
1.4x) likewise. K-FAC's two rates end 0.7% apart on CIFAR-10 (2.5% the other way on
the digits) and keep 1.0. The natural gradient at batch 32 trains at none of its rates
on CIFAR-10 (every final loss above ln 10 = 2.30, a uniform guess's) and keeps its
digits rate. In the third sweep the diagonal Newton method (0.03 ends 14% above 0.01),
AdaHessian (0.05 ends 4.8% above 0.015) and Adam without momentum (3e-3 ends 13% above
3e-4) take their CIFAR-10 best; true-Fisher Adam (0.2%) and Adam without the square
root (1.3%) keep their digits rates. SGD, Muon and Gauss-Newton agree on both.
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
