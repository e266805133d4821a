"""The bytes a rank of a context-parallel GPT sends in one training step
(minidist.parallel.context_parallel), exactly as comm.stats counts them.

c = cp ranks, b = itemsize, L blocks, N sequences of T tokens, d = d_model; one rank's keys
(or values) of one block, all heads: B = N·(T/c)·d·b. Per step:

    forward     L·(c − 1)·2B          the K/V block passed on at each of the c − 1 ring steps
    backward    L·((c − 1)·4B + 2B)   K, V and the ∂K, ∂V accumulators for c − 1 steps, then
                                      one more send of ∂K, ∂V to their owner (0 when c = 1)
    recompute   L·(c − 1)·2B          with recompute: each block's forward (and its ring) rerun
    gradients   AR(Ψ)                 the all-reduce of the Ψ parameter gradients over the c
                                      ranks (cost.bytes_per_rank; ring: 2(c−1)/c·Ψb when c | Ψ)

Hybrid dp × cp (rank d·c + k: ring k of replica d): the ring's N is the replica's rows,
shard_bounds(N, d, dp), and the gradients' all-reduce runs over all dp·c ranks, at index d·c + k.

The ring's messages count as "send" (the rank's own point-to-point calls), the gradients as
"all_reduce". load_balance moves the same blocks: it changes the work, not the bytes.
"""

from minidist.context_memory import context_activation_elements
from minidist.cost import bytes_per_rank
from minidist.data import check_integer, is_integer, shard_bounds


def context_parallel_bytes_per_rank(model, batch_size, seq_len, cp=1, rank=0,
                                    algorithm="ring", load_balance=False, by="part", dp=1,
                                    dp_rank=0):
    """The bytes rank `rank` of cp = c sends in one step of a GPT `model` on batches of
    `batch_size` sequences of `seq_len` tokens, the gradients all-reduced with `algorithm`.
    by="part": {forward, backward, recompute, gradients, total} (the module's table);
    by="collective": {send, all_reduce, total}, as `History.stats[r][op]["bytes_sent"]`.
    dp, dp_rank: hybrid dp × cp, ring rank `rank` of replica `dp_rank` (global rank
    dp_rank·c + rank), the replica on rows shard_bounds(batch_size, dp_rank, dp)."""
    if by not in ("part", "collective"):
        raise ValueError(f"by must be 'part' or 'collective', got {by!r}")
    check_integer("dp", dp)
    if not (is_integer(dp_rank) and 0 <= dp_rank < dp):
        raise ValueError(f"dp_rank must be an integer in [0, {dp}) for dp={dp}, "
                         f"got {dp_rank!r}")
    check_integer("batch_size", batch_size, minimum=dp)  # a sequence for every replica
    start, stop = shard_bounds(batch_size, dp_rank, dp)
    N = stop - start  # the replica's sequences
    context_activation_elements(N, seq_len, model, cp, load_balance)  # the layout
    c = int(cp)
    if not (is_integer(rank) and 0 <= rank < c):
        raise ValueError(f"rank must be an integer in [0, {c}) for cp={c}, got {rank!r}")
    b, L = model.dtype.itemsize, model.n_layers
    B = N * (seq_len // c) * model.d_model * b
    parts = {"forward": L * (c - 1) * 2 * B,
             "backward": L * ((c - 1) * 4 * B + (2 * B if c > 1 else 0)),
             "recompute": model.recompute * L * (c - 1) * 2 * B,
             "gradients": bytes_per_rank("all_reduce", algorithm, model.num_params, b,
                                         dp * c)[dp_rank * c + rank][0]}
    if by == "collective":
        parts = {"send": parts["forward"] + parts["backward"] + parts["recompute"],
                 "all_reduce": parts["gradients"]}
    return {**parts, "total": sum(parts.values())}
