"""Sequence parallelism (Korthikanti et al. 2022, §4.2.2): the LayerNorm and residual regions
of a tensor-parallel GPT hold T/t positions of every sequence instead of all T.

Between two tensor-parallel regions, plain tensor parallelism (tensor_parallel.py) keeps the
whole activation (N, T, d) on every rank: the LayerNorms, the residual adds (and dropout) run t
times on the same numbers and store them t times. Split them along the sequence instead:
rank k holds positions [k·T/t, (k+1)·T/t) there, and the conjugate operators change shape:

    f  before a column-parallel part:  all-gather along T    (backward: reduce-scatter)
    g  after a row-parallel part:      reduce-scatter along T (backward: all-gather)

An all-reduce is a reduce-scatter followed by an all-gather, so g then f sends what plain
tensor parallelism's all-reduce sends; every activation is now 1/t of the whole. (The
column-parallel parts keep only their local chunk and gather it again in backward, for their
weight gradient: one more all-gather each.)

The collectives split and stack axis 0, so (N, T, d) crosses the wire laid out as (T, N, d),
contiguous: reduce_scatter hands rank k rows [k·T/t, (k+1)·T/t), all_gather stacks the
ranks' chunks in rank order. Both operators return C-contiguous (N, ·, d) arrays.
"""

import numpy as np

from minidist.parallel.tensor_parallel import (
    CopyToTensorParallel,
    ReduceFromTensorParallel,
    communicate,
)


def _swap(X):
    """(N, T, d) ↔ (T, N, d), contiguous: to the wire (the sequence on axis 0) and back."""
    return np.ascontiguousarray(X.swapaxes(0, 1))


def gather_sequence(op, X):
    """(N, T/t, d) on every rank → (N, T, d): the chunks side by side, in rank order."""
    if op.comm is None or op.comm.world_size == 1:
        return X
    stacked = communicate(op, "all_gather", _swap(X))  # (t, T/t, N, d)
    return _swap(stacked.reshape(-1, *stacked.shape[2:]))


def reduce_scatter_sequence(op, Y):
    """(N, T, d) partial sums on every rank → rank k's positions of Σ_ranks, (N, T/t, d)."""
    if op.comm is None or op.comm.world_size == 1:
        return Y
    return _swap(communicate(op, "reduce_scatter", _swap(Y), "sum"))


class GatherFromSequenceParallel(CopyToTensorParallel):
    """f under sequence parallelism: forward all-gather along T, (N, T/t, d) → (N, T, d);
    backward reduce-scatter of the partial ∂X, (N, T, d) → (N, T/t, d)."""

    def forward(self, X):
        return gather_sequence(self, X)

    def backward(self, dX):
        return reduce_scatter_sequence(self, dX)


class ReduceScatterToSequenceParallel(ReduceFromTensorParallel):
    """g under sequence parallelism: forward reduce-scatter along T of the partial sums,
    (N, T, d) → (N, T/t, d); backward all-gather of ∂Y, (N, T/t, d) → (N, T, d)."""

    def forward(self, Y):
        return reduce_scatter_sequence(self, Y)

    def backward(self, dY):
        return gather_sequence(self, dY)


def region_operators(comm, clock=None, algorithm="auto", sequence_parallel=False):
    """(f, g): Megatron's conjugate pair for plain tensor parallelism, or sequence
    parallelism's when sequence_parallel."""
    if sequence_parallel:
        return (GatherFromSequenceParallel(comm, clock, algorithm),
                ReduceScatterToSequenceParallel(comm, clock, algorithm))
    return (CopyToTensorParallel(comm, clock, algorithm),
            ReduceFromTensorParallel(comm, clock, algorithm))
