"""Central finite differences: the independent check of every backward pass.

    ∂f/∂x_i ≈ (f(x + ε e_i) − f(x − ε e_i)) / 2ε      (error O(ε²) for smooth f)
"""

import numpy as np


def numerical_gradient(f, x, eps=1e-6):
    """∇f at x by central differences; f(x) -> float. x is perturbed in place and restored."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = f(x)
        flat[i] = saved - eps
        down = f(x)
        flat[i] = saved
        gflat[i] = (up - down) / (2 * eps)
    return grad


def relative_error(a, b):
    """max |a − b| / max(max |a|, max |b|, 1e-12): scale-free, 0 when equal."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0), 1e-12)
    return float(np.max(np.abs(a - b), initial=0.0) / scale)


def check_model(model, X, y, eps=1e-6):
    """Relative error between model.loss_and_grad's gradient and finite differences of the loss."""
    model.loss_and_grad(X, y)
    analytic = model.grads.copy()
    numeric = numerical_gradient(lambda _: model.loss(X, y), model.params, eps)
    return relative_error(analytic, numeric)
