"""What a rank holds, in bytes: the ledger behind `History.memory`.

Every figure is counted from the arrays the rank really holds (`nbytes`), never from a formula;
the tests and lessons 10 and 11 compare them with the formulas (ZeRO's 2Ψ + 2Ψ + 12Ψ and its
stages' shards, `zero_model_state_bytes` on paper, `zero_state_bytes` as minidist pads them and
`zero_peak_bytes` with its transient buffers, all from minidist.zero_memory and re-exported
here; Korthikanti et al.'s activations per layer, below; a Megatron-split GPT's parameters and
activations per rank from minidist.megatron_memory, re-exported too).

    params, grads, optimizer   the persistent state: the flat buffers and the optimizer's arrays
    activations                the most a step held at once for backward: what the layers keep
                               between their forward and their backward (`activation_bytes`)
    peak                       the worst moment of a step: the persistent state plus the
                               activations and the transient buffers held then (ZeRO's gathered
                               units, gradients in flight; temporaries inside one op are not in
                               the ledger)
"""

import numpy as np

from minidist.context_memory import (  # noqa: F401  (re-exported: a context-parallel GPT's)
    context_activation_bytes,
    context_activation_elements,
    context_peak_bytes,
)
from minidist.errors import OutOfMemory
from minidist.expert_cost import expert_parallel_param_bytes  # noqa: F401  (re-exported)
from minidist.megatron_memory import (  # noqa: F401  (re-exported, as zero_memory's are)
    INT64_PARTS,  # the parts of gpt_activation_elements kept as int64, too
    megatron_activation_bytes,
    megatron_activation_elements,
    megatron_param_elements,
)
from minidist.nn.layers import walk
from minidist.zero_memory import (  # noqa: F401  (re-exported: memory.zero_state_bytes, ...)
    MODEL_STATES,
    ZERO_SHARDED,
    UnitActivations,
    _count,
    check_stage,
    mlp_unit_activations,
    model_state_bytes,
    unit_counts,
    zero_model_state_bytes,
    zero_moments,
    zero_peak_bytes,
    zero_shard,
    zero_state_bytes,
)

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
    if getattr(model, "n_experts", None):
        raise ValueError("gpt_activation_elements counts a dense GPT's blocks; this model's "
                         "blocks are mixtures of experts (minidist.nn.moe), whose activations "
                         "depend on the routing")
    d, H = model.d_model, model.n_heads
    block = N * T * d if model.recompute else (
        8 * N * T * d + 2 * N * T * model.d_ff + H * N * T * T + 2 * N * T)
    return {"tokens": N * T, "blocks": model.n_layers * block, "ln_f": N * T * d + N * T,
            "head": N * T * d, "probs": N * T * model.vocab_size, "labels": N * T}
