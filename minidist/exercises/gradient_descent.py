"""Lesson 1 (gradient descent): the gradient, one descent step, combining workers' gradients."""

import numpy as np

from minidist.exercises._common import Check, _call, _regression_problem
from minidist.gradcheck import numerical_gradient, relative_error


def half_mse(theta, X, y):
    """L(θ) = (1/2N) ‖Xθ − y‖²."""
    r = X @ theta - y
    return 0.5 * float(r @ r) / len(y)


def check_gradient(fn, trials=5, seed=0):
    """fn(θ, X, y) should return ∇L(θ) = (1/N) Xᵀ(Xθ − y) for L(θ) = (1/2N)‖Xθ − y‖²."""
    name = "check_gradient"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng)
        got, failed = _call(name, fn, theta.copy(), X, y)
        if failed is not None:
            return failed
        want = numerical_gradient(lambda t, X=X, y=y: half_mse(t, X, y), theta.copy())
        if got.shape != want.shape:
            return Check(name, False, f"the gradient must have θ's shape {want.shape}, "
                                      f"got {got.shape}. Did you sum over the wrong axis?")
        if relative_error(got, want) < 1e-6:
            continue
        if relative_error(-got, want) < 1e-6:
            return Check(name, False, "right size, wrong sign: the residual is Xθ − y, not y − Xθ")
        if relative_error(got / len(y), want) < 1e-6:
            return Check(name, False, f"too large by a factor N = {len(y)}: L is a mean, "
                                      "so divide the sum by N")
        if relative_error(got / 2, want) < 1e-6:
            return Check(name, False, "too large by a factor 2: the ½ in L cancels the 2 "
                                      "from differentiating the square")
        return Check(name, False, f"differs from finite differences (relative error "
                                  f"{relative_error(got, want):.2e}) on a {X.shape} problem")
    return Check(name, True, f"matches finite differences on {trials} random problems")


def check_gd_step(fn, trials=5, seed=0):
    """fn(θ, grad, lr) should return the new parameters θ − η·grad."""
    name = "check_gd_step"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, grad, lr = rng.normal(size=4), rng.normal(size=4), float(rng.uniform(0.01, 1))
        got, failed = _call(name, fn, theta.copy(), grad.copy(), lr)
        if failed is not None:
            return failed
        if got.shape != theta.shape:
            return Check(name, False, f"return the new θ of shape {theta.shape}, got {got.shape}")
        if np.allclose(got, theta + lr * grad):
            return Check(name, False, "you stepped uphill: descent subtracts η·∇L")
        if not np.allclose(got, theta - lr * grad, rtol=1e-12, atol=1e-12):
            return Check(name, False, "the new θ should be θ − η·grad")
    return Check(name, True, f"θ − η∇L on {trials} random cases")


def check_combine(fn, trials=5, seed=0):
    """fn(grads, sizes) should combine per-worker mean gradients into the global-batch gradient:
    ∇L = Σ_k (|B_k| / |B|) ∇L_k."""
    name = "check_combine"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng, n=int(rng.integers(7, 40)))
        cuts = np.sort(rng.choice(np.arange(1, len(y)), size=int(rng.integers(1, 4)),
                                  replace=False))
        parts = np.split(np.arange(len(y)), cuts)
        grads = [X[p].T @ (X[p] @ theta - y[p]) / len(p) for p in parts]
        sizes = [len(p) for p in parts]
        got, failed = _call(name, fn, [g.copy() for g in grads], list(sizes))
        if failed is not None:
            return failed
        want = X.T @ (X @ theta - y) / len(y)
        if got.shape != want.shape:
            return Check(name, False, f"return one gradient of shape {want.shape}, "
                                      f"got {got.shape}")
        if relative_error(got, want) < 1e-10:
            continue
        if relative_error(got, np.mean(grads, axis=0)) < 1e-10:
            return Check(name, False, f"a plain mean is right only for equal parts; these have "
                                      f"sizes {sizes}: weight each by its size")
        return Check(name, False, "does not equal the full-batch gradient "
                                  f"(relative error {relative_error(got, want):.2e})")
    return Check(name, True, f"equals the full-batch gradient for {trials} uneven splits")
