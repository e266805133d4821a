"""What one rank of a context-parallel GPT keeps for backward (minidist.parallel.context_parallel),
exactly as the ledger counts it: every activation holds the rank's T_r = T/c positions.

N sequences, d = d_model, H heads, d_ff, V = vocab_size, L blocks; per block

    ln1, ln2                   2·(N·T_r·d + N·T_r)     x̂ and 1/σ
    attention X, Q, K, V, O    5·N·T_r·d
    attention lse              H·N·T_r                 ring attention keeps the log-sum-exp of
                                                       each row, never P (H·N·T² in one rank)
    fc X, GELU X, proj X       N·T_r·d + 2·N·T_r·d_ff

= 8·N·T_r·d + 2·N·T_r·d_ff + (H + 2)·N·T_r; with recompute a block keeps only its input N·T_r·d
and its backward rebuilds one block at a time (the ledger's worst moment: + one whole block).
Also the tokens N·T_r, ln_f N·T_r·d + N·T_r, the head's input N·T_r·d, the probabilities
N·T_r·V and the labels N·T_r (tokens and labels int64). Every term is proportional to T_r, so
c ranks hold exactly 1/c of what context_parallel on one rank holds; against a one-rank GPT
(memory.gpt_activation_elements), c·(rank's − its lse) + P = single's, P = L·H·N·T².

The peak (context_peak_bytes) adds the model states and ring attention's blocks in flight:
a rank sends one block while it receives the next, B = N·T_r·H·d_h·b the bytes of one rank's
K, so 2·2B in a forward pass (K, V) and 2·4B in a backward (K, V, ∂K, ∂V). The backward's
moments come while the layers keep all they kept after the forward (with recompute: the
block inputs and the block rebuilt, the ledger's worst moment), so

    peak = params + grads + optimizer + context_activation_bytes + 8B   (c > 1, L ≥ 1)
"""

from minidist.megatron_memory import INT64_PARTS
from minidist.zero_memory import _count, model_state_bytes


def context_activation_elements(N, T, model, cp=1, load_balance=False, recompute=None):
    """{tokens, blocks, ln_f, head, probs, labels}: the elements a rank of cp = c keeps for
    backward after the forward of N sequences of T tokens (each rank T/c of them; the counts
    are the same on every rank, with or without load_balance). recompute: None for the
    model's own setting. A ValueError if T does not cut into c chunks (2c with load_balance)."""
    from minidist.parallel.ring_attention import chunks

    if not all(hasattr(model, name) for name in ("n_layers", "vocab_size", "d_ff")):
        raise ValueError(f"model must be a GPT (minidist.nn.gpt), got {model!r}")
    N, T, c = _count("N", N), _count("T", T), _count("cp", cp)
    if T > model.context:
        raise ValueError(f"T={T} exceeds the model's context of {model.context}")
    Tr = sum(stop - start for start, stop in chunks(T, c, 0, load_balance))
    d, H = model.d_model, model.n_heads
    recompute = model.recompute if recompute is None else recompute
    block = N * Tr * d if recompute else (8 * N * Tr * d + 2 * N * Tr * model.d_ff
                                          + (H + 2) * N * Tr)
    return {"tokens": N * Tr, "blocks": model.n_layers * block, "ln_f": N * Tr * d + N * Tr,
            "head": N * Tr * d, "probs": N * Tr * model.vocab_size, "labels": N * Tr}


def context_activation_bytes(N, T, model, cp=1, load_balance=False):
    """The most activation bytes a step makes a rank of cp = c hold, as
    `History.memory[r]["activations"]`: context_activation_elements in bytes (tokens and
    labels int64), plus, with recompute, one block rebuilt inside its backward."""
    itemsize = model.dtype.itemsize
    parts = context_activation_elements(N, T, model, cp, load_balance)
    held = sum(n * (8 if part in INT64_PARTS else itemsize) for part, n in parts.items())
    if model.recompute and model.n_layers:
        held += itemsize * context_activation_elements(
            N, T, model, cp, load_balance, recompute=False)["blocks"] // model.n_layers
    return held


def context_peak_bytes(N, T, model, cp=1, load_balance=False, optimizer="sgd"):
    """The peak bytes a rank of cp = c reaches in a step, as `History.memory[r]["peak"]`:
    Ψ·b params + Ψ·b grads + the optimizer's state (model_state_bytes; "sgd" keeps its
    velocity, "adam" m and v) + context_activation_bytes + 8·N·(T/c)·H·d_h·b, the backward's
    two stacked K, V, ∂K, ∂V blocks in flight (0 when c = 1 or without blocks)."""
    precision = {8: "fp64", 4: "fp32"}.get(model.dtype.itemsize)
    if precision is None:
        raise ValueError(f"context_peak_bytes counts float64 or float32 models, got a model "
                         f"of {model.dtype}")
    held = context_activation_bytes(N, T, model, cp, load_balance)
    states = model_state_bytes(model.num_params, precision, optimizer)
    c = int(cp)
    B = N * (T // c) * model.d_model * model.dtype.itemsize  # a GPT's H·d_h = d_model
    return sum(states.values()) + held + (8 * B if c > 1 and model.n_layers else 0)
