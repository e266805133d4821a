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
Both layers take inputs (N, d) or (N, T, d), and other f and g (sequence parallelism's, in
sequence_parallel.py). A GPT is split by minidist.parallel.megatron (`plan` names the kinds).
"""

import numpy as np

from minidist import kernels
from minidist.comm import ALGORITHMS
from minidist.cost import bytes_per_rank
from minidist.data import shard_bounds
from minidist.nn import Block, Embedding, Layer, Linear, ReLU, Tanh
from minidist.parallel.job import check_algorithm

OPTIONS = {"algorithm": "auto", "sequence_parallel": False}
ELEMENTWISE = (ReLU, Tanh)


class CopyToTensorParallel:
    """Megatron's f: forward X ↦ X (every rank needs all of X); backward ∂X ↦ Σ_k ∂X_k."""

    def __init__(self, comm, clock=None, algorithm="auto"):
        self.comm, self.clock, self.algorithm = comm, clock, algorithm

    def forward(self, X):
        return X

    def backward(self, dX):
        return communicate(self, "all_reduce", dX, "sum")


class ReduceFromTensorParallel:
    """Megatron's g: forward Y ↦ Σ_k Y_k (the partial products); backward ∂Y ↦ ∂Y."""

    def __init__(self, comm, clock=None, algorithm="auto"):
        self.comm, self.clock, self.algorithm = comm, clock, algorithm

    def forward(self, Y):
        return communicate(self, "all_reduce", Y, "sum")

    def backward(self, dY):
        return dY


def communicate(op, collective, array, *args):
    """op.comm.<collective>(array, *args, algorithm) on `array` made contiguous (an all-reduce
    works in place), timed through op.clock when there is one; just `array` with no group (or
    a group of one).
    The all-reduces run op.algorithm; all-gathers and reduce-scatters the ring or native one
    ("auto" unless op.algorithm names one of them)."""
    array = np.ascontiguousarray(array)
    if op.comm is None or op.comm.world_size == 1:
        return array
    algorithm = op.algorithm
    if collective != "all_reduce" and algorithm not in ("ring", "native"):
        algorithm = "auto"
    fn = getattr(op.comm, collective)
    if op.clock is None:
        return fn(array, *args, algorithm)
    return op.clock.timed("comm", fn, array, *args, algorithm, event=collective)


def _group(comm):
    return (0, 1) if comm is None else (comm.rank, comm.world_size)


class ColumnParallelLinear(Layer):
    """Y_k = f(X) A_k + b_k with A_k = A[:, k·d_out/t : (k+1)·d_out/t].
    ∂A_k = f(X)ᵀ∂Y_k, ∂b_k = Σ_n ∂Y_k, ∂X = f.backward(∂Y_k A_kᵀ) (an all-reduce).

    It keeps its input as it came in and applies f to it again in backward: nothing for
    CopyToTensorParallel, an all-gather for sequence parallelism's f (which keeps only the
    local chunk of the sequence, as Megatron does). input_grad=False (the first layer, reading
    the data): ∂X stays this rank's share, not reduced. EVEN: d_out must divide by t (if not,
    as for VocabParallelHead, rank k gets columns shard_bounds(d_out, k, t))."""

    EVEN = True

    def __init__(self, d_in, d_out, comm=None, clock=None, algorithm="auto", input_grad=True,
                 f=None):
        rank, t = _group(comm)
        if self.EVEN and d_out % t:
            raise ValueError(f"ColumnParallelLinear({d_in}→{d_out}): {d_out} outputs do not "
                             f"split evenly over tp={t} ranks")
        lo, hi = shard_bounds(d_out, rank, t)
        self.d_in, self.d_out, self.d_local = d_in, d_out, hi - lo
        self.f = CopyToTensorParallel(comm, clock, algorithm) if f is None else f
        self.input_grad = input_grad

    def __repr__(self):
        return f"{type(self).__name__}({self.d_in}→{self.d_local} of {self.d_out})"

    def param_shapes(self):
        return {"W": (self.d_in, self.d_local), "b": (self.d_local,)}

    @staticmethod
    def take(W, b, rank, t):
        """This rank's part of the full W, b: columns shard_bounds(d_out, rank, t)."""
        cols = slice(*shard_bounds(W.shape[1], rank, t))
        return {"W": W[:, cols], "b": b[cols]}

    def forward(self, X):
        K = kernels.ops()
        self.X = X
        X = self.f.forward(X)
        Y = K.add_bias(K.matmul(X.reshape(-1, self.d_in), self.params["W"]), self.params["b"])
        return Y.reshape(*X.shape[:-1], self.d_local)

    def backward(self, dY):
        K = kernels.ops()
        X = self.f.forward(self.X)  # the whole input again
        dY = dY.reshape(-1, self.d_local)
        self.grads["W"][...] = K.matmul_tn(X.reshape(-1, self.d_in), dY)
        self.grads["b"][...] = K.sum_rows(dY)
        dX = K.matmul_nt(dY, self.params["W"]).reshape(X.shape)  # this rank's share of ∂L/∂X
        return self.f.backward(dX) if self.input_grad else dX


class RowParallelLinear(Layer):
    """Y = g(X_k B_k) + b with B_k = B[k·d_in/t : (k+1)·d_in/t, :], X_k this rank's columns.
    ∂B_k = X_kᵀ g.backward(∂Y), ∂b = Σ_n g.backward(∂Y), ∂X_k = g.backward(∂Y) B_kᵀ (no
    communication beyond g's)."""

    def __init__(self, d_in, d_out, comm=None, clock=None, algorithm="auto", g=None):
        rank, t = _group(comm)
        if d_in % t:
            raise ValueError(f"RowParallelLinear({d_in}→{d_out}): {d_in} inputs do not split "
                             f"evenly over tp={t} ranks")
        self.d_in, self.d_out, self.d_local = d_in, d_out, d_in // t
        self.g = ReduceFromTensorParallel(comm, clock, algorithm) if g is None else g

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
        Z = K.matmul(X.reshape(-1, self.d_local), self.params["W"])
        return K.add_bias(self.g.forward(Z.reshape(*X.shape[:-1], self.d_out)), self.params["b"])

    @staticmethod
    def local_grads(X_k, W_k, dY):
        """(∂W_k, ∂b, ∂X_k) = (X_kᵀ∂Y, Σ_n ∂Y, ∂Y W_kᵀ) for rows X_k (N, d_in/t), ∂Y (N, d_out)."""
        K = kernels.ops()
        return K.matmul_tn(X_k, dY), K.sum_rows(dY), K.matmul_nt(dY, W_k)

    def backward(self, dY):
        dY = self.g.backward(dY).reshape(-1, self.d_out)
        dW, db, dX = self.local_grads(self.X.reshape(-1, self.d_local), self.params["W"], dY)
        self.grads["W"][...] = dW
        self.grads["b"][...] = db
        return dX.reshape(self.X.shape)


def plan(layers, start=0, stop=None):
    """How layers[start:stop] are split: [(index, kind)]. A (Linear, elementwise activation,
    Linear) run becomes "column", "whole", "row"; a GPT's (layers[0] an Embedding) Embedding
    is "embedding" (vocab-parallel), each Block "block" (heads and MLP split), its last Linear
    "head" (vocab-parallel); everything else "whole" (every rank runs it on the same input)."""
    stop = len(layers) if stop is None else stop
    gpt = isinstance(layers[0], Embedding)
    kinds, i = [], start
    while i < stop:
        if isinstance(layers[i], Embedding):
            kinds.append((i, "embedding"))
        elif isinstance(layers[i], Block):
            kinds.append((i, "block"))
        elif gpt and i == len(layers) - 1 and isinstance(layers[i], Linear):
            kinds.append((i, "head"))
        elif (isinstance(layers[i], Linear) and i + 2 < stop
              and isinstance(layers[i + 2], Linear) and isinstance(layers[i + 1], ELEMENTWISE)):
            kinds += [(i, "column"), (i + 1, "whole"), (i + 2, "row")]
            i += 2
        else:
            kinds.append((i, "whole"))
        i += 1
    return kinds


def check_split(layers, t, start=0, stop=None):
    """Raise a ValueError naming the first layer of layers[start:stop] that cannot be split
    over t ranks: a width not divisible by t, a Block whose n_heads or d_ff is not, or a
    vocabulary smaller than t."""
    for i, kind in plan(layers, start, stop):
        layer = layers[i]
        if kind == "block" and getattr(layer, "moe", None) is not None:
            if t > 1:
                raise ValueError(f"layer {i} {layer!r}: mixture-of-experts blocks are split by "
                                 f"expert parallelism, not tensor parallelism: train this "
                                 f"model with tp=1 (got tp={t})")
        elif kind == "block":
            heads, d_ff = layer.attn.n_heads, layer.mlp.fc.d_out
            if heads % t or d_ff % t:
                raise ValueError(f"layer {i} {layer!r}: tensor parallelism splits the "
                                 f"attention heads and the MLP's hidden width over tp={t} "
                                 f"ranks, so n_heads={heads} and d_ff={d_ff} must both be "
                                 f"divisible by tp={t}")
        elif kind in ("embedding", "head"):
            vocab = layer.vocab_size if kind == "embedding" else layer.d_out
            if vocab < t:
                raise ValueError(f"layer {i} {layer!r}: vocab_size={vocab} rows cannot be "
                                 f"split over tp={t} ranks (vocab_size must be >= tp)")
        width = {"column": "d_out", "row": "d_in"}.get(kind)
        if width and getattr(layer, width) % t:
            raise ValueError(f"layer {i} {layer!r} has {getattr(layer, width)} "
                             f"{'outputs' if kind == 'column' else 'inputs'}, not divisible by "
                             f"tp={t}")


def check_sequence_parallel(layers, t, seq_len):
    """sequence_parallel=True over t > 1 ranks needs a GPT (layers[0] an Embedding) and
    sequences of seq_len = T positions that split evenly: T/t each (a ValueError otherwise)."""
    if not isinstance(layers[0], Embedding):
        raise ValueError(f"sequence_parallel=True splits sequences of tokens: it needs a GPT "
                         f"(a model whose first layer is an Embedding), got first layer "
                         f"{layers[0]!r}")
    if seq_len % t:
        raise ValueError(f"sequence_parallel=True splits each sequence of T={seq_len} "
                         f"positions over tp={t} ranks: T must be divisible by tp")


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
    check_algorithm(options, [name for name in ALGORITHMS if name != "native"],
                    "model parallelism", " (not 'native': the tp, pp and dp groups are "
                    "sub-communicators, which have no native collectives; 'auto' runs the "
                    "ring on them)")
    sequence = options.get("sequence_parallel", False)
    if not isinstance(sequence, (bool, np.bool_)):
        raise TypeError(f"sequence_parallel must be True or False, got {sequence!r}")
