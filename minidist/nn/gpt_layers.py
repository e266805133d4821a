"""The GPT's position-wise layers: the token and position embedding, LayerNorm and GELU, each
with explicit forward and backward (minidist.nn.transformer assembles them into blocks)."""

import math

import numpy as np

from minidist.nn.attention import INIT_STD
from minidist.nn.layers import Layer

EPS = 1e-5  # every LayerNorm's ε


class Embedding(Layer):
    """x = wte[tokens] + wpe[:T] for integer tokens (N, T).   ∂wte[v] = Σ_{tokens = v} ∂x,
    ∂wpe[t] = Σ_n ∂x[n, t]; the tokens get no gradient (backward returns None)."""

    def __init__(self, vocab_size, context, d_model):
        self.vocab_size, self.context, self.d_model = vocab_size, context, d_model

    def __repr__(self):
        return f"Embedding(vocab={self.vocab_size}, context={self.context}, d={self.d_model})"

    def param_shapes(self):
        return {"wte": (self.vocab_size, self.d_model), "wpe": (self.context, self.d_model)}

    def init_params(self, params, rng):
        for name in ("wte", "wpe"):
            params[name][...] = rng.normal(0.0, INIT_STD, params[name].shape)

    def check_tokens(self, tokens, name="tokens"):
        """tokens (or targets: `name`) as an int64 array (N, T), or a TypeError / ValueError
        saying what is wrong."""
        tokens, one = np.asarray(tokens), name[:-1]
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"{name} must have shape (N, T) with N, T >= 1, got {tokens.shape}")
        if tokens.shape[1] > self.context:
            raise ValueError(f"sequence length T={tokens.shape[1]} exceeds the model's context "
                             f"of {self.context}")
        bad = np.argwhere((tokens < 0) | (tokens >= self.vocab_size))
        if len(bad):
            n, t = bad[0]
            raise ValueError(f"{one} {tokens[n, t]} at [{n}, {t}] is outside the vocabulary: "
                             f"{name} must lie in [0, {self.vocab_size})")
        return tokens.astype(np.int64)

    def forward(self, tokens):
        self.tokens = self.check_tokens(tokens)  # a copy: exactly N·T int64 kept
        return self.params["wte"][self.tokens] + self.params["wpe"][:self.tokens.shape[1]]

    def backward(self, dX):
        d_wte, d_wpe = self.grads["wte"], self.grads["wpe"]
        d_wte[...] = 0.0
        np.add.at(d_wte, self.tokens.reshape(-1), dX.reshape(-1, self.d_model))
        d_wpe[...] = 0.0
        d_wpe[:dX.shape[1]] = dX.sum(axis=0)
        return None


class LayerNorm(Layer):
    """y = γ ⊙ x̂ + β with x̂ = (x − μ)/σ, μ and σ² = mean((x − μ)²) over the last axis,
    σ = √(σ² + ε). Keeps x̂ and 1/σ.   ∂γ = Σ ∂y ⊙ x̂, ∂β = Σ ∂y, and with ĝ = γ ⊙ ∂y:
    ∂x = (1/σ)(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))."""

    def __init__(self, d, eps=EPS):
        self.d, self.eps = d, eps

    def __repr__(self):
        return f"LayerNorm({self.d})"

    def param_shapes(self):
        return {"gamma": (self.d,), "beta": (self.d,)}

    def init_params(self, params, rng):
        params["gamma"][...] = 1.0
        params["beta"][...] = 0.0

    def forward(self, X):
        centred = X - X.mean(axis=-1, keepdims=True)
        self.inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + self.eps)
        self.x_hat = centred * self.inv_std
        return self.x_hat * self.params["gamma"] + self.params["beta"]

    def backward(self, dY):
        rows = dY.reshape(-1, self.d)
        self.grads["gamma"][...] = (rows * self.x_hat.reshape(-1, self.d)).sum(axis=0)
        self.grads["beta"][...] = rows.sum(axis=0)
        g = dY * self.params["gamma"]
        return self.inv_std * (g - g.mean(axis=-1, keepdims=True)
                               - self.x_hat * (g * self.x_hat).mean(axis=-1, keepdims=True))


class GELU(Layer):
    """GPT-2's tanh approximation: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³). Keeps x.
    ∂x = ∂y · (½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²))."""

    C, A = math.sqrt(2.0 / math.pi), 0.044715

    def __repr__(self):
        return "GELU()"

    def _tanh_u(self, X):
        """tanh(√(2/π)·x·(1 + 0.044715x²)) in ONE new array (in place: this layer is the widest)."""
        t = X * X
        t *= self.A
        t += 1.0
        t *= X
        t *= self.C
        return np.tanh(t, out=t)

    def forward(self, X):
        self.X = X
        y = self._tanh_u(X)
        y += 1.0
        y *= X
        y *= 0.5
        return y

    def backward(self, dY):
        """With t = tanh u and g = ½x·u': ∂y/∂x = ½(1 + t) + g(1 − t²) = (1 + t)(½ + g(1 − t))."""
        X, t = self.X, self._tanh_u(self.X)
        g = X * X
        g *= 3 * self.A
        g += 1.0
        g *= X
        g *= 0.5 * self.C
        np.subtract(1.0, t, out=t)
        g *= t
        g += 0.5
        np.subtract(2.0, t, out=t)
        g *= t
        g *= dY
        return g
