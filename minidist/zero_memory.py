"""ZeRO's memory on paper: what a replica's model states take per parameter, what a rank of each
ZeRO stage keeps of them, and the peak a rank reaches with the transient buffers on top.

    model_state_bytes        a replica's params, grads, optimizer: ZeRO's 2Ψ + 2Ψ + 12Ψ
    zero_model_state_bytes   the paper's shards per stage, Ψ/N as a real number
    zero_state_bytes         the persistent bytes minidist's ZeRO holds, exactly (padded units)
    zero_moments             activations + transient bytes at each moment the ledger looks at
    zero_peak_bytes          persistent + the fullest moment: `History.memory[r]["peak"]`, exactly

minidist.memory (the ledger that measures what a rank holds) re-exports all of them.
"""

import itertools
from typing import NamedTuple

import numpy as np

from minidist.data import check_integer
from minidist.optim import OPTIMIZERS

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


def _count(name, value):
    """`value` as an int >= 0 (data.check_integer's TypeError or ValueError names `name`)."""
    check_integer(name, value, minimum=0)
    return int(value)


# ---- the peak: the persistent state plus the fullest moment of a step -------------------------

class UnitActivations(NamedTuple):
    """Activation bytes the layers keep at the moments a ZeRO rank's ledger looks (units in
    buckets.units' order, last layer first): `loss` after the loss's forward (the most, the
    ledger's "activations"), forward[k] after unit k's forward, backward[k] after unit k's
    backward (its first layer has let go of its own), begin[k] as unit k's backward begins
    (the loss and the layers after unit k have let go of theirs)."""

    loss: int
    forward: tuple
    backward: tuple
    begin: tuple


def mlp_unit_activations(batch, sizes, unit_list, itemsize=8, label_itemsize=8):
    """UnitActivations of nn.mlp(sizes) (ReLU or Tanh, fused into the Linear before it) on a
    batch of n rows, for its units `unit_list` (buckets.units(model, bucket_bytes): each has
    .first and .last layer indices; Linear l is layer 2l). With p_l = n·(d_0 + … + d_l)·b:

        forward[k]   p_{l+1}, l = unit k's last Linear (the activation keeps its output),
                     p_{L−1} for the last Linear (the logits are the loss's to keep)
        loss         p_L + n·label_itemsize: memory.mlp_activation_bytes
        backward[k]  p_l, l = unit k's first Linear (its input is still the activation's
                     before it), 0 for l = 0 (the batch was Linear 0's alone)
        begin[k]     p_l, l = unit k's last Linear (the inputs of it and the Linears before)
    """
    n = _count("batch", batch)
    d = [_count("sizes", v) for v in sizes]
    if len(d) < 2:
        raise ValueError(f"mlp_unit_activations: sizes needs an input and an output width, "
                         f"got {d}")
    p = [n * int(itemsize) * s for s in itertools.accumulate(d)]
    last = len(d) - 2  # the last Linear's number
    forward, backward, begin = [], [], []
    for unit in unit_list:
        first_l, last_l = (_linear(unit, side, last) for side in ("first", "last"))
        forward.append(p[min(last_l + 1, last)])
        backward.append(p[first_l] if first_l else 0)
        begin.append(p[last_l])
    return UnitActivations(p[-1] + n * int(label_itemsize), tuple(forward), tuple(backward),
                           tuple(begin))


def _linear(unit, side, last):
    """The number l of the Linear at layer index unit.first or unit.last (= 2l) of an mlp."""
    i = getattr(unit, side, None)
    if not isinstance(i, (int, np.integer)) or i < 0 or i % 2 or i // 2 > last:
        raise ValueError(f"mlp_unit_activations: unit_list must hold units of this mlp "
                         f"(buckets.units: {side} an even layer index <= {2 * last}), "
                         f"got {unit!r}")
    return int(i) // 2


def zero_moments(unit_sizes, stage, world_size, itemsize=8, activations=0, overlap=False):
    """{moment: activation + transient bytes} at every moment a rank of minidist's ZeRO shows
    its ledger (Zero.moment), on top of its persistent zero_state_bytes. Units k = 0 … K−1
    (last layer first, as buckets.units): g_k = N·c_k·b bytes of a padded unit, s = Σc·b the
    rank's shard, R_k = Σ_{j<k} (g_j + c_j·b) the reduce-scatters of units before k in flight
    (overlap: each padded copy and its result chunk); F_k, A, B_k, E_k the activations
    (UnitActivations) after unit k's forward, the loss and unit k's backward, and as unit k's
    backward begins. [overlap=True only]:

      stage 0 (data_parallel)  "loss" A
      stage 1   "loss" A;  without overlap, after the backward, unit k's weighted padded ∇
                copy: "reduce k" g_k (+ s from k = 1: the ∇ shard); [instead "backward k"
                B_k + g_k + R_k, in flight until the step]; "∇ shard" s, made by unit 0's
                chunk [+ R_K − R_1: the later units still in flight]; "step" 2s: the working
                copy of my chunks of θ beside the ∇ shard; "gather k" s + g_k: unit k's θ rows
                all-gathered from that copy (the ∇ shard went after the optimizer's step)
      stage 2   "loss" A;  "backward k" E_k + g_k: unit k's temporary gradient, padded, to be
                reduce-scattered [+ R_k]; "step" s: the θ-chunk copy (below every "gather k");
                "gather k" s + g_k
      stage 3   "forward k" F_k + g_k: unit k's gathered θ [+ g_{k−1}: unit k−1's prefetch in
                flight]; "loss" A [+ g_0: unit 0's prefetch for the backward]; "backward k"
                E_k + 2g_k: unit k's gathered θ and its gradient buffer [+ R_k + g_{k+1}: unit
                k+1's prefetch]; "step" 0

    Like PyTorch FSDP's note that its peak holds the largest unit's gathered parameters, the
    largest g_k decides stage 3 (and, with overlap, the neighbours it prefetches).
    activations: UnitActivations (mlp_unit_activations for an MLP) gives each moment exactly;
    an int A (the ledger's "activations", the most held at once) takes A at every moment
    before the backward ends (0 after it: exact for stages 0 and 1 without overlap), a bound
    at most A above the exact one.
    """
    stage, n = check_stage(stage), _ranks(world_size)
    check_integer("itemsize", itemsize, minimum=1)
    if not isinstance(overlap, (bool, np.bool_)):
        raise TypeError(f"overlap must be True or False, got {overlap!r}")
    sizes = unit_counts(unit_sizes)
    F, A, B, E = _moment_activations(activations, len(sizes))
    g = [n * -(-u // n) * int(itemsize) for u in sizes]
    s, K, pre = sum(g) // n, len(g), overlap and stage == 3  # pre: FSDP prefetches
    R = [0, *itertools.accumulate(gj + gj // n for gj in g)] if overlap else [0] * (K + 1)
    moments = {"loss": A + (g[0] if pre and K else 0)}
    if stage == 0:
        return moments
    for k in range(K):
        if stage == 3:
            moments[f"forward {k}"] = F[k] + g[k] + (g[k - 1] if pre and k else 0)
        if stage == 1 and not overlap:
            moments[f"reduce {k}"] = g[k] + (s if k else 0)
        elif stage == 1:
            moments[f"backward {k}"] = B[k] + g[k] + R[k]
        else:
            gathered = g[k] + (g[k + 1] if pre and k + 1 < K else 0) if stage == 3 else 0
            moments[f"backward {k}"] = E[k] + gathered + g[k] + R[k]
    if stage == 1 and K:
        moments["∇ shard"] = s + R[K] - R[1]
    moments["step"] = {1: 2 * s, 2: s, 3: 0}[stage]
    if stage < 3:
        moments.update({f"gather {k}": s + g[k] for k in range(K)})
    return moments


def _moment_activations(activations, n_units):
    """(F, A, B, E) from an int A (A everywhere) or a UnitActivations of n_units units."""
    if isinstance(activations, UnitActivations):
        F, B, E = (list(v) for v in (activations.forward, activations.backward,
                                      activations.begin))
        if not len(F) == len(B) == len(E) == n_units:
            raise ValueError(f"activations: forward, backward and begin need one value per "
                             f"unit ({n_units}), got {len(F)}, {len(B)} and {len(E)}")
        values = [_count("activations", v) for v in (*F, activations.loss, *B, *E)]
        K = n_units
        return values[:K], values[K], values[K + 1:2 * K + 1], values[2 * K + 1:]
    if not isinstance(activations, (int, np.integer)) or isinstance(activations, bool):
        raise TypeError(f"activations must be an integer number of bytes or a "
                        f"UnitActivations, got {activations!r}")
    A = _count("activations", activations)
    return [A] * n_units, A, [A] * n_units, [A] * n_units


def zero_peak_bytes(unit_sizes, stage, world_size, itemsize=8, optimizer="sgd", activations=0,
                    overlap=False):
    """The peak bytes one rank of minidist's ZeRO-`stage` reaches (`History.memory[r]["peak"]`):

        Σ zero_state_bytes(unit_sizes, stage, world_size, itemsize, optimizer)
        + max over the step's moments of (activations + transient)   (zero_moments)

    exactly with activations a UnitActivations (mlp_unit_activations), an upper bound at most
    the int A above it with activations an int. Stage 0 is data_parallel (with or without
    overlap): the state plus A. What lives only inside one op is in neither: a layer's or the
    optimizer's temporaries, the gradient passed from layer to layer in the backward, and a
    reduce-scatter's chunk (c_k·b) between its return (or wait) and its store."""
    state = zero_state_bytes(unit_sizes, stage, world_size, itemsize, optimizer)
    moments = zero_moments(unit_sizes, stage, world_size, itemsize, activations, overlap)
    return sum(state.values()) + max(moments.values())
