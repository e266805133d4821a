"""Elementwise Numba-CUDA kernels: bias + activation, their backward, losses' gradients, updates.

All of them run a grid-stride loop over a flat index i: thread t of block b handles
i = b·T + t, then i + G·T, i + 2·G·T, … (G blocks of T threads), so any grid covers any size and
neighbouring threads touch neighbouring addresses (coalesced loads and stores). Arrays are passed
flattened (1-D, C order); a row-major (N, d) matrix has element (n, j) at i = n·d + j.
"""

import functools
import math

from numba import cuda

NONE, RELU, TANH = 0, 1, 2
ACTIVATIONS = {None: NONE, "relu": RELU, "tanh": TANH}


@functools.cache
def bias_activation_kernel(activation, has_bias):
    """out[i] = act(Z[i] + b[i mod d]): the bias add fused with the activation (one pass)."""

    @cuda.jit
    def kernel(Z, b, d, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, Z.shape[0], stride):
            v = Z[i] + b[i % d] if has_bias else Z[i]
            if activation == RELU:
                v = max(v, 0)
            elif activation == TANH:
                v = math.tanh(v)
            out[i] = v

    return kernel


@functools.cache
def activation_backward_kernel(activation):
    """ReLU: dZ[i] = dY[i]·1[Z[i] > 0];  tanh: dZ[i] = dY[i]·(1 − Y[i]²) with Y = tanh(Z)."""

    @cuda.jit
    def kernel(dY, saved, dZ):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, dY.shape[0], stride):
            if activation == RELU:
                dZ[i] = dY[i] if saved[i] > 0 else 0
            else:
                dZ[i] = dY[i] * (1.0 - saved[i] * saved[i])

    return kernel


@cuda.jit
def subtract(a, b, out):
    """out[i] = a[i] − b[i]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        out[i] = a[i] - b[i]


@cuda.jit
def scale(alpha, x, out):
    """out[i] = α x[i]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = alpha * x[i]


@cuda.jit
def fill(out, value):
    """out[i] = value."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = value


@cuda.jit
def axpy(y, x, alpha):
    """y[i] ← y[i] + α x[i]."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        y[i] += alpha * x[i]


@cuda.jit
def softmax_cross_entropy_backward(probs, labels, k, inv_n, grad):
    """grad[i] = (p[i] − 1[j = y_n]) / N for i = n·k + j."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, probs.shape[0], stride):
        n, j = i // k, i % k
        hit = 1.0 if labels[n] == j else 0.0
        grad[i] = (probs[i] - hit) * inv_n


@cuda.jit
def sgd_update(params, grads, velocity, lr, momentum, weight_decay):
    """Thread i: g = ∇ᵢ + λθᵢ;  vᵢ ← μvᵢ + g (if μ > 0);  θᵢ ← θᵢ − η·(vᵢ or g)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, params.shape[0], stride):
        g = grads[i] + weight_decay * params[i]
        if momentum != 0:
            v = momentum * velocity[i] + g
            velocity[i] = v
            g = v
        params[i] -= lr * g


@cuda.jit
def adam_update(params, grads, m, v, lr, beta1, beta2, eps, bias1, bias2):
    """Thread i: mᵢ ← β₁mᵢ + (1−β₁)gᵢ;  vᵢ ← β₂vᵢ + (1−β₂)gᵢ²;
    θᵢ ← θᵢ − η (mᵢ/bias1) / (√(vᵢ/bias2) + ε),  with bias1 = 1 − β₁ᵗ, bias2 = 1 − β₂ᵗ."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, params.shape[0], stride):
        g = grads[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i], v[i] = mi, vi
        params[i] -= lr * (mi / bias1) / (math.sqrt(vi / bias2) + eps)
