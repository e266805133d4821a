"""Lesson 4 (distributed gradient descent): the server's step."""

import numpy as np

from minidist.exercises._common import Check, _call, _regression_problem
from minidist.gradcheck import relative_error


def _uneven_parts(rng, n):
    """2 to 4 contiguous parts of range(n), not all of the same size."""
    while True:
        cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, 4)), replace=False))
        parts = np.split(np.arange(n), cuts)
        if len({len(p) for p in parts}) > 1:
            return parts


def check_server_step(fn, trials=5, seed=0):
    """fn(grads, sizes, theta, lr) should return the server's new parameters after one step of
    distributed gradient descent: θ − η Σ_k (|B_k|/|B|) ∇L_k, where grads[k] = ∇L_k is worker
    k's mean gradient over its sizes[k] = |B_k| rows. Checked against the full-batch step."""
    name = "check_server_step"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng, n=int(rng.integers(7, 40)))
        parts = _uneven_parts(rng, len(y))
        grads = [X[p].T @ (X[p] @ theta - y[p]) / len(p) for p in parts]
        sizes, lr = [len(p) for p in parts], float(rng.uniform(0.05, 0.5))
        got, failed = _call(name, fn, [g.copy() for g in grads], list(sizes), theta.copy(), lr)
        if failed is not None:
            return failed
        full = X.T @ (X @ theta - y) / len(y)  # the gradient of the mean loss over all rows
        want = theta - lr * full
        if got.shape != want.shape:
            return Check(name, False, f"return the new θ, of shape {want.shape}; got {got.shape}")
        if relative_error(got, want) < 1e-10:
            continue
        mistakes = [
            (theta, "θ came back unchanged: subtract η times the combined gradient"),
            (theta - lr * np.mean(grads, axis=0), f"a plain mean of the gradients is right only "
             f"for equal parts; these have sizes {sizes}: weight ∇L_k by |B_k|/|B|"),
            (theta + lr * full, "you stepped uphill: the update subtracts η·∇L"),
            (theta - full, "the learning rate is missing: the step is θ − η·∇L"),
            (full, "you returned the combined gradient; return the new parameters θ − η·∇L"),
            (theta - lr * np.sum(grads, axis=0), "you added the mean gradients; weight each by "
             "its share |B_k|/|B| of the batch (the weights must sum to 1)"),
            (theta - lr * sum(s * g for s, g in zip(sizes, grads, strict=True)),
             f"the weights must be shares of the batch: divide |B_k| by |B| = {sum(sizes)}"),
        ]
        for wrong, hint in mistakes:
            if relative_error(got, wrong) < 1e-10:
                return Check(name, False, hint)
        return Check(name, False, "differs from one full-batch gradient-descent step "
                                  f"(relative error {relative_error(got, want):.2e}) with parts "
                                  f"of sizes {sizes} and lr = {lr:.3f}")
    return Check(name, True, f"one full-batch gradient-descent step for {trials} uneven splits")
