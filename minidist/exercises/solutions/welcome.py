"""Lesson 0's exercises, solved: what a learner is asked to write, in the plainest form.

    zero3_gpus    the fewest N_d with (2 + 2 + K)Ψ / N_d ≤ (M − A)·10⁹ bytes: a ceiling
    global_mean   the mean of unevenly sharded numbers, on every rank
"""

import math

import numpy as np


def zero3_gpus(n_params, gpu_gb, reserve_gb):
    """16 bytes per parameter (fp16 θ and ∇, fp32 θ, m, v), sharded over N_d GPUs, must fit in
    what each GPU has left after its activations: N_d ≥ 16Ψ / ((M − A)·10⁹), the next whole
    number up. (Exact here: 16Ψ and (M − A)·10⁹ are whole numbers of bytes below 2⁵³.)"""
    return math.ceil(16 * n_params / ((gpu_gb - reserve_gb) * 1e9))


def global_mean(comm, shard):
    """All-reduce the pair (sum, count) in one array, then divide: Σ_k Σ shard_k / Σ_k |shard_k|
    on every rank. A mean of the ranks' means would weight a small shard like a large one."""
    total = np.array([shard.sum(), len(shard)], dtype=np.float64)  # a new array: shard stays
    comm.all_reduce(total)
    return total[0] / total[1]
