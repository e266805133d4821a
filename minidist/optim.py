"""Optimizers that update the flat parameter buffer in place, and learning-rate schedules.

    opt = SGD(model.params, lr=0.1, momentum=0.9)
    model.loss_and_grad(X, y)
    opt.step(model.grads)

`lr` is a number or a schedule: a function of the step index t = 0, 1, 2, … returning the rate.
The state arrays live where the parameters live (host, or the GPU for a model on "cuda"), and the
update runs there: `kernels.ops_for(params)`.
"""

import numpy as np

from minidist import kernels


def constant(lr):
    """η_t = η."""
    return lambda t: lr


def linear_warmup(lr, warmup_steps, start_factor=0.0):
    """η_t rises linearly from start_factor·η to η over `warmup_steps`, then stays at η.

    η_t = η · (f + (1 − f) · min(1, (t + 1) / warmup_steps))   (Goyal et al. 2017 use it with
    the linear scaling rule for large batches).
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(t):
        return lr * (start_factor + (1.0 - start_factor) * min(1.0, (t + 1) / warmup_steps))

    return schedule


class Optimizer:
    """Holds a reference to the parameters, a step counter and per-parameter state arrays.

    `ops`: the module whose *_update functions apply the step (default: kernels.ops_for, the
    selected device's or the device the parameters live on)."""

    state_names = ()

    def __init__(self, params, lr, ops=None):
        is_array = isinstance(params, np.ndarray) or kernels.is_device_array(params)
        if not is_array or params.ndim != 1:
            raise ValueError("optimizers take the model's flat 1-D parameter buffer "
                             f"(model.params), got {getattr(params, 'shape', type(params))}")
        self.params, self.ops = params, ops
        self.schedule = lr if callable(lr) else constant(float(lr))
        self.t = 0
        self.state = {name: kernels.zeros_like(params) for name in self.state_names}

    @property
    def lr(self):
        """The rate the next step will use."""
        return self.schedule(self.t)

    def step(self, grads):
        """θ ← update(θ, grads), in place; advances the step counter."""
        if grads.shape != self.params.shape or grads.dtype != self.params.dtype:
            raise ValueError(f"{type(self).__name__}.step: grads are {grads.dtype} "
                             f"{grads.shape}, params are {self.params.dtype} {self.params.shape}")
        self._update(grads, self.lr)
        self.t += 1

    def _ops(self, grads):
        return self.ops if self.ops is not None else kernels.ops_for(self.params, grads)

    def state_dict(self):
        """A copy of everything needed to resume: the step counter and the state arrays."""
        return {"t": self.t, **{k: kernels.to_host(v) for k, v in self.state.items()}}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned (shapes are checked)."""
        missing = {"t", *self.state_names} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        for name in self.state_names:
            if np.shape(state[name]) != self.params.shape:
                raise ValueError(f"state {name!r} has shape {np.shape(state[name])}, "
                                 f"params have {self.params.shape}")
            kernels.assign(self.state[name], state[name])
        self.t = int(state["t"])


class SGD(Optimizer):
    """g = ∇ + λθ;  v ← μv + g;  θ ← θ − η v   (PyTorch's convention; μ = 0 gives θ ← θ − η g)."""

    state_names = ("velocity",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, ops=None):
        super().__init__(params, lr, ops)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, "
                             f"got {momentum}, {weight_decay}")
        self.momentum, self.weight_decay = momentum, weight_decay

    def _update(self, grads, lr):
        self._ops(grads).sgd_update(self.params, grads, self.state["velocity"], lr,
                                    self.momentum, self.weight_decay)


class Adam(Optimizer):
    """m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − η m̂/(√v̂ + ε), bias-corrected."""

    state_names = ("m", "v")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, ops=None):
        super().__init__(params, lr, ops)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        self.betas, self.eps = tuple(betas), eps

    def _update(self, grads, lr):
        self._ops(grads).adam_update(self.params, grads, self.state["m"], self.state["v"], lr,
                                     *self.betas, self.eps, self.t + 1)


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make(name, params, lr, **options):
    """Build an optimizer by name ("sgd" or "adam")."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr, **options)
