"""Small data sets that ship with the environment (no downloads)."""

import numpy as np


def digits(
    num_examples: int | None = None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's embedded 8x8 handwritten digits (1,797 examples, 10 classes).

    **Arguments:**

    - `num_examples`: keep this many examples, drawn at random without replacement
        (all of them when `None`).
    - `seed`: the seed of that draw.

    **Returns:**

    `(inputs, labels)`: float32 inputs of shape `[N, 64]` scaled to `[0, 1]`, and int32
    labels of shape `[N]`.
    """
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    inputs = (np.asarray(images) / 16.0).astype(np.float32)
    labels = np.asarray(targets).astype(np.int32)
    if num_examples is not None:
        if not 1 <= num_examples <= len(labels):
            raise ValueError(
                f"`num_examples` must be between 1 and {len(labels)} (the size of the "
                f"digits data set), got {num_examples}."
            )
        keep = np.random.default_rng(seed).permutation(len(labels))[:num_examples]
        inputs, labels = inputs[keep], labels[keep]
    return inputs, labels
