"""Lesson 10's exercises, solved: what a learner is asked to write, in the plainest form.

    causal_attention      softmax(q kᵀ/√d_head + M) v for every head, M hiding the future
    layernorm_backward    (dx, dγ, dβ) of y = γ ⊙ x̂ + β, through x̂, the mean and the variance
"""

import numpy as np


def causal_attention(q, k, v):
    """Scores q_t · k_s / √d_head, (N, H, T, T); −∞ where s > t (the diagonal stays, so no row
    is all −∞); a softmax over s, stable by subtracting each row's max; the weighted values."""
    T, d_head = q.shape[-2], q.shape[-1]
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(d_head)
    scores[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


def layernorm_backward(dy, x, gamma, eps=1e-5):
    """x̂ = (x − μ)/σ, σ = √(σ² + ε) over the last axis; dγ = Σ ∂y ⊙ x̂ and dβ = Σ ∂y over
    every axis but the last; with ĝ = γ ⊙ ∂y, ∂x = (1/σ)(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)): the
    direct path, the mean's and the variance's."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    x_hat = centred * inv_std
    rows = (-1, x.shape[-1])
    g = gamma * dy
    dx = inv_std * (g - g.mean(axis=-1, keepdims=True)
                    - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return dx, (dy * x_hat).reshape(rows).sum(axis=0), dy.reshape(rows).sum(axis=0)
