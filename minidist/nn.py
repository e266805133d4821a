"""Layers with explicit forward and backward, over ONE flat parameter buffer.

A `Sequential` model owns two 1-D arrays, `params` and `grads`. Each layer's weights are views
into them, laid out layer by layer, and within a layer in the order of `param_shapes()`
(row-major). So an all-reduce of the gradients is one call, a bucket is a slice, a
parameter-server shard is a slice and a checkpoint is one array.

    model = mlp([64, 128, 10], seed=0)
    loss = model.loss_and_grad(X, y)     # fills model.grads with ∂L/∂θ
    model.params -= 0.1 * model.grads    # one gradient-descent step

A model built with device="cuda" (or after `kernels.use("cuda")`) holds `params` and `grads` as
device arrays: activations and gradients stay on the GPU, only the input batch goes over and the
loss (one number) comes back. Each op comes from `kernels.ops_for(...)` of its inputs, so a layer
runs wherever its data lives.
"""

import numpy as np

from minidist import kernels


class Layer:
    """A function with explicit backward. Parameterless by default."""

    def param_shapes(self):
        """{name: shape} of this layer's parameters, in buffer order."""
        return {}

    def init_params(self, params, rng):
        """Fill the parameter views with initial values."""

    def bind(self, params, grads):
        """Receive {name: view} into the model's flat parameter and gradient buffers."""
        self.params, self.grads = params, grads

    def forward(self, X):
        raise NotImplementedError

    def backward(self, dY):
        """Given ∂L/∂Y, write ∂L/∂θ into the gradient views and return ∂L/∂X."""
        raise NotImplementedError


class Linear(Layer):
    """Y = X W + b, with W of shape (d_in, d_out).   ∂W = Xᵀ∂Y, ∂b = Σ_n ∂Y, ∂X = ∂Y Wᵀ."""

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
        if not is_array or X.ndim != 2 or X.shape[1] != self.d_in:
            shape = getattr(X, "shape", type(X).__name__)
            raise ValueError(f"{self} expects input of shape (N, {self.d_in}), got {shape}")
        if X.dtype != W.dtype:
            raise ValueError(
                f"{self} holds {W.dtype} weights but got {X.dtype} input of shape {X.shape}; "
                f"convert it with X.astype(np.{W.dtype})"
            )
        K = kernels.ops_for(X, W)
        if kernels.is_device_array(W):
            X = K.to_device(X)  # the batch crosses to the GPU once, for forward and backward
        self.X = X
        return K.add_bias(K.matmul(X, W), self.params["b"], activation)

    def backward(self, dY):
        self.param_grads(dY)
        return kernels.ops_for(dY).matmul_nt(dY, self.params["W"])

    def param_grads(self, dY):
        """Only ∂W and ∂b: what the first layer needs (nobody asks for ∂X of the data)."""
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


class MSELoss:
    """L = (1/2N) Σ_n ‖ŷ_n − y_n‖².   ∂L/∂ŷ = (ŷ − y)/N.   y may be (N,) when ŷ is (N, 1)."""

    def __repr__(self):
        return "MSELoss()"

    def forward(self, pred, target):
        target = np.asarray(target)
        if target.ndim == 1 and pred.shape[1] == 1:
            target = target[:, None]
        if target.shape != pred.shape:
            raise ValueError(f"{self}: prediction has shape {pred.shape}, target {target.shape}")
        K = kernels.ops_for(pred)
        loss, self.residual = K.mse(pred, target.astype(pred.dtype, copy=False))
        return loss

    def backward(self):
        return kernels.ops_for(self.residual).mse_backward(self.residual)

    def predict(self, out):
        return out[:, 0] if out.shape[1] == 1 else out


class SoftmaxCrossEntropy:
    """L = (1/N) Σ_n −log softmax(z_n)[y_n], computed with a stable log-sum-exp.

    ∂L/∂z_n = (softmax(z_n) − onehot(y_n)) / N.
    """

    def __repr__(self):
        return "SoftmaxCrossEntropy()"

    def forward(self, logits, labels):
        labels = np.asarray(labels)
        n, k = logits.shape
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{self} expects integer labels of shape ({n},), got {labels.dtype} {labels.shape}"
            )
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{self}: labels must lie in [0, {k}), got [{labels.min()}, "
                             f"{labels.max()}]")
        K = kernels.ops_for(logits)
        if kernels.is_device_array(logits):
            labels = K.to_device(labels, np.int64)  # over once, for forward and backward
        self.labels = labels
        loss, self.probs = K.softmax_cross_entropy(logits, labels)
        return loss

    def backward(self):
        K = kernels.ops_for(self.probs)
        return K.softmax_cross_entropy_backward(self.probs, self.labels)

    def predict(self, logits):
        return logits.argmax(axis=1)


class Sequential:
    """Layers applied in order, then a loss; all parameters in one flat buffer `params`.

    device: "numpy" or "cuda" (default: the one `kernels.use` selected). On "cuda" the buffers
    are initialised on the host (same values as on numpy) and copied to the device once.
    """

    def __init__(self, layers, loss, seed=0, dtype=np.float64, device=None):
        self.layers, self.criterion = list(layers), loss
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"model dtype must be a float type, got {self.dtype}")
        self.device = kernels.resolve(device)
        sizes = [int(np.prod(s)) for layer in self.layers for s in layer.param_shapes().values()]
        self._params = np.zeros(sum(sizes), dtype=self.dtype)
        self._grads = np.zeros_like(self._params)
        self.slices = {}  # "index.name" -> slice of the flat buffer
        offset = 0
        rng = np.random.default_rng(seed)
        for i, layer in enumerate(self.layers):
            p_views, g_views = {}, {}
            for name, shape in layer.param_shapes().items():
                size = int(np.prod(shape))
                self.slices[f"{i}.{name}"] = slice(offset, offset + size)
                p_views[name] = self._params[offset:offset + size].reshape(shape)
                g_views[name] = self._grads[offset:offset + size].reshape(shape)
                offset += size
            layer.bind(p_views, g_views)
            layer.init_params(p_views, rng)
        if self.device == "cuda":
            self._to_device()

    def _to_device(self):
        """Move both buffers to the GPU and re-bind every layer to views of them there."""
        K = kernels.ops("cuda")
        self._params, self._grads = K.to_device(self._params), K.zeros(self._grads.shape,
                                                                       self.dtype)
        for i, layer in enumerate(self.layers):
            views = [{}, {}]
            for name, shape in layer.param_shapes().items():
                part = self.slices[f"{i}.{name}"]
                views[0][name] = self._params[part].reshape(shape)
                views[1][name] = self._grads[part].reshape(shape)
            layer.bind(*views)

    def __repr__(self):
        body = ", ".join(map(repr, self.layers))
        return f"Sequential([{body}], loss={self.criterion}, params={self.num_params})"

    @property
    def num_params(self):
        return self._params.size

    @property
    def params(self):
        """The flat parameter buffer (1-D). Assigning to it copies into the buffer."""
        return self._params

    @params.setter
    def params(self, values):
        kernels.assign(self._params, self._check_flat(values, "params"))

    @property
    def grads(self):
        """The flat gradient buffer, same shape as `params`."""
        return self._grads

    @grads.setter
    def grads(self, values):
        kernels.assign(self._grads, self._check_flat(values, "grads"))

    def _check_flat(self, values, what):
        values = values if kernels.is_device_array(values) else np.asarray(values)
        if values.shape != self._params.shape:
            raise ValueError(f"{what} must have shape {self._params.shape}, got {values.shape}")
        return values

    def forward(self, X):
        """The model's raw output (logits or predictions), shape (N, d_out).

        A Linear followed by ReLU or Tanh runs as one op, act(XW + b): on a GPU the bias add and
        the activation share one pass over memory (numpy computes the same numbers either way).
        """
        i, layers = 0, self.layers
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if type(layer) is Linear and type(after) in (ReLU, Tanh):
                X = after.keep_fused_output(layer.forward(X, activation=after.name))
                i += 2
            else:
                X = layer.forward(X)
                i += 1
        return X

    def loss(self, X, y):
        """Mean loss over the batch, without touching `grads`."""
        return self.criterion.forward(self.forward(X), y)

    def loss_and_grad(self, X, y):
        """Mean loss over the batch; overwrites `grads` with its gradient."""
        loss = self.criterion.forward(self.forward(X), y)
        self.backward()
        return loss

    def backward(self, input_grad=False):
        """After `loss(X, y)`: overwrite `grads` with the gradient of that loss; with
        input_grad, also return ∂L/∂X (skipped otherwise: for a first Linear layer it costs
        as much as ∂W)."""
        d = self.criterion.backward()
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if i == 0 and not input_grad and isinstance(layer, Linear):
                layer.param_grads(d)
                return None
            d = layer.backward(d)
        return d

    def predict(self, X):
        """Class labels for a classifier, values (N,) for a one-output regression."""
        out = self.forward(X)
        return self.criterion.predict(kernels.to_host(out) if kernels.is_device_array(out) else out)

    def accuracy(self, X, y):
        """Fraction of correct class predictions."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


_ACTIVATIONS = {"relu": (ReLU, 2.0), "tanh": (Tanh, 1.0)}


def mlp(sizes, activation="relu", seed=0, dtype=np.float64, device=None):
    """A multilayer perceptron sizes[0] → … → sizes[-1] with softmax cross-entropy."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(_ACTIVATIONS)}")
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got sizes={sizes}")
    act, gain = _ACTIVATIONS[activation]
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        layers.append(Linear(d_in, d_out, gain=1.0 if last else gain))
        if not last:
            layers.append(act())
    return Sequential(layers, SoftmaxCrossEntropy(), seed=seed, dtype=dtype, device=device)


def linear_regression(d, seed=0, dtype=np.float64, device=None):
    """ŷ = x·w + b with the loss (1/2N) Σ (ŷ − y)²."""
    return Sequential([Linear(d, 1, gain=1.0)], MSELoss(), seed=seed, dtype=dtype, device=device)


def logistic_regression(d, k, seed=0, dtype=np.float64, device=None):
    """Multinomial logistic regression: softmax(x W + b) over k classes, cross-entropy loss."""
    return Sequential([Linear(d, k, gain=1.0)], SoftmaxCrossEntropy(), seed=seed, dtype=dtype,
                      device=device)
