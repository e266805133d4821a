"""Datasets that ship offline, sharding across ranks, and reproducible batches.

The digits (load_digits) and synthetic data live here; the text corpus for a language model,
its character tokenizer and its (N, T) windows live in minidist.text and are re-exported:
load_text, CharTokenizer, split_text, text_windows.
"""

import gzip
from importlib import resources

import numpy as np

from minidist.text import CharTokenizer, load_text, split_text, text_windows

__all__ = [
    "CharTokenizer", "batches", "check_integer", "check_labels", "check_training_data",
    "is_integer", "load_digits", "load_text", "make_classification", "make_regression", "shard",
    "shard_bounds", "split_text", "step_batches", "text_windows", "train_test_split",
]


def load_digits():
    """The 1797 8×8 handwritten digits: X float64 (1797, 64) in [0, 1], y int64 in 0..9.

    Pixel counts 0..16 are divided by 16. The file ships with minidist (see datasets/README.md).
    """
    path = resources.files("minidist.datasets").joinpath("digits.csv.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


def make_regression(n, d, noise=0.1, seed=0):
    """y = X θ* + ε with X ~ N(0, 1)^(n×d), θ* ~ N(0, 1)^d, ε ~ N(0, noise²); returns (X, y, θ*)."""
    _check_positive(n=n, d=d)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    theta = rng.normal(size=d)
    y = X @ theta + noise * rng.normal(size=n)
    return X, y, theta


def make_classification(n, d, k, seed=0):
    """k Gaussian blobs in d dimensions, class c centred at μ_c ~ N(0, 3²): returns (X, y)."""
    _check_positive(n=n, d=d, k=k)
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    y = rng.integers(0, k, size=n).astype(np.int64)
    X = centres[y] + rng.normal(size=(n, d))
    return X, y


def train_test_split(X, y, test_fraction=0.25, seed=0):
    """Shuffle once with `seed` and hold out ⌈test_fraction·n⌉ rows.

    Returns (X_train, X_test, y_train, y_test), in scikit-learn's order.
    """
    n = len(X)
    if len(y) != n:
        raise ValueError(f"X has {n} rows but y has {len(y)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = int(np.ceil(test_fraction * n))
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} rows leaves an empty split")
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]


def shard_bounds(n, rank, world_size):
    """[start, stop) of rank's contiguous shard: the first n mod p ranks get one row more."""
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}) for world_size={world_size}, "
                         f"got {rank!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(n, rank, world_size):
    """Indices of rank's contiguous shard of range(n); all shards partition range(n) and their
    sizes differ by at most one."""
    return np.arange(*shard_bounds(n, rank, world_size))


def batches(n, batch_size, seed=0, epoch=0, drop_last=False):
    """Yield index arrays covering one shuffled epoch; the order depends only on (seed, epoch)."""
    _check_positive(n=n, batch_size=batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def step_batches(n, batch_size, steps, seed=0):
    """Exactly `steps` full batches of `batch_size` indices, epoch after epoch.

    Training step t always sees the same global batch, whatever the strategy or worker count.
    """
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training rows")
    epoch, done = 0, 0
    while done < steps:
        for batch in batches(n, batch_size, seed, epoch, drop_last=True):
            if done == steps:
                return
            yield batch
            done += 1
        epoch += 1


def is_integer(value):
    """An int or a numpy integer; a bool is not one here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_integer(name, value, minimum=1):
    """A TypeError unless `value` is an integer (is_integer), a ValueError if it is below
    `minimum`; both name the argument and say what it may be."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_training_data(X, y):
    """(X, y) as arrays, or a clear error before any step runs: numbers only, one label per
    row, every value finite. A bad value is named by its row (and column): step_batches may
    reach that row only steps later, where it would look like a diverged run."""
    X, y = _as_array("X", X), _as_array("y", y)
    if X.ndim == 0 or y.ndim == 0:
        raise ValueError(f"X and y need one row per sample, got shapes {X.shape} and {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    for name, values in (("X", X), ("y", y)):
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            place = f"row {where[0]}" + (f", column {where[1]}" if len(where) == 2 else "")
            raise ValueError(f"{name} must be finite: {name}[{', '.join(map(str, where))}] "
                             f"({place}) is {values[where]}")
    return X, y


def check_labels(y, classes):
    """y must be integer class labels in [0, classes): one per row, or one per position of a
    sequence, (N, T) for a language model; the first one that is not is named."""
    if y.ndim < 1 or y.dtype.kind not in "iu":
        raise TypeError(f"y must hold integer class labels in [0, {classes}) for this "
                        f"classifier, got {y.dtype} of shape {y.shape}")
    bad = np.argwhere((y < 0) | (y >= classes))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        index = ", ".join(map(str, where))
        raise ValueError(f"y[{index}] = {y[where]} (row {where[0]}) is not a class label: the "
                         f"model has {classes} classes, so y must lie in [0, {classes})")


def _as_array(name, values):
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{name} must be an array (or nested lists of equal lengths): "
                         f"{error}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers (bool, integer or float), got dtype "
                        f"{array.dtype}")
    return array


def _check_positive(**values):
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
