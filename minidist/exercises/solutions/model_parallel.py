"""Lesson 7's exercises, solved: what a learner is asked to write, in the plainest form.

    row_parallel_backward   one rank's gradients of a RowParallelLinear
    one_f_one_b_ops         the 1F1B (PipeDream-Flush) order of ops on one pipeline stage
    min_micro_batches       the fewest micro-batches whose ideal bubble is at most a target
                            (the formula exercise)
"""

import math
from fractions import Fraction


def row_parallel_backward(X_k, W_k, dY):
    """Rank k computed Y = g(X_k W_k) + b; g's backward is the identity, so every rank has the
    whole ∂Y: ∂W_k = X_kᵀ∂Y (its rows of ∂W), ∂b = Σ_n ∂Y (the bias is added once, after the
    all-reduce: whole), ∂X_k = ∂Y W_kᵀ (its columns of ∂X; no all-reduce)."""
    return X_k.T @ dY, dY.sum(axis=0), dY @ W_k.T


def one_f_one_b_ops(stage, stages, micro_batches):
    """Stage s of p, m micro-batches: w = min(p−s−1, m) warm-up forwards, then one forward and
    one backward in turn, then the last w backwards; ops ("F", j) and ("B", j)."""
    m = micro_batches
    warmup = min(stages - stage - 1, m)
    ops = [("F", j) for j in range(warmup)]
    for j in range(m - warmup):
        ops += [("F", warmup + j), ("B", j)]
    return ops + [("B", j) for j in range(m - warmup, m)]


def min_micro_batches(p, target):
    """(p−1)/(m+p−1) <= target  ⇔  m >= (p−1)(1−target)/target: the fewest whole m >= 1 is the
    ceiling of that bound, computed exactly (a Fraction: a float bound may land just above a
    whole number, 3·(1 − 0.2)/0.2 = 12.000000000000002)."""
    target = Fraction(target)
    return max(1, math.ceil((p - 1) * (1 - target) / target))
