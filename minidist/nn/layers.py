"""The layer interface and the MLP's layers: Linear, ReLU, Tanh (explicit forward and backward).

A layer's parameters are views into its model's flat buffers (`bind`); it keeps, as its own
array attributes, what its backward needs (the activations), and a composite layer lists its
parts in `sublayers()`, so a pipeline stage can save and restore a micro-batch's activations
and the memory ledger can count them, for any layer.
"""

import numpy as np

from minidist import kernels


class Layer:
    """A function with explicit backward. Parameterless by default.

    `rounding`: None, or the function mixed precision sets (minidist.precision) to round
    activations and their gradients to 16 bits; a composite layer applies it, through
    `rounded`, between its parts."""

    rounding = None

    def rounded(self, x):
        """x, or x rounded to the compute precision when mixed precision set `rounding`."""
        return x if self.rounding is None else self.rounding(x)

    def param_shapes(self):
        """{name: shape} of this layer's parameters, in buffer order."""
        return {}

    def init_params(self, params, rng):
        """Fill the parameter views with initial values."""

    def bind(self, params, grads):
        """Receive {name: view} into the model's flat parameter and gradient buffers."""
        self.params, self.grads = params, grads

    def sublayers(self):
        """The layers this one is made of (a transformer block's parts); none by default."""
        return []

    def forward(self, X):
        raise NotImplementedError

    def backward(self, dY):
        """Given ∂L/∂Y, write ∂L/∂θ into the gradient views and return ∂L/∂X."""
        raise NotImplementedError


def walk(layers):
    """Every layer of `layers` and, recursively, its sublayers (None skipped)."""
    for layer in layers:
        if layer is not None:
            yield layer
            yield from walk(layer.sublayers() if hasattr(layer, "sublayers") else [])


def drop_activations(layers):
    """Let go of every array `layers` (and their sublayers) keep for backward: after their
    backward, or when recomputation will rebuild them. The params/grads views stay."""
    for layer in walk(layers):
        for name, value in list(vars(layer).items()):
            if isinstance(value, np.ndarray):
                setattr(layer, name, None)


class Linear(Layer):
    """Y = X W + b, with W of shape (d_in, d_out).   ∂W = Xᵀ∂Y, ∂b = Σ_n ∂Y, ∂X = ∂Y Wᵀ.

    X may have leading dimensions, (N, T, d_in) for a sequence: they are rows of one matmul."""

    def __init__(self, d_in, d_out, gain=2.0):
        if d_in < 1 or d_out < 1:
            raise ValueError(f"Linear needs positive sizes, got d_in={d_in}, d_out={d_out}")
        self.d_in, self.d_out, self.gain = int(d_in), int(d_out), gain

    def __repr__(self):
        return f"Linear({self.d_in}→{self.d_out})"

    def param_shapes(self):
        return {"W": (self.d_in, self.d_out), "b": (self.d_out,)}

    def init_params(self, params, rng):
        """W ~ N(0, gain/d_in) (He init for gain 2, LeCun for gain 1); b = 0."""
        params["W"][...] = rng.normal(0.0, np.sqrt(self.gain / self.d_in), (self.d_in, self.d_out))
        params["b"][...] = 0.0

    def forward(self, X, activation=None):
        """Y = XW + b, or act(XW + b) in one fused pass with activation "relu" or "tanh"."""
        W = self.params["W"]
        is_array = isinstance(X, np.ndarray) or kernels.is_device_array(X)
        if not is_array or X.ndim < 2 or tuple(X.shape)[-1] != self.d_in:  # a tuple: the
            # CUDA simulator's shapes take no negative index
            shape = getattr(X, "shape", type(X).__name__)
            raise ValueError(f"{self} expects input of shape (N, {self.d_in}) or "
                             f"(N, T, {self.d_in}), got {shape}")
        if X.dtype != W.dtype:
            raise ValueError(
                f"{self} holds {W.dtype} weights but got {X.dtype} input of shape {X.shape}; "
                f"convert it with X.astype(np.{W.dtype})"
            )
        K = kernels.ops_for(X, W)
        if kernels.is_device_array(W):
            X = K.to_device(X)  # the batch crosses to the GPU once, for forward and backward
        lead = tuple(X.shape)[:-1]
        self.X = X if X.ndim == 2 else X.reshape(-1, self.d_in)
        Y = K.add_bias(K.matmul(self.X, W), self.params["b"], activation)
        return Y if X.ndim == 2 else Y.reshape(*lead, self.d_out)

    def backward(self, dY):
        self.param_grads(dY)
        dX = kernels.ops_for(dY).matmul_nt(dY.reshape(-1, self.d_out), self.params["W"])
        return dX if dY.ndim == 2 else dX.reshape(*tuple(dY.shape)[:-1], self.d_in)

    def param_grads(self, dY):
        """Only ∂W and ∂b: what the first layer needs (nobody asks for ∂X of the data)."""
        dY = dY if dY.ndim == 2 else dY.reshape(-1, self.d_out)
        K = kernels.ops_for(self.X, dY)
        kernels.assign(self.grads["W"], K.matmul_tn(self.X, dY))
        kernels.assign(self.grads["b"], K.sum_rows(dY))


class ReLU(Layer):
    """Y = max(X, 0).   ∂X = ∂Y · 1[X > 0]  (= 1[Y > 0], so the fused forward may keep Y)."""

    name = "relu"

    def __repr__(self):
        return "ReLU()"

    def forward(self, X):
        self.X = X
        return kernels.ops_for(X).relu(X)

    def keep_fused_output(self, Y):
        """After Linear fused this activation into its bias add: keep what backward needs."""
        self.X = Y
        return Y

    def backward(self, dY):
        return kernels.ops_for(dY, self.X).relu_backward(dY, self.X)


class Tanh(Layer):
    """Y = tanh(X).   ∂X = ∂Y · (1 − Y²)."""

    name = "tanh"

    def __repr__(self):
        return "Tanh()"

    def forward(self, X):
        self.Y = kernels.ops_for(X).tanh(X)
        return self.Y

    def keep_fused_output(self, Y):
        """After Linear fused this activation into its bias add: keep what backward needs."""
        self.Y = Y
        return Y

    def backward(self, dY):
        return kernels.ops_for(dY, self.Y).tanh_backward(dY, self.Y)
