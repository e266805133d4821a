"""What a rank holds, in bytes: the ledger behind `History.memory`.

Every figure is counted from the arrays the rank really holds (`nbytes`), never from a formula;
the tests and lessons 10 and 11 compare them with the formulas (ZeRO's 2Ψ + 2Ψ + 12Ψ and its
stages' shards, `zero_model_state_bytes` on paper and `zero_state_bytes` as minidist pads them;
Korthikanti et al.'s activations per layer).

    params, grads, optimizer   the persistent state: the flat buffers and the optimizer's arrays
    activations                the most a step held at once for backward: what the layers keep
                               between their forward and their backward (`activation_bytes`)
    peak                       the worst moment of a step: the persistent state plus the
                               activations at their most (temporaries inside one op are not in
                               the ledger)
"""

import numpy as np

from minidist.data import check_integer
from minidist.errors import OutOfMemory
from minidist.nn.layers import walk
from minidist.optim import OPTIMIZERS

KEYS = ("params", "grads", "optimizer", "activations", "peak")


def array_bytes(*values):
    """Bytes held by the arrays in `values` (arrays, or lists, tuples and dicts of them; other
    values count 0). An array reached twice counts once, and so does a view that spans the same
    bytes (a layer's output kept by the next layer as its input, maybe reshaped). A view counts
    its own bytes: a micro-batch sliced from a batch is the micro-batch's size."""
    return sum(_roots(values, {}).values())


def _roots(values, seen):
    """{(address, nbytes): nbytes} of the arrays in `values`, added to `seen`."""
    for value in values:
        if isinstance(value, np.ndarray):
            seen[(value.__array_interface__["data"][0], value.nbytes)] = int(value.nbytes)
        elif hasattr(value, "__cuda_array_interface__"):
            seen[id(value)] = int(value.nbytes)
        elif isinstance(value, (list, tuple)):
            _roots(value, seen)
        elif isinstance(value, dict):
            _roots(value.values(), seen)
    return seen


def optimizer_bytes(optimizer):
    """The optimizer's state arrays (velocity; Adam's m and v), 0 for none."""
    return 0 if optimizer is None else array_bytes(optimizer.state)


def activation_bytes(parts):
    """Bytes that `parts` (layers, a loss) keep for their backward right now: every array
    attribute, through the sublayers of composite layers, each array once (array_bytes). The
    `params` and `grads` dicts are views of the flat buffers, not activations, and are skipped."""
    kept = [value for part in walk(parts) for name, value in vars(part).items()
            if name not in ("params", "grads")]
    return array_bytes(kept)


def track(parts, ledger, held=0):
    """After a forward: ledger.saw(held + what `parts` keep now), and the same again from
    inside the backward of every recomputing block among them, once it has rebuilt its
    activations (the moment activation checkpointing holds the most). held: bytes kept
    elsewhere meanwhile (a pipeline stage's other micro-batches)."""
    def measure():
        ledger.saw(held + activation_bytes(parts))

    measure()
    for part in parts:
        if getattr(part, "recompute", False):
            part.watch = measure


class Ledger:
    """One rank's memory over a run. Set the persistent state once (`hold`), call `saw` with
    the activation bytes held at each moment they are at their most (after a forward; with a
    pipeline, after each micro-batch's), then `as_dict()` for History.memory.

    budget: None, or the bytes this rank may hold (train's max_memory_per_rank): a moment
    whose peak would pass it raises OutOfMemory naming `rank` and what it held."""

    def __init__(self, budget=None, rank=None):
        self.params = self.grads = self.optimizer = 0
        self.activations = self.peak = 0
        self.budget, self.rank = budget, rank

    def hold(self, params=0, grads=0, optimizer=0):
        """The persistent state, in bytes (array_bytes / optimizer_bytes of what is held)."""
        self.params, self.grads, self.optimizer = int(params), int(grads), int(optimizer)
        self._reach(self.persistent, 0, "in model state")

    @property
    def persistent(self):
        return self.params + self.grads + self.optimizer

    def saw(self, activations, transient=0):
        """Activations held at one moment of a step, and `transient` bytes beside them (ZeRO's
        gathered parameters, a gradient bucket in flight); keeps the largest, and the peak."""
        self._reach(self.persistent + int(activations) + int(transient), int(activations),
                    "during a step")

    def _reach(self, total, activations, when):
        if self.budget is not None and total > self.budget:
            held = {**self.as_dict(), "activations": activations, "peak": total}
            raise OutOfMemory.over(self.rank, held, self.budget, when)
        self.activations = max(self.activations, activations)
        self.peak = max(self.peak, total)

    def as_dict(self):
        """{params, grads, optimizer, activations, peak}: integer bytes."""
        return {key: int(getattr(self, key)) for key in KEYS}


# ---- the formulas the ledger is compared with ------------------------------------------------

# (precision, optimizer) -> bytes per parameter of (params, grads, optimizer state): ZeRO
# (Rajbhandari et al. 2020, §3.1). Mixed precision keeps 16-bit θ and ∇ and, as optimizer
# state, the fp32 master θ with SGD's velocity or Adam's m and v (K = 8 or 12).
MODEL_STATES = {
    ("fp64", "sgd"): (8, 8, 8), ("fp64", "adam"): (8, 8, 16),
    ("fp32", "sgd"): (4, 4, 4), ("fp32", "adam"): (4, 4, 8),
    ("fp16", "sgd"): (2, 2, 8), ("fp16", "adam"): (2, 2, 12),
    ("bf16", "sgd"): (2, 2, 8), ("bf16", "adam"): (2, 2, 12),
}


def model_state_bytes(num_params, precision="fp64", optimizer="sgd", emulated=False):
    """{params, grads, optimizer}: bytes of the model states of Ψ = num_params parameters.

    ZeRO (Rajbhandari et al. 2020): (b_θ + b_∇ + b_opt)·Ψ with fp64 SGD (momentum) 8 + 8 + 8,
    Adam 8 + 8 + 16; fp32 4 + 4 + 4 / 4 + 4 + 8; mixed precision (fp16 or bf16) 2 + 2 + 8 /
    2 + 2 + 12: the fp32 master θ is optimizer state. minidist's SGD keeps its velocity even
    with momentum 0. emulated=True: what minidist's numpy emulation of fp16/bf16 holds instead:
    the 16-bit working copy of θ lives in an fp32 buffer (its values rounded to 16 bits) beside
    the fp32 master, both counted as params (4 + 4), the gradients in fp32 (4), the optimizer
    state in fp32 (4 per state array): 8 + 4 + 4 / 8 + 4 + 8.
    """
    if (precision, optimizer) not in MODEL_STATES:
        raise ValueError(f"model_state_bytes: unknown precision/optimizer {precision!r}/"
                         f"{optimizer!r}; allowed precisions: fp64, fp32, fp16, bf16; "
                         "optimizers: sgd, adam")
    per = MODEL_STATES[(precision, optimizer)]
    if emulated and precision in ("fp16", "bf16"):
        per = (4 + 4, 4, per[2] - 4)  # the master moves from optimizer state to params
    psi = _count("num_params", num_params)
    return dict(zip(("params", "grads", "optimizer"), (b * psi for b in per), strict=True))


# ZeRO stage -> the model states it shards over the N data-parallel ranks (Rajbhandari et al.
# 2020, Fig. 1: P_os, P_os+g, P_os+g+p); stage 0 is plain data parallelism.
ZERO_SHARDED = {0: (), 1: ("optimizer",), 2: ("grads", "optimizer"),
                3: ("params", "grads", "optimizer")}


def check_stage(stage, name="stage"):
    """`stage` as an int in ZERO_SHARDED (0–3): a TypeError or ValueError naming `name`."""
    check_integer(name, stage, minimum=0)
    if stage not in ZERO_SHARDED:
        raise ValueError(f"{name} must be a ZeRO stage 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


def zero_model_state_bytes(num_params, stage, world_size, precision="fp16", optimizer="adam"):
    """{params, grads, optimizer}: the model-state bytes per rank of ZeRO-`stage` over N =
    world_size ranks, the paper's arithmetic (Rajbhandari et al. 2020, Fig. 1) on
    model_state_bytes' per-parameter bytes, K = the optimizer's:

        stage 0  2Ψ + 2Ψ + KΨ         stage 2  2Ψ + (2 + K)Ψ/N
        stage 1  2Ψ + 2Ψ + KΨ/N       stage 3  (2 + 2 + K)Ψ/N

    (with mixed-precision Adam, K = 12). A sharded share Ψ/N need not be whole: it is a real
    number here; zero_state_bytes counts minidist's padded shards exactly."""
    return zero_shard(model_state_bytes(num_params, precision, optimizer), stage, world_size)


def zero_shard(states, stage, world_size):
    """`states` (bytes by category of one whole replica: params, grads, optimizer, ...) as a
    rank of ZeRO-`stage` over world_size ranks keeps them: the categories the stage shards
    (ZERO_SHARDED) divided by N, the others whole."""
    stage, n = check_stage(stage), _ranks(world_size)
    return {key: value / n if key in ZERO_SHARDED[stage] else value
            for key, value in states.items()}


def zero_state_bytes(unit_sizes, stage, world_size, itemsize=8, optimizer="sgd"):
    """{params, grads, optimizer}: the persistent bytes one rank holds under minidist's ZeRO,
    exactly. Units u (elements each) are padded to N·c_u, c_u = ⌈u/N⌉; Ψ = Σu, shard = Σc_u;
    S state arrays (SGD's velocity: 1, Adam's m and v: 2), b = itemsize:

        stage 0  Ψb + 2Ψb + SΨb              (data_parallel: model.grads and the all-reduce
        stage 1  Ψb + Ψb + S·shard·b          buffer it shares with the backend)
        stage 2  Ψb + shard·b + S·shard·b
        stage 3  shard·b + shard·b + S·shard·b
    """
    stage, n = check_stage(stage), _ranks(world_size)
    check_integer("itemsize", itemsize, minimum=1)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"zero_state_bytes: unknown optimizer {optimizer!r}; allowed: "
                         f"{', '.join(OPTIMIZERS)}")
    sizes = unit_counts(unit_sizes)
    psi, shard = sum(sizes), sum(-(-u // n) for u in sizes)
    S = len(OPTIMIZERS[optimizer].state_names)
    whole = {"params": psi, "grads": 2 * psi if stage == 0 else psi, "optimizer": S * psi}
    mine = {"params": shard, "grads": shard, "optimizer": S * shard}
    return {key: int(itemsize) * (mine[key] if key in ZERO_SHARDED[stage] else whole[key])
            for key in whole}


def unit_counts(unit_sizes):
    """unit_sizes (elements per unit: a list, tuple or 1-D array of integers >= 0) as ints."""
    if not isinstance(unit_sizes, (list, tuple, range, np.ndarray)):
        raise TypeError(f"unit_sizes must be a list of element counts, one per unit, got "
                        f"{unit_sizes!r}")
    return [_count("unit_sizes", u) for u in unit_sizes]


def _ranks(world_size):
    """world_size as an int >= 1 (check_integer's errors name it)."""
    check_integer("world_size", world_size, minimum=1)
    return int(world_size)


def transformer_activation_bytes(s, b, h, a, L, bytes_per_value=2, dropout=True,
                                 recompute=False):
    """Bytes a transformer's L layers keep for backward (Korthikanti et al. 2022, §4):
    sequence s, micro-batch b, hidden h, a heads.

    Per layer, at 2 bytes a value and 1-byte dropout masks: s·b·h·(34 + 5·a·s/h), i.e.
    16·sbh + 2·as²b values (the softmax output and its dropout) + 2·sbh + as²b mask bytes.
    Without dropout (no masks; the softmax output serves its backward and P·V):
    16·sbh + as²b values, 32·sbh + 2·as²b bytes. Full recomputation keeps each layer's
    input only: sbh values (2·sbh bytes). Embedding, final LayerNorm, head and loss are not in it.
    """
    s, b, h, a, L = (_count(name, v) for name, v in zip("sbhaL", (s, b, h, a, L), strict=True))
    if recompute:
        per_layer = bytes_per_value * s * b * h
    elif dropout:
        per_layer = bytes_per_value * (16 * s * b * h + 2 * a * s * s * b) + (
            2 * s * b * h + a * s * s * b)
    else:
        per_layer = bytes_per_value * (16 * s * b * h + a * s * s * b)
    return L * per_layer


def mlp_activation_bytes(batch, sizes, activation="relu", itemsize=8, label_itemsize=8,
                         fused=True):
    """Bytes an mlp(sizes) with softmax cross-entropy keeps between its forward and backward
    for a batch of n rows, exactly (minidist.nn's layers):

        n·(d_0 + … + d_{L−1})·itemsize    each Linear's input (an activation's output is the
                                          next Linear's input: one array, counted once)
      + n·d_L·itemsize + n·label_itemsize the loss's probabilities and labels

    fused=False (a ModelShard runs its layers one by one, without Sequential's fused
    Linear + activation): each ReLU also keeps its input, + n·(d_1 + … + d_{L−1})·itemsize
    (a Tanh keeps its output, the next Linear's input: nothing more).
    """
    if activation not in ("relu", "tanh"):
        raise ValueError(f"mlp_activation_bytes: activation must be 'relu' or 'tanh', "
                         f"got {activation!r}")
    n = _count("batch", batch)
    sizes = [_count("sizes", d) for d in sizes]
    if len(sizes) < 2:
        raise ValueError(f"mlp_activation_bytes: sizes needs an input and an output width, "
                         f"got {sizes}")
    values = sum(sizes)  # d_0 … d_{L−1} (Linear inputs) and d_L (probabilities)
    if not fused and activation == "relu":
        values += sum(sizes[1:-1])
    return n * values * itemsize + n * label_itemsize


def _count(name, value):
    """`value` as an int >= 0 (data.check_integer's TypeError or ValueError names `name`)."""
    check_integer(name, value, minimum=0)
    return int(value)


INT64_PARTS = ("tokens", "labels")  # the parts of gpt_activation_elements kept as int64


def gpt_activation_elements(N, T, model):
    """The elements a GPT keeps for backward after model.loss on (N, T) tokens and int64
    targets, by part (`INT64_PARTS` are int64, the rest in the model's dtype). Per block:

        ln1, ln2: x̂ and 1/σ        2·(N·T·d + N·T)
        attention: X, Q, K, V, O    5·N·T·d,  and the softmax P: H·N·T²
        fc: X, GELU: X, proj: X     N·T·d + 2·N·T·d_ff

    = 16·N·T·d + H·N·T² + 2·N·T for d_ff = 4d: Korthikanti et al. (2022)'s 34·sbh + 5·as²b
    bytes (16-bit, dropout masks included) less the masks and dropout outputs, 32·sbh + 2·as²b
    bytes: 16·sbh + as²b elements. With recompute a block keeps only its input, N·T·d, and
    rebuilds the rest, one block at a time, inside backward. Also: the tokens N·T, the final
    LayerNorm N·T·d + N·T, the head's input N·T·d and the loss's probabilities N·T·V and labels
    N·T."""
    d, H = model.d_model, model.n_heads
    block = N * T * d if model.recompute else (
        8 * N * T * d + 2 * N * T * model.d_ff + H * N * T * T + 2 * N * T)
    return {"tokens": N * T, "blocks": model.n_layers * block, "ln_f": N * T * d + N * T,
            "head": N * T * d, "probs": N * T * model.vocab_size, "labels": N * T}
