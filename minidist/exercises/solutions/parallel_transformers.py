"""Lesson 12's exercises, solved: what a learner is asked to write, in the plainest form.

    attention_take     rank k's heads of a full attention layer (Megatron's column / row split)
    interleaved_ops    the interleaved 1F1B schedule's order of ops on one stage
"""


def attention_take(W_qkv, b_qkv, W_o, b_o, rank, t):
    """Rank `rank` of t runs heads [rank·H/t, (rank+1)·H/t): their columns of Q, K and V
    (W_qkv (3, H, d, d_h) and b_qkv (3, H, d_h) along axis 1, the heads), their rows of W_o
    (H, d_h, d) along axis 0; b_o (d,) is added once after g's all-reduce, so it stays whole."""
    H = W_o.shape[0]
    heads = slice(rank * H // t, (rank + 1) * H // t)
    return {"W_qkv": W_qkv[:, heads], "b_qkv": b_qkv[:, heads], "W_o": W_o[heads], "b_o": b_o}


def interleaved_ops(stage, stages, micro_batches, chunks):
    """Megatron-LM's interleaved 1F1B on stage s of p, m micro-batches, v local chunks: a list
    of ("F", j, c) and ("B", j, c), c the local chunk (global chunk c·p + s).

    Virtual step k (of m·v) runs micro-batch (k // (p·v))·p + k mod p; forward step k its
    chunk (k // p) mod v, backward step k chunk v−1 − (k // p) mod v (the gradient comes back
    through the last chunk first). Warm-up: 2(p−s−1) + (v−1)·p forwards (all m·v when m = p),
    then one forward and one backward in turn, then the remaining backwards."""
    p, m, v = stages, micro_batches, chunks
    steps = range(m * v)
    micro = [k // (p * v) * p + k % p for k in steps]
    forward = [("F", micro[k], k // p % v) for k in steps]
    backward = [("B", micro[k], v - 1 - k // p % v) for k in steps]
    warmup = m * v if m == p else min(2 * (p - stage - 1) + (v - 1) * p, m * v)
    ops = forward[:warmup]
    for k in range(m * v - warmup):
        ops += [forward[warmup + k], backward[k]]
    return ops + backward[m * v - warmup:]
