"""The bytes a rank of a Megatron-split GPT sends in one training step (minidist.parallel.
megatron), exactly as comm.stats counts them, with the ring algorithms (what "auto" and "ring"
run on the tp, pp and dp groups, which are sub-communicators: no native collectives).

t = tp ranks, rank r; b = itemsize; a micro-batch of n sequences of T tokens, d = d_model;
a = n·T·d. Ring costs (cost.bytes_per_rank): AR(x) = (x·b − c_r) + (x·b − c_{r+1}) for chunks
c_k of x·b, 2(t−1)/t·x·b when t divides x; RS = (t−1)/t·a·b (reduce-scatter of (T, n, d));
AG = (t−1)·a·b/t (all-gather of (T/t, n, d)). So RS + AG = AR(a): per micro-batch,

    part             plain tensor parallel        sequence parallel
    embedding        AR(a)      (forward g)       RS (forward g) + AG (backward g)
    blocks, each     4·AR(a)    (g, g; f, f)      4·RS + 4·AG    (the same bytes)
    regather         —                            2·AG per block + AG for the head: the
                                                  column-parallel inputs gathered again
    recompute        2·AR(a) per block            2·RS + 2·AG per block (forward rerun)
    head             AR(a)      (backward f)      AG (forward f) + RS (backward f)
    cross_entropy    AR(n·T) (max) + AR(2·n·T) (sum of exp, target logit): never n·T·V
    pipeline         n·T_l·d·b per send, forward to the next stage and backward to the
                     previous one (T_l = T/t under sequence parallelism: stages send their
                     local chunk), counted as "send"

and once per step: layernorm_grads (sequence parallel) AR(4d per block + 2d for ln_f), the
LayerNorm γ, β gradients summed over the tp group; data_parallel AR over dp of the rank's
parameter count (megatron_param_elements), at its dp rank.
"""

from minidist.cost import bytes_per_rank
from minidist.data import check_integer, is_integer, shard_bounds
from minidist.megatron_memory import layer_parts, megatron_param_elements

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "send")


def _entries(model, batch_size, seq_len, tp, sequence_parallel, tp_rank, layers, micro_batches,
             dp, dp_rank):
    """[(part, collective, bytes)] of one step."""
    embedding, blocks, ln_f, head = layer_parts(model, tp, tp_rank, layers, seq_len,
                                                sequence_parallel)
    for name, value, low in (("dp", dp, 1), ("micro_batches", micro_batches, 1)):
        check_integer(name, value, low)
    if not (is_integer(dp_rank) and 0 <= dp_rank < dp):
        raise ValueError(f"dp_rank must be an integer in [0, {dp}) for dp={dp}, got {dp_rank!r}")
    check_integer("batch_size", batch_size, 1)
    if batch_size < dp * micro_batches:  # as hybrid.check_job
        raise ValueError(f"batch_size={batch_size} cannot give dp={dp} replicas "
                         f"{micro_batches} micro-batches of at least one row each")
    b, d, T, t, r = model.dtype.itemsize, model.d_model, int(seq_len), int(tp), int(tp_rank)
    sp = bool(sequence_parallel) and t > 1

    def ring(collective, shape, group=t, rank=r):
        return bytes_per_rank(collective, "ring", shape, b, group)[rank][0]

    out = []
    lo, hi = shard_bounds(int(batch_size), int(dp_rank), int(dp))
    for j in range(int(micro_batches)):
        a, z = shard_bounds(hi - lo, j, int(micro_batches))
        n = z - a
        if t > 1:
            AR = [("all_reduce", ring("all_reduce", n * T * d))]
            RS = [("reduce_scatter", ring("reduce_scatter", (T, n, d)))]
            AG = [("all_gather", ring("all_gather", (T // t, n, d)))] if sp else []
            # f forward, f backward, g forward, g backward
            f, f_back, g, g_back = (AG, RS, RS, AG) if sp else ([], AR, AR, [])
            for part, count, pairs in (
                    ("embedding", embedding, g + g_back),
                    ("blocks", blocks, 2 * (f + g) + 2 * (g_back + f_back)),
                    ("regather", 2 * blocks + head, AG),
                    ("recompute", model.recompute * blocks, 2 * (f + g)),
                    ("head", head, f + f_back),
                    ("cross_entropy", head, [("all_reduce", ring("all_reduce", n * T)),
                                             ("all_reduce", ring("all_reduce", 2 * n * T))])):
                out += [(part, c, count * v) for c, v in pairs]
        sends = (not head) + (not embedding)  # forward to the next stage, back to the previous
        out.append(("pipeline", "send", sends * n * (T // t if sp else T) * d * b))
    if sp and 4 * blocks + 2 * ln_f:
        out.append(("layernorm_grads", "all_reduce", ring("all_reduce",
                                                          (4 * blocks + 2 * ln_f) * d)))
    if dp > 1:
        psi = sum(megatron_param_elements(model, t, r, layers).values())
        out.append(("data_parallel", "all_reduce", ring("all_reduce", psi, int(dp),
                                                         int(dp_rank))))
    return out


def megatron_bytes_per_rank(model, batch_size, seq_len, tp=1, sequence_parallel=False,
                            tp_rank=0, layers=None, micro_batches=1, dp=1, dp_rank=0,
                            by="part"):
    """The bytes the rank at (dp_rank, stage of `layers`, tp_rank) sends in one step of a GPT
    `model` on global batches of `batch_size` sequences of `seq_len` tokens (each replica its
    shard_bounds share, cut into `micro_batches`), with tp-way tensor parallelism (sequence
    parallel or not) over layers [a, b) = `layers` (None: all). by="part": {embedding, blocks,
    regather, recompute, head, cross_entropy, pipeline, layernorm_grads, data_parallel,
    total} (see the module's table); by="collective": {all_reduce, reduce_scatter,
    all_gather, send, total}, as `History.stats[r][op]["bytes_sent"]`."""
    if by not in ("part", "collective"):
        raise ValueError(f"by must be 'part' or 'collective', got {by!r}")
    entries = _entries(model, batch_size, seq_len, tp, sequence_parallel, tp_rank, layers,
                       micro_batches, dp, dp_rank)
    keys = (["embedding", "blocks", "regather", "recompute", "head", "cross_entropy",
             "pipeline", "layernorm_grads", "data_parallel"] if by == "part" else COLLECTIVES)
    out = dict.fromkeys(keys, 0)
    for part, collective, sent in entries:
        out[part if by == "part" else collective] += int(sent)
    return {**out, "total": sum(out.values())}
