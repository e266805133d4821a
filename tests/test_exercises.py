import numpy as np

from minidist import exercises


def test_check_gradient_passes_the_right_answer_and_explains_wrong_ones():
    right = exercises.check_gradient(lambda t, X, y: X.T @ (X @ t - y) / len(y))
    assert right and "✔" in repr(right)
    cases = {
        "sign": lambda t, X, y: X.T @ (y - X @ t) / len(y),
        "factor N": lambda t, X, y: X.T @ (X @ t - y),
        "factor 2": lambda t, X, y: 2 * X.T @ (X @ t - y) / len(y),
        "shape": lambda t, X, y: X @ t - y,
        "raised ZeroDivisionError": lambda t, X, y: 1 / 0,
        "finite differences": lambda t, X, y: np.zeros_like(t),
    }
    for hint, fn in cases.items():
        result = exercises.check_gradient(fn)
        assert not result and hint in result.message and "✘" in repr(result), hint


def test_check_gd_step():
    assert exercises.check_gd_step(lambda t, g, lr: t - lr * g)
    uphill = exercises.check_gd_step(lambda t, g, lr: t + lr * g)
    assert not uphill and "uphill" in uphill.message
    assert not exercises.check_gd_step(lambda t, g, lr: t - g)


def test_check_combine():
    def weighted(grads, sizes):
        return sum(s * g for s, g in zip(sizes, grads, strict=True)) / sum(sizes)

    assert exercises.check_combine(weighted)
    plain = exercises.check_combine(lambda grads, sizes: np.mean(grads, axis=0))
    assert not plain and "weight" in plain.message
