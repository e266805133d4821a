"""Lesson 13's exercises, solved: what a learner is asked to write, in the plainest form.

    softmax_combine    two partial softmaxes over disjoint keys merged into one (FlashAttention)
    expert_dispatch    the all_to_all chunks that carry each row to its expert's rank
"""

import numpy as np


def softmax_combine(m1, l1, o1, m2, l2, o2):
    """m = max(m₁, m₂), l = e^{m₁−m} l₁ + e^{m₂−m} l₂, o = e^{m₁−m} o₁ + e^{m₂−m} o₂; where
    both maxima are −∞ (a row that saw no key) the exponents use 0 for m, so that the row stays
    (−∞, 0, 0) instead of e^{−∞ + ∞} = NaN."""
    m = np.maximum(m1, m2)
    finite = np.where(np.isneginf(m), 0.0, m)
    a1, a2 = np.exp(m1 - finite), np.exp(m2 - finite)
    return m, a1 * l1 + a2 * l2, a1[..., None] * o1 + a2[..., None] * o2


def expert_dispatch(x_rows, expert_of_row, experts_per_rank, world_size):
    """Rank j holds experts [j·n, (j+1)·n), n = experts_per_rank: sort the rows by expert
    (stable, so one expert's rows keep their order), then cut the sorted rows where the
    experts' rank changes. order = the sort's permutation:
    `concatenate(chunks) == x_rows[order]`."""
    order = np.argsort(expert_of_row, kind="stable")
    rank_of_row = np.asarray(expert_of_row)[order] // experts_per_rank
    cuts = np.searchsorted(rank_of_row, np.arange(1, world_size))
    return np.split(x_rows[order], cuts), order
