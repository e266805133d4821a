"""What one rank of a Megatron-split GPT holds (minidist.parallel.megatron), exactly as the
ledger counts it: its parameters, and the activations one micro-batch leaves for backward.

t = tp ranks, rank k; d = d_model, H heads, d_ff, V = vocab_size, C = context; the vocabulary
split V_k = hi − lo with (lo, hi) = shard_bounds(V, k, t) (V need not divide by t).

    parameters   embedding V_k·d + C·d          (wte rows; wpe whole)
                 block     4d + 4d²/t + 3d/t + d + 2·d·d_ff/t + d_ff/t + d
                           (LayerNorms 4d whole; W_qkv, b_qkv, W_o by heads; b_o whole;
                           fc by columns, proj by rows, b_proj whole)
                 ln_f 2d,  head d·V_k + V_k

    activations  (N sequences of T; T_l = T/t under sequence parallelism, else T)
                 per block  2(N·T_l·d + N·T_l)        ln1, ln2: x̂ and 1/σ
                            + 2·N·T_l·d               the inputs QKV and fc keep (their own
                                                      chunk, under sequence parallelism)
                            + 4·N·T·d/t + (H/t)·N·T²  Q, K, V, O and P of the local heads
                            + 2·N·T·d_ff/t            GELU's and proj's inputs
                 recompute: a block keeps its input, N·T_l·d, and its backward rebuilds one
                 block at a time (the ledger's worst moment: + one whole block)
                 tokens N·T, ln_f N·T_l·d + N·T_l, head N·T_l·d, probabilities N·T·V_k,
                 labels N·T (tokens and labels int64: `INT64_PARTS`)

With t = 1 these are memory.gpt_activation_elements; with sequence parallelism every term but
the tokens and labels is 1/t of it (Korthikanti et al. 2022: sbh(34 + 5as/h)/t).
"""

from minidist.data import is_integer, shard_bounds
from minidist.zero_memory import _count

INT64_PARTS = ("tokens", "labels")  # the parts of the activation counts kept as int64


def layer_parts(model, tp=1, rank=0, layers=None, seq_len=None, sequence_parallel=False):
    """(has the embedding, number of blocks, has ln_f, has the head) among a GPT `model`'s
    layers [a, b) = `layers` (None: all), after checking that the layout can run: a ValueError
    naming the first thing that cannot (the split of heads, d_ff or the vocabulary over tp,
    the rank, the layer range, seq_len against the context and, under sequence parallelism,
    against tp), as train() would before any rank starts."""
    from minidist.parallel.tensor_parallel import check_sequence_parallel, check_split

    if not all(hasattr(model, name) for name in ("n_layers", "vocab_size", "layers")):
        raise ValueError(f"model must be a GPT (minidist.nn.gpt), got {model!r}")
    if getattr(model, "n_experts", None):
        raise ValueError("the Megatron formulas count dense GPT blocks; a mixture-of-experts "
                         "GPT is not split by tensor parallelism")
    t, n = _count("tp", tp), len(model.layers)
    if not (is_integer(rank) and 0 <= rank < t):
        raise ValueError(f"rank must be an integer in [0, {t}) for tp={t}, got {rank!r}")
    a, b = (0, n) if layers is None else layers
    if not (is_integer(a) and is_integer(b) and 0 <= a < b <= n):
        raise ValueError(f"layers must be (start, stop) with 0 <= start < stop <= {n}, the "
                         f"model's layers, got {layers!r}")
    check_split(model.layers, t, int(a), int(b))
    if seq_len is not None:
        T = _count("seq_len", seq_len)
        if T > model.context:
            raise ValueError(f"seq_len={T} exceeds the model's context of {model.context}")
        if sequence_parallel and t > 1:
            check_sequence_parallel(model.layers, t, T)
    L = model.n_layers
    blocks = max(0, min(b, L + 1) - max(a, 1))
    return a == 0, blocks, a <= L + 1 < b, b == L + 3


def _vocab(model, tp, rank):
    lo, hi = shard_bounds(model.vocab_size, rank, tp)
    return hi - lo


def megatron_param_elements(model, tp=1, rank=0, layers=None):
    """{embedding, blocks, ln_f, head}: the parameters tp-rank `rank` of t = tp holds of a GPT
    `model`'s layers [a, b) = `layers` (None: all), by part (see the module's formulas)."""
    embedding, blocks, ln_f, head = layer_parts(model, tp, rank, layers)
    t, d, d_ff, C = int(tp), model.d_model, model.d_ff, model.context
    V_k = _vocab(model, t, rank)
    block = 4 * d + 4 * d * d // t + 3 * d // t + d + 2 * d * d_ff // t + d_ff // t + d
    return {"embedding": embedding * (V_k * d + C * d), "blocks": blocks * block,
            "ln_f": ln_f * 2 * d, "head": head * (d * V_k + V_k)}


def megatron_activation_elements(N, T, model, tp=1, sequence_parallel=False, rank=0,
                                 layers=None, recompute=None):
    """{tokens, blocks, ln_f, head, probs, labels}: the elements one micro-batch of N sequences
    of T tokens leaves for backward on tp-rank `rank`'s layers [a, b) = `layers` (the ledger's
    count after that micro-batch's forward; `INT64_PARTS` are int64). recompute: None for the
    model's own setting."""
    N = _count("N", N)
    embedding, blocks, ln_f, head = layer_parts(model, tp, rank, layers, T, sequence_parallel)
    T, t, d, H, d_ff = int(T), int(tp), model.d_model, model.n_heads, model.d_ff
    recompute = model.recompute if recompute is None else recompute
    Tl = T // t if sequence_parallel else T
    block = N * Tl * d if recompute else (2 * (N * Tl * d + N * Tl) + 2 * N * Tl * d
                                          + 4 * N * T * d // t + H // t * N * T * T
                                          + 2 * N * T * d_ff // t)
    return {"tokens": embedding * N * T, "blocks": blocks * block,
            "ln_f": ln_f * (N * Tl * d + N * Tl), "head": head * N * Tl * d,
            "probs": head * N * T * _vocab(model, t, rank), "labels": head * N * T}


def megatron_activation_bytes(N, T, model, tp=1, sequence_parallel=False, rank=0,
                              layers=None):
    """The most activation bytes one micro-batch of N sequences makes tp-rank `rank` hold on
    layers [a, b): megatron_activation_elements in bytes (tokens and labels int64), plus, with
    recompute, one block rebuilt inside its backward. `History.memory[r]["activations"]` with
    one micro-batch per step; a pipeline stage holding k micro-batches of N: k times it (no
    recompute)."""
    itemsize = model.dtype.itemsize
    parts = megatron_activation_elements(N, T, model, tp, sequence_parallel, rank, layers)
    held = sum(n * (8 if part in INT64_PARTS else itemsize)
               for part, n in parts.items())
    if model.recompute and parts["blocks"]:
        held += itemsize * megatron_activation_elements(
            N, T, model, tp, sequence_parallel, rank, (1, 2), recompute=False)["blocks"]
    return held
