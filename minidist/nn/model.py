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

import contextlib

import numpy as np

from minidist import kernels
from minidist.nn.layers import Linear, ReLU, Tanh, drop_activations
from minidist.nn.losses import MSELoss, SoftmaxCrossEntropy


class Sequential:
    """Layers applied in order, then a loss; all parameters in one flat buffer `params`.

    device: "numpy" or "cuda" (default: the one `kernels.use` selected). On "cuda" the buffers
    are initialised on the host (same values as on numpy) and copied to the device once.
    precision: None, or mixed precision's hooks (minidist.precision.Rounding), called at every
    layer boundary: forward stores what the layers keep in 16 bits and rounds what passes on;
    backward restores a layer's arrays (in fp32) before its backward and lets go of them after
    it, starts from the scaled loss gradient and rounds each activation gradient.
    """

    precision = None
    hooks = None  # a UnitHooks (below): what sharded data parallelism does around each layer

    def __init__(self, layers, loss, seed=0, dtype=np.float64, device=None):
        self.layers, self.criterion = list(layers), loss
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"model dtype must be a float type, got {self.dtype}")
        self.device = kernels.resolve(device)
        sizes = [int(np.prod(s)) for layer in self.layers for s in layer.param_shapes().values()]
        self._num_params = sum(sizes)
        self._params = np.zeros(self._num_params, dtype=self.dtype)
        self._grads = np.zeros_like(self._params)
        self.slices = {}  # "index.name" -> slice of the flat buffer
        self.layer_slices = []  # layer i's parameters: the slice layer_slices[i] (maybe empty)
        offset = 0
        rng = np.random.default_rng(seed)
        for i, layer in enumerate(self.layers):
            p_views, g_views, first = {}, {}, offset
            for name, shape in layer.param_shapes().items():
                size = int(np.prod(shape))
                self.slices[f"{i}.{name}"] = slice(offset, offset + size)
                p_views[name] = self._params[offset:offset + size].reshape(shape)
                g_views[name] = self._grads[offset:offset + size].reshape(shape)
                offset += size
            self.layer_slices.append(slice(first, offset))
            layer.bind(p_views, g_views)
            layer.init_params(p_views, rng)
        if self.device == "cuda":
            self._to_device()

    def bind_layer(self, i, params, grads):
        """Point layer i's parameter and gradient views into `params` and `grads`: 1-D arrays
        the size of layer_slices[i] (None: leave that side as it is). Sharded training binds a
        layer to buffers it gathers, and lets them go, one unit at a time."""
        part = self.layer_slices[i]
        views = []
        for flat, side in ((params, "params"), (grads, "grads")):
            if flat is None:
                views.append(getattr(self.layers[i], side, {}))
                continue
            if flat.shape != (part.stop - part.start,):
                raise ValueError(f"bind_layer({i}): {side} must have shape "
                                 f"{(part.stop - part.start,)}, got {flat.shape}")
            views.append({name: flat[self.slices[f"{i}.{name}"].start - part.start:
                                     self.slices[f"{i}.{name}"].stop - part.start].reshape(shape)
                          for name, shape in self.layers[i].param_shapes().items()})
        self.layers[i].bind(*views)

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
        return self._num_params

    def release(self, buffer):
        """Drop the model's own flat "params" or "grads" buffer: sharded training (ZeRO) keeps
        pieces of it elsewhere and points the layers at them with bind_layer, so that nothing
        holds the whole buffer any more. num_params still answers."""
        if buffer not in ("params", "grads"):
            raise ValueError(f"release takes 'params' or 'grads', got {buffer!r}")
        setattr(self, f"_{buffer}", None)

    def restore(self, params):
        """After release: whole buffers again, `params` a copy of the given θ and `grads` zero,
        every layer bound to views of them (a sharded run hands its model back whole)."""
        self._params = np.array(params, dtype=self.dtype)
        self._grads = np.zeros_like(self._params)
        for i, part in enumerate(self.layer_slices):
            self.bind_layer(i, self._params[part], self._grads[part])

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
        i, layers, hooks = 0, self.layers, self.precision
        if hooks is not None:
            X = hooks.forward_boundary((), X)
        units = self.hooks
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if units is not None:
                units.before_forward(i)
            if type(layer) is Linear and type(after) in (ReLU, Tanh):
                X = after.keep_fused_output(layer.forward(X, activation=after.name))
                ran = layers[i:i + 2]
            else:
                X, ran = layer.forward(X), layers[i:i + 1]
            if units is not None:
                units.after_forward(i)
            i += len(ran)
            if hooks is not None:
                X = hooks.forward_boundary(ran, X)
        return X

    def loss(self, X, y):
        """Mean loss over the batch, without touching `grads`."""
        loss = self.criterion.forward(self.forward(X), y)
        if self.precision is not None:
            self.precision.forward_boundary((self.criterion,), None)
        return loss

    def loss_and_grad(self, X, y):
        """Mean loss over the batch; overwrites `grads` with its gradient."""
        loss = self.loss(X, y)
        self.backward()
        return loss

    def backward(self, input_grad=False):
        """After `loss(X, y)`: overwrite `grads` with the gradient of that loss; with
        input_grad, also return ∂L/∂X (skipped otherwise: for a first Linear layer it costs
        as much as ∂W)."""
        hooks = self.precision
        if hooks is None:
            d = self.criterion.backward()
        else:
            d = hooks.loss_gradient(self.criterion)
            drop_activations([self.criterion])
        units = self.hooks
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if hooks is not None:
                d = hooks.backward_boundary(layer, d)
            if units is not None:
                units.before_backward(i)
            if i == 0 and not input_grad and isinstance(layer, Linear):
                layer.param_grads(d)
                d = None
            else:
                d = layer.backward(d)
            if units is not None:
                units.after_backward(i)
            if hooks is not None:
                drop_activations([layer])  # its fp32 copies: done with them
            if d is None:
                return None
        return d

    def predict(self, X):
        """Class labels for a classifier, values (N,) for a one-output regression."""
        out = self.forward(X)
        return self.criterion.predict(kernels.to_host(out) if kernels.is_device_array(out) else out)

    def accuracy(self, X, y):
        """Fraction of correct class predictions."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


class UnitHooks:
    """What a Sequential calls around each layer i when `model.hooks` is set: before and after
    its forward (a Linear fused with its activation counts as the Linear's index), before and
    after its backward (after_backward(i): layer i's gradients are written). Data parallelism
    launches a bucket's all-reduce from after_backward; ZeRO-3 gathers a unit's parameters in
    before_forward and before_backward and frees them after. The defaults do nothing."""

    @contextlib.contextmanager
    def attached(self, model):
        """These hooks on `model` for a run, and its earlier ones back however the run ends
        (a model that model_fn hands out twice must not keep them)."""
        before, model.hooks = model.hooks, self
        try:
            yield self
        finally:
            model.hooks = before

    def before_forward(self, i):
        pass

    def after_forward(self, i):
        pass

    def before_backward(self, i):
        pass

    def after_backward(self, i):
        pass


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
