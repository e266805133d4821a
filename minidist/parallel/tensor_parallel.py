"""Tensor parallelism (Megatron-LM): split each weight matrix of an MLP block over t ranks.

The article's model parallelism — split θ into parts θ_1 … θ_t, rank k computes ∂L/∂θ_k and
updates θ_k — made concrete for Y = act(X A) B:

    ColumnParallelLinear   A = [A_1 … A_t] by columns:  Y_k = act(X A_k)    no communication
    RowParallelLinear      B = [B_1; …; B_t] by rows:   Z = Σ_k Y_k B_k      one all-reduce

and two conjugate operators keep the gradients right:

    f (before the column layer): forward identity,   backward all-reduce of ∂L/∂X
    g (after the row layer):     forward all-reduce, backward identity

So a block costs one all-reduce of N×d_out forward and one of N×d_in backward (none when the
block reads the training data, whose gradient nobody needs). Each rank stores 1/t of A and B
(and of A's bias); B's bias is added once, after the all-reduce, and every rank keeps it whole.
A Linear that is not part of a (Linear, activation, Linear) block stays whole on every rank.
"""

import numpy as np

from minidist import kernels
from minidist.comm import ALGORITHMS
from minidist.cost import bytes_per_rank
from minidist.nn import Layer, Linear, ReLU, Tanh

OPTIONS = {"algorithm": "auto"}
ELEMENTWISE = (ReLU, Tanh)


class CopyToTensorParallel:
    """Megatron's f: forward X ↦ X (every rank needs all of X); backward ∂X ↦ Σ_k ∂X_k."""

    def __init__(self, comm, clock=None, algorithm="auto"):
        self.comm, self.clock, self.algorithm = comm, clock, algorithm

    def forward(self, X):
        return X

    def backward(self, dX):
        return _all_reduce(self, dX)


class ReduceFromTensorParallel:
    """Megatron's g: forward Y ↦ Σ_k Y_k (the partial products); backward ∂Y ↦ ∂Y."""

    def __init__(self, comm, clock=None, algorithm="auto"):
        self.comm, self.clock, self.algorithm = comm, clock, algorithm

    def forward(self, Y):
        return _all_reduce(self, Y)

    def backward(self, dY):
        return dY


def _all_reduce(op, array):
    array = np.ascontiguousarray(array)
    if op.comm is None or op.comm.world_size == 1:
        return array
    if op.clock is None:
        return op.comm.all_reduce(array, "sum", op.algorithm)
    return op.clock.timed("comm", op.comm.all_reduce, array, "sum", op.algorithm)


def _group(comm):
    return (0, 1) if comm is None else (comm.rank, comm.world_size)


class ColumnParallelLinear(Layer):
    """Y_k = f(X) A_k + b_k with A_k = A[:, k·d_out/t : (k+1)·d_out/t].
    ∂A_k = Xᵀ∂Y_k, ∂b_k = Σ_n ∂Y_k, ∂X = f.backward(∂Y_k A_kᵀ) (an all-reduce)."""

    def __init__(self, d_in, d_out, comm=None, clock=None, algorithm="auto", input_grad=True):
        rank, t = _group(comm)
        if d_out % t:
            raise ValueError(f"ColumnParallelLinear({d_in}→{d_out}): {d_out} outputs do not "
                             f"split evenly over tp={t} ranks")
        self.d_in, self.d_out, self.d_local = d_in, d_out, d_out // t
        self.f = CopyToTensorParallel(comm, clock, algorithm) if input_grad else None

    def __repr__(self):
        return f"ColumnParallelLinear({self.d_in}→{self.d_local} of {self.d_out})"

    def param_shapes(self):
        return {"W": (self.d_in, self.d_local), "b": (self.d_local,)}

    @staticmethod
    def take(W, b, rank, t):
        """This rank's part of the full W, b: a block of columns."""
        cols = slice(rank * W.shape[1] // t, (rank + 1) * W.shape[1] // t)
        return {"W": W[:, cols], "b": b[cols]}

    def forward(self, X):
        K = kernels.ops()
        self.X = X
        return K.add_bias(K.matmul(X, self.params["W"]), self.params["b"])

    def backward(self, dY):
        K = kernels.ops()
        self.grads["W"][...] = K.matmul_tn(self.X, dY)
        self.grads["b"][...] = K.sum_rows(dY)
        dX = K.matmul_nt(dY, self.params["W"])  # this rank's share of ∂L/∂X
        return dX if self.f is None else self.f.backward(dX)


class RowParallelLinear(Layer):
    """Y = g(X_k B_k) + b with B_k = B[k·d_in/t : (k+1)·d_in/t, :], X_k this rank's columns.
    ∂B_k = X_kᵀ∂Y, ∂b = Σ_n ∂Y, ∂X_k = ∂Y B_kᵀ (no communication)."""

    def __init__(self, d_in, d_out, comm=None, clock=None, algorithm="auto"):
        rank, t = _group(comm)
        if d_in % t:
            raise ValueError(f"RowParallelLinear({d_in}→{d_out}): {d_in} inputs do not split "
                             f"evenly over tp={t} ranks")
        self.d_in, self.d_out, self.d_local = d_in, d_out, d_in // t
        self.g = ReduceFromTensorParallel(comm, clock, algorithm)

    def __repr__(self):
        return f"RowParallelLinear({self.d_local} of {self.d_in}→{self.d_out})"

    def param_shapes(self):
        return {"W": (self.d_local, self.d_out), "b": (self.d_out,)}

    @staticmethod
    def take(W, b, rank, t):
        """This rank's part of the full W, b: a block of rows, and the whole bias."""
        rows = slice(rank * W.shape[0] // t, (rank + 1) * W.shape[0] // t)
        return {"W": W[rows, :], "b": b}

    def forward(self, X):
        K = kernels.ops()
        self.X = X
        return K.add_bias(self.g.forward(K.matmul(X, self.params["W"])), self.params["b"])

    def backward(self, dY):
        K = kernels.ops()
        dY = self.g.backward(dY)
        self.grads["W"][...] = K.matmul_tn(self.X, dY)
        self.grads["b"][...] = K.sum_rows(dY)
        return K.matmul_nt(dY, self.params["W"])


def plan(layers, start=0, stop=None):
    """How layers[start:stop] are split: [(index, "column" | "row" | "whole")], where a
    (Linear, elementwise activation, Linear) run becomes column, whole, row."""
    stop = len(layers) if stop is None else stop
    kinds, i = [], start
    while i < stop:
        if (isinstance(layers[i], Linear) and i + 2 < stop and isinstance(layers[i + 2], Linear)
                and isinstance(layers[i + 1], ELEMENTWISE)):
            kinds += [(i, "column"), (i + 1, "whole"), (i + 2, "row")]
            i += 3
        else:
            kinds.append((i, "whole"))
            i += 1
    return kinds


def check_split(layers, t, start=0, stop=None):
    """Raise a ValueError naming the first layer whose width does not divide by t, or, for
    t > 1, the first composite layer (a transformer block): its heads cannot be split yet."""
    for i, kind in plan(layers, start, stop):
        if t > 1 and layers[i].sublayers():
            raise ValueError(f"layer {i} {layers[i]!r} is a transformer block: tensor "
                             f"parallelism over attention heads is not built yet, so the "
                             f"model's blocks cannot be split over tp={t} ranks (use tp=1: "
                             f"data parallelism or a pipeline)")
        width = {"column": "d_out", "row": "d_in"}.get(kind)
        if width and getattr(layers[i], width) % t:
            raise ValueError(f"layer {i} {layers[i]!r} has {getattr(layers[i], width)} "
                             f"{'outputs' if kind == 'column' else 'inputs'}, not divisible by "
                             f"tp={t}")


def block_bytes(n, d_in, d_hidden, d_out, t, itemsize=8, first=True, algorithm="ring"):
    """One (column, activation, row) block on one rank of t, batch of n rows:
    params = (d_in·h + h + h·d_out)/t + d_out elements; bytes sent per step = a ring all-reduce
    of n·d_out forward, plus one of n·d_in backward unless the block reads the training data."""
    params = (d_in * d_hidden + d_hidden + d_hidden * d_out) // t + d_out
    sent = bytes_per_rank("all_reduce", algorithm, n * d_out, itemsize, t)[0][0]
    if not first:
        sent += bytes_per_rank("all_reduce", algorithm, n * d_in, itemsize, t)[0][0]
    return {"param_bytes": params * itemsize, "bytes_sent_per_step": sent if t > 1 else 0}


def check_options(options):
    if options.get("algorithm", "auto") not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {options['algorithm']!r}; "
                         f"allowed: {', '.join(ALGORITHMS)}")
