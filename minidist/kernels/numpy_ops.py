"""The reference ops, in numpy: the readable spec every other device must match.

Shapes: X is (N, d_in), W is (d_in, d_out), b is (d_out,), dY is (N, d_out).
Every function here is pure except the optimizer updates, which write in place into the
flat parameter buffer (that is the point of having one).
"""

import numpy as np


def matmul(A, B):
    """C = A B."""
    return A @ B


def matmul_tn(A, B):
    """C = Aᵀ B   (the weight gradient of a linear layer: dW = Xᵀ dY)."""
    return A.T @ B


def matmul_nt(A, B):
    """C = A Bᵀ   (the input gradient of a linear layer: dX = dY Wᵀ)."""
    return A @ B.T


def add_bias(Z, b, activation=None):
    """Y[n, j] = act(Z[n, j] + b[j]), act the identity (default), "relu" or "tanh".

    With an activation this is the fused form a GPU computes in one pass over memory.
    """
    Y = Z + b
    if activation is None:
        return Y
    if activation not in ("relu", "tanh"):
        raise ValueError(f"unknown activation {activation!r}; allowed: None, 'relu', 'tanh'")
    return relu(Y) if activation == "relu" else tanh(Y)


def sum_rows(dY):
    """db[j] = Σ_n dY[n, j]   (the bias gradient)."""
    return dY.sum(axis=0)


def relu(Z):
    """Y = max(Z, 0)."""
    return np.maximum(Z, 0.0)


def relu_backward(dY, Z):
    """dZ = dY · 1[Z > 0]."""
    return dY * (Z > 0)


def tanh(Z):
    """Y = tanh(Z)."""
    return np.tanh(Z)


def tanh_backward(dY, Y):
    """dZ = dY · (1 − Y²), written with the forward output Y = tanh(Z)."""
    return dY * (1.0 - Y * Y)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy L = (1/N) Σ_n [logsumexp(z_n) − z_n[y_n]] and softmax probabilities.

    Stable: logsumexp(z) = m + log Σ_j exp(z_j − m) with m = max_j z_j, so exp never overflows.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    n = logits.shape[0]
    loss = -log_probs[np.arange(n), labels].mean()
    return float(loss), np.exp(log_probs)


def softmax_cross_entropy_backward(probs, labels):
    """dL/dz[n, j] = (softmax(z_n)[j] − 1[j = y_n]) / N."""
    n = probs.shape[0]
    grad = probs.copy()
    grad[np.arange(n), labels] -= 1.0
    return grad / n


def mse(pred, target):
    """Half mean squared error L = (1/2N) Σ_n ‖ŷ_n − y_n‖² and the residual ŷ − y."""
    residual = pred - target
    return 0.5 * float(np.sum(residual * residual)) / pred.shape[0], residual


def mse_backward(residual):
    """dL/dŷ = (ŷ − y) / N."""
    return residual / residual.shape[0]


def total(x):
    """s = Σ_i x_i   (a full reduction; a GPU does it as a tree)."""
    return x.sum()


def axpy(alpha, x, y):
    """y ← y + α x, in place."""
    y += alpha * x


def scale_into(alpha, x, out):
    """out ← α x, in place."""
    np.multiply(x, alpha, out=out)


def sgd_update(params, grads, velocity, lr, momentum, weight_decay):
    """One SGD step, in place (PyTorch's convention, so runs can be compared with it):

    g = ∇ + λθ;   v ← μ v + g;   θ ← θ − η v      (with μ = 0: θ ← θ − η g)
    """
    g = grads + weight_decay * params if weight_decay else grads
    if momentum:
        velocity *= momentum
        velocity += g
        g = velocity
    params -= lr * g


def adam_update(params, grads, m, v, lr, beta1, beta2, eps, step):
    """One Adam step, in place (Kingma & Ba 2015), step counted from 1:

    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − η · m̂ / (√v̂ + ε),
    with m̂ = m / (1 − β₁ᵗ) and v̂ = v / (1 − β₂ᵗ).
    """
    m *= beta1
    m += (1.0 - beta1) * grads
    v *= beta2
    v += (1.0 - beta2) * grads * grads
    m_hat = m / (1.0 - beta1**step)
    v_hat = v / (1.0 - beta2**step)
    params -= lr * m_hat / (np.sqrt(v_hat) + eps)
