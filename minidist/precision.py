"""Mixed precision: compute in fp16 or bf16, keep fp32 master weights, scale the loss for fp16.

    precision   the model computes with        its layers store     the optimizer steps
    fp64, fp32  its own weights                 its own dtype        the model's params
    fp16, bf16  the fp32 master, rounded        16-bit arrays        an fp32 master copy

numpy has no fast fp16 or bf16 matmul, so the values are rounded to 16 bits and the arithmetic
runs in fp32, which is also what tensor cores do: 16-bit inputs, products summed in fp32.
Rounded to 16 bits: the weights (the master, after every step), every activation and activation
gradient passed between layers (Sequential's layer boundaries; a composite layer's parts through
`Layer.rounded`) and the parameter gradients. Inside one layer (attention's scores and softmax,
LayerNorm's statistics) the arithmetic stays fp32, as inside a fused kernel. What a layer keeps
for its backward is held as a real float16 / bfloat16 array from its forward until just before
its backward, when it is back in fp32 for that layer alone (and let go after it), so the memory
ledger measures half of fp32's bytes after the forward; a recomputing block rounds what it
rebuilds the same way.

fp16: 5 exponent and 10 mantissa bits, ε = 2⁻¹⁰, largest 65504 (above it: inf), smallest
normal 2⁻¹⁴: small gradients underflow. bf16 (ml_dtypes.bfloat16): fp32's 8 exponent bits with
7 mantissa bits, ε = 2⁻⁷, fp32's range, so it needs no loss scaling (S = 1, as fp32).

Dynamic loss scaling (Micikevicius et al. 2018), fp16 only. Backward starts from S·∂L/∂z, which
lifts the gradients out of fp16's underflow; then, with the 16-bit gradients g:

    any g inf or NaN:   skip the step (master and optimizer state untouched), S ← BACKOFF·S
    else:               step the master with g/S (in fp32); after GROWTH_INTERVAL good steps
                        in a row, S ← GROWTH·S
"""

import contextlib

import ml_dtypes
import numpy as np

from minidist.memory import array_bytes, optimizer_bytes
from minidist.nn.layers import walk

PRECISIONS = {"fp64": np.float64, "fp32": np.float32, "fp16": np.float16,
              "bf16": ml_dtypes.bfloat16}
HALF = ("fp16", "bf16")  # 16-bit compute over fp32 master weights
# Good fp16 steps before S doubles. PyTorch's GradScaler waits 2000 (with backoff 0.5, growth
# 2.0): longer than most runs here, in which its scale could never grow back after a backoff.
GROWTH_INTERVAL = 100
BACKOFF, GROWTH = 0.5, 2.0
LOSS_SCALE = 2.0**16  # fp16's initial S, as PyTorch's GradScaler's
SCALE_RANGE = (2.0**-24, 2.0**127)  # S and 1/S are finite, nonzero fp32 numbers; S grows no
# further than the top


def resolve(precision, dtype):
    """The precision's name: `precision`, or None's, the model dtype's own (float64 → "fp64",
    float32 → "fp32")."""
    if precision is not None:
        return precision
    own = {np.dtype(PRECISIONS[name]): name for name in ("fp64", "fp32")}
    if np.dtype(dtype) not in own:
        raise ValueError(f"a {np.dtype(dtype)} model has no precision of its own: build it "
                         "with dtype=np.float64 or np.float32 (fp16/bf16 keep fp32 master "
                         "weights)")
    return own[np.dtype(dtype)]


class Rounding:
    """What a Sequential calls at its layer boundaries (`model.precision`), and every layer's
    `rounding`: 16-bit values in float32 arrays; `scale`, the loss scale S backward starts from."""

    def __init__(self, dtype, scale=1.0):
        self.dtype, self.scale = np.dtype(dtype), scale
        self._handed = {}  # the array the last forward boundary passed on, and its 16-bit copy

    def __call__(self, x, copy=False):
        """x's values rounded to 16 bits (nearest even; in fp16 above 65504: inf), in place when
        x owns its data (a layer's fresh result), else, or with copy, in a new float32 array.
        Anything but a float32 array is returned as it is."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            return x
        with np.errstate(over="ignore"):
            half = x.astype(self.dtype)
        if copy or not (x.flags.owndata and x.flags.writeable):
            return half.astype(np.float32)
        x[...] = half
        return x

    def forward_boundary(self, parts, out):
        """After `parts` ran forward: store what they keep in 16 bits; return `out` rounded (a
        copy for parts == (): the model's input belongs to the caller). An array the previous
        part kept and passed on stays one array when this part keeps it too."""
        memo = self._handed
        for part in parts:
            _convert(part, np.float32, self.dtype, memo)
        out = self(out, copy=not parts)
        entry = memo.get(id(_root(out)))
        self._handed = {} if entry is None else {id(entry[0]): entry}
        return out

    def backward_boundary(self, part, d):
        """Before `part`'s backward: what it keeps back in float32, the working copies of that
        one backward (a GPU reads the 16-bit arrays directly; Sequential lets go of them after
        it, and the ledger counts the stored 16-bit arrays); ∂L/∂(its output) rounded."""
        _convert(part, self.dtype, np.float32, {})
        return self(d)

    def as_stored(self, parts, watch=None):
        """A recomputing block's rebuilt arrays through the trip a stored block's make: to 16
        bits (then `watch()`, the ledger's look at them), and back to float32 for backward."""
        for part in parts:
            _convert(part, np.float32, self.dtype, {})
        if watch is not None:
            watch()
        for part in parts:
            _convert(part, self.dtype, np.float32, {})

    def loss_gradient(self, criterion):
        """The start of backward: S·∂L/∂z, rounded to 16 bits."""
        _convert(criterion, self.dtype, np.float32, {})
        return self(criterion.backward() * np.float32(self.scale))


def _root(x):
    """The array that owns x's memory (x itself for an owner or a non-array)."""
    while isinstance(getattr(x, "base", None), np.ndarray):
        x = x.base
    return x


def _convert(part, source, target, memo):
    """Replace each `source` array `part` keeps (through its sublayers; never the params and
    grads views) with a `target` copy. memo {id(owner): (owner, its copy)}: a view becomes the
    same view of its owner's copy, so arrays shared before are shared after."""
    for name, value in list(vars(part).items()):
        if name not in ("params", "grads") and isinstance(value, np.ndarray) and \
                value.dtype == source:
            setattr(part, name, _converted(value, target, memo))
    for sub in part.sublayers() if hasattr(part, "sublayers") else ():
        _convert(sub, source, target, memo)


def _converted(x, dtype, memo):
    """x as `dtype`: its owner converted once (memo), x the same view of the copy."""
    root = _root(x)
    if root.dtype != x.dtype or not root.flags.c_contiguous:
        return x.astype(dtype)  # a view of other bytes: copied alone
    if id(root) not in memo:
        memo[id(root)] = (root, root.astype(dtype))
    copy = memo[id(root)][1]
    if x is root:
        return copy
    ratio = copy.itemsize / x.itemsize
    offset = round((x.ctypes.data - root.ctypes.data) * ratio)
    strides = tuple(round(s * ratio) for s in x.strides)
    return np.ndarray(x.shape, copy.dtype, copy, offset, strides)


class MixedPrecision:
    """One rank's precision over a training run: the optimizer (for fp16/bf16 over an fp32
    master copy of the parameters), the loss scale S and what each step did.

    model: a Sequential; make_optimizer(params) builds the optimizer. For fp16/bf16 the model
    gets the rounding hooks (`model.precision`, each layer's `rounding`) and computes with the
    master rounded to 16 bits. fp32/fp64 change nothing: `step` is the optimizer's.
    """

    def __init__(self, model, make_optimizer, precision=None, loss_scale=LOSS_SCALE):
        self.name, self.model = resolve(precision, model.dtype), model
        self.dynamic = self.name == "fp16"  # dynamic loss scaling
        self.rounding, self.master = None, None
        self.grad_dtype = np.dtype(PRECISIONS[self.name])  # the gradients' and all-reduce's
        if self.name in HALF:
            self.rounding = Rounding(self.grad_dtype, float(loss_scale) if self.dynamic else 1.0)
            model.precision = self.rounding
            for layer in walk(model.layers):
                layer.rounding = self.rounding
            self.master = model.params.copy()
            self._round_weights()
        self.optimizer = make_optimizer(self.params)
        self.scales, self.skipped, self.good_steps = [], [], 0

    @property
    def params(self):
        """The parameters the optimizer steps: the fp32 master, or the model's own."""
        return self.model.params if self.master is None else self.master

    @property
    def scale(self):
        """The loss scale S the next step uses (1 but for fp16)."""
        return 1.0 if self.rounding is None else self.rounding.scale

    @contextlib.contextmanager
    def running(self):
        """The run: with fp16, numpy's overflow warnings silenced (a too large S is expected,
        and its step skipped); on the way out, however the run ends, the rounding hooks come off
        the model again (a model that model_fn hands out twice must not keep rounding in a later
        fp32 run)."""
        try:
            with np.errstate(over="ignore", invalid="ignore") if self.dynamic else \
                    contextlib.nullcontext():
                yield self
        finally:
            if self.rounding is not None:
                self.model.precision = None
                for layer in walk(self.model.layers):
                    layer.rounding = None

    def step(self, grads):
        """One step from ∂L/∂θ (times S for fp16) in `grads`, of the model's dtype or already
        16-bit; returns False for a skipped step. A skipped step does not advance the
        optimizer, nor its learning-rate schedule."""
        self.scales.append(self.scale)
        if self.rounding is None:
            self.optimizer.step(grads)
            return True
        # rounded to 16 bits (a 16-bit buffer passes as it is), then in fp32 for the update
        g = self.rounding(grads, copy=True).astype(np.float32, copy=False)
        if self.dynamic and not np.isfinite(g).all():
            self.skipped.append(len(self.scales) - 1)
            self.good_steps, self.rounding.scale = 0, self.scale * BACKOFF
            return False
        if self.dynamic:
            g /= np.float32(self.scale)
            self.good_steps += 1
            if self.good_steps == GROWTH_INTERVAL:
                self.good_steps = 0
                self.rounding.scale = min(self.scale * GROWTH, SCALE_RANGE[1])
        self.optimizer.step(g)
        self._round_weights()
        return True

    def _round_weights(self):
        with np.errstate(over="ignore"):
            self.model.params[...] = self.master.astype(self.grad_dtype)

    def hold(self, ledger, *buffers):
        """Tell `ledger` what this rank holds: the model's params and the master; the model's
        grads and `buffers` (a shared gradient buffer); the optimizer's state."""
        ledger.hold(params=array_bytes(self.model.params, self.master),
                    grads=array_bytes(self.model.grads, *buffers),
                    optimizer=optimizer_bytes(self.optimizer))

    def record(self):
        """For the History: the loss scale each step used, the indices of the skipped steps."""
        return {"loss_scale": np.array(self.scales, dtype=np.float64),
                "skipped_steps": np.array(self.skipped, dtype=np.int64)}
