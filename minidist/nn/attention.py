"""Causal multi-head self-attention with explicit forward and backward (GPT-2's attention).

For X of shape (N, T, d) and H heads of width d_h = d/H, head h computes

    Q_h = X W_q[h] + b_q[h],   K_h = X W_k[h] + b_k[h],   V_h = X W_v[h] + b_v[h]
    S_h = Q_h K_hᵀ / √d_h,     S_h[t, s] = −∞ for s > t  (position t sees only s ≤ t)
    P_h = softmax(S_h)  (over s),   O_h = P_h V_h
    Y   = [O_1 … O_H] W_o + b_o

and the backward pass runs the same chain in reverse:

    ∂O_h = ∂Y W_o[h]ᵀ,   ∂V_h = P_hᵀ ∂O_h,   ∂P_h = ∂O_h V_hᵀ
    ∂S_h = P_h ⊙ (∂P_h − rowsum(∂P_h ⊙ P_h))   (the softmax's Jacobian; 0 where masked)
    ∂Q_h = ∂S_h K_h / √d_h,   ∂K_h = ∂S_hᵀ Q_h / √d_h,   ∂X = Σ ∂{Q,K,V}_h W_{q,k,v}[h]ᵀ

All heads run at once as batched matmuls over arrays shaped (N, H, T, ·); Q, K and V come
from ONE matmul with the weights seen as a (d, 3·H·d_h) matrix.
"""

import math

import numpy as np

from minidist.nn.layers import Layer

INIT_STD = 0.02  # GPT-2's weight initialisation: N(0, 0.02²)


class CausalSelfAttention(Layer):
    """Multi-head causal self-attention over (N, T, d_model) inputs.

    Parameters (head h's weights are contiguous blocks, so heads can later be split over ranks):
    W_qkv (3, H, d, d_h) with [0] = Q, [1] = K, [2] = V; b_qkv (3, H, d_h); W_o (H, d_h, d);
    b_o (d,). Kept for backward: the input X, Q, K, V, the softmax P and O (the input of W_o).
    out_std: the std of W_o's initial values (GPT-2 scales the residual projections down).
    d_head: each head's width, d_model / n_heads by default (tensor parallelism runs n_heads/t
    of a model's heads on each rank, each still d_model / n_heads wide).
    """

    def __init__(self, d_model, n_heads, out_std=INIT_STD, d_head=None):
        if d_model < 1 or n_heads < 1 or (d_head is None and d_model % n_heads):
            raise ValueError(f"CausalSelfAttention needs d_model divisible by n_heads (both "
                             f">= 1), got d_model={d_model}, n_heads={n_heads}")
        self.d_model, self.n_heads = int(d_model), int(n_heads)
        self.d_head = self.d_model // self.n_heads if d_head is None else int(d_head)
        self.out_std = out_std

    def __repr__(self):
        return f"CausalSelfAttention(d_model={self.d_model}, heads={self.n_heads})"

    def param_shapes(self):
        d, H, dh = self.d_model, self.n_heads, self.d_head
        return {"W_qkv": (3, H, d, dh), "b_qkv": (3, H, dh), "W_o": (H, dh, d), "b_o": (d,)}

    def init_params(self, params, rng):
        """W_qkv ~ N(0, 0.02²), W_o ~ N(0, out_std²), biases 0."""
        params["W_qkv"][...] = rng.normal(0.0, INIT_STD, params["W_qkv"].shape)
        params["b_qkv"][...] = 0.0
        params["W_o"][...] = rng.normal(0.0, self.out_std, params["W_o"].shape)
        params["b_o"][...] = 0.0

    def _qkv_matrix(self, W_qkv):
        """(3, H, d, d_h) → (d, 3·H·d_h): column block (i, h) is W_qkv[i, h]."""
        return W_qkv.transpose(2, 0, 1, 3).reshape(self.d_model, -1)

    def forward(self, X):
        heads = self.heads(X)
        N, T, d = X.shape
        Y = heads @ self.params["W_o"].reshape(-1, d) + self.params["b_o"]
        return Y.reshape(N, T, d)

    def heads(self, X):
        """O = [O_1 … O_H], shape (N·T, H·d_h), for X (N, T, d): everything up to W_o."""
        if X.ndim != 3 or X.shape[-1] != self.d_model:
            raise ValueError(f"{self} expects input of shape (N, T, {self.d_model}), got "
                             f"{X.shape}")
        N, T, d = X.shape
        H, dh = self.n_heads, self.d_head
        self.X = X
        qkv = X.reshape(N * T, d) @ self._qkv_matrix(self.params["W_qkv"])
        qkv = qkv.reshape(N, T, 3, H, dh) + self.params["b_qkv"]
        # (3, N, H, T, d_h), one contiguous array: Q, K and V are views of it
        self.Q, self.K, self.V = np.ascontiguousarray(qkv.transpose(2, 0, 3, 1, 4))
        heads = self.attend()  # (N, H, T, d_h): O_h for every head
        self.O = np.ascontiguousarray(heads.transpose(0, 2, 1, 3)).reshape(N * T, H * dh)
        return self.O

    def attend(self):
        """The core, softmax(Q_h K_hᵀ/√d_h + causal mask) V_h for every head, (N, H, T, d_h),
        from self.Q, self.K, self.V; keeps P (a subclass may replace the core: ring attention)."""
        T = self.Q.shape[-2]
        scores = self.Q @ self.K.swapaxes(-1, -2) / math.sqrt(self.d_head)  # (N, H, T, T)
        scores[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)  # the diagonal is never masked: finite
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        self.P = scores
        return self.P @ self.V

    def backward(self, dY):
        N, T, d = dY.shape
        H, dh = self.n_heads, self.d_head
        dY = dY.reshape(N * T, d)
        W_o = self.params["W_o"].reshape(H * dh, d)
        self.grads["W_o"][...] = (self.O.T @ dY).reshape(H, dh, d)
        self.grads["b_o"][...] = dY.sum(axis=0)
        return self.heads_backward(dY @ W_o.T, self.X)

    def heads_backward(self, dO, X):
        """Given ∂O (N·T, H·d_h) and the input X (N, T, d) that `heads` saw: writes ∂W_qkv,
        ∂b_qkv and returns ∂X (N, T, d)."""
        N, T, d = X.shape
        H, dh = self.n_heads, self.d_head
        dQ, dK, dV = self.attend_backward(dO.reshape(N, T, H, dh).transpose(0, 2, 1, 3))
        # (3, N, H, T, d_h) → (N·T, 3·H·d_h): the rows and columns of the one QKV matmul
        dqkv = np.stack([dQ, dK, dV]).transpose(1, 3, 0, 2, 4).reshape(N * T, 3 * H * dh)
        X = X.reshape(N * T, d)
        self.grads["W_qkv"][...] = (X.T @ dqkv).reshape(d, 3, H, dh).transpose(1, 2, 0, 3)
        self.grads["b_qkv"][...] = dqkv.sum(axis=0).reshape(3, H, dh)
        dX = dqkv @ self._qkv_matrix(self.params["W_qkv"]).T
        return dX.reshape(N, T, d)

    def attend_backward(self, dO):
        """(∂Q, ∂K, ∂V), each (N, H, T, d_h), from ∂O (N, H, T, d_h) through attend's P."""
        dV = self.P.swapaxes(-1, -2) @ dO
        dP = dO @ self.V.swapaxes(-1, -2)
        dS = self.P * (dP - (dP * self.P).sum(axis=-1, keepdims=True)) / math.sqrt(self.d_head)
        return dS @ self.K, dS.swapaxes(-1, -2) @ self.Q, dV
