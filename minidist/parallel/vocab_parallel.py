"""Vocabulary parallelism (Megatron-LM): a GPT's two V-wide ends split over the t ranks.

Rank k owns the token ids [lo_k, hi_k) = shard_bounds(V, k, t) (V need not divide by t):

    VocabParallelEmbedding   wte[lo_k:hi_k] (rows); x = g(Σ_k wte_k[tokens]) + wpe[positions]
                             (a token outside the range adds 0 here; wpe is whole everywhere)
    VocabParallelHead        the LM head's W[:, lo_k:hi_k], b[lo_k:hi_k]: z_k = f(x) W_k + b_k
    VocabParallelCrossEntropy  the loss over the split logits, never gathering them:

        m   = max_v z_v                      all-reduce(max) of the local maxima, (N, T)
        s   = Σ_v exp(z_v − m),  z_y         all-reduce(sum) of [Σ_local exp(z − m), z_y or 0]
        L   = mean over N·T of  log s + m − z_y
        ∂z_k = (exp(z_k − m)/s − onehot(y)_k) / (N·T)       local columns: no communication

So the (N, T, V) logits never cross the wire: 3·N·T numbers do. Every rank gets the same loss.
"""

import numpy as np

from minidist.data import shard_bounds
from minidist.nn import Embedding
from minidist.parallel.tensor_parallel import ColumnParallelLinear, _group, communicate


class VocabParallelEmbedding(Embedding):
    """Rows [lo, hi) of wte; wpe whole. forward: tokens checked on the FULL vocabulary, the
    local rows looked up (0 for other tokens), g over the partial sums (an all-reduce, or a
    reduce-scatter to this rank's T/t positions under sequence parallelism), then wpe added
    once, at the positions this rank holds. backward: g.backward(∂x) (the identity, or an
    all-gather) is the whole ∂x; ∂wte_k[v − lo] = Σ_{tokens = v} ∂x, ∂wpe[t] = Σ_n ∂x[n, t]."""

    def __init__(self, vocab_size, context, d_model, g):
        super().__init__(vocab_size, context, d_model)
        rank, t = _group(g.comm)
        self.lo, self.hi = shard_bounds(vocab_size, rank, t)
        self.g, self.rank = g, rank

    def __repr__(self):
        return (f"VocabParallelEmbedding(rows {self.lo}:{self.hi} of vocab={self.vocab_size}, "
                f"context={self.context}, d={self.d_model})")

    def param_shapes(self):
        return {"wte": (self.hi - self.lo, self.d_model), "wpe": (self.context, self.d_model)}

    @staticmethod
    def take(wte, wpe, rank, t):
        """This rank's rows of wte, and the whole wpe."""
        return {"wte": wte[slice(*shard_bounds(len(wte), rank, t))], "wpe": wpe}

    def _mine(self):
        """(positions (n,) in tokens.ravel() of this rank's token ids, their local rows)."""
        flat = self.tokens.reshape(-1)
        where = np.flatnonzero((flat >= self.lo) & (flat < self.hi))
        return where, flat[where] - self.lo

    def forward(self, tokens):
        self.tokens = self.check_tokens(tokens)  # the full vocabulary's check
        N, T = self.tokens.shape
        partial = np.zeros((N * T, self.d_model), self.params["wte"].dtype)
        where, rows = self._mine()
        partial[where] = self.params["wte"][rows]
        x = self.g.forward(partial.reshape(N, T, self.d_model))  # under sequence parallelism
        first = self.rank * x.shape[1] if x.shape[1] < T else 0  # only my T/t positions
        return x + self.params["wpe"][first:first + x.shape[1]]

    def backward(self, dX):
        dX = self.g.backward(dX)  # the whole (N, T, d)
        d_wte, d_wpe = self.grads["wte"], self.grads["wpe"]
        d_wte[...] = 0.0
        where, rows = self._mine()
        np.add.at(d_wte, rows, dX.reshape(-1, self.d_model)[where])
        d_wpe[...] = 0.0
        d_wpe[:dX.shape[1]] = dX.sum(axis=0)
        return None


class VocabParallelHead(ColumnParallelLinear):
    """The LM head Linear(d, V) split by columns over the vocabulary: rank k holds
    W[:, lo_k:hi_k] and b[lo_k:hi_k], shard_bounds(V, k, t) (V need not divide by t); f before
    it (under sequence parallelism: the all-gather of ln_f's local positions)."""

    EVEN = False


class VocabParallelCrossEntropy:
    """The mean cross-entropy over N·T positions from logits split by vocabulary columns (see
    the module's formulas). Keeps the local probabilities (N·T, V_k) and, per position, the
    target's local column (−1 where another rank holds it), as int64."""

    def __init__(self, vocab_size, comm, clock=None, algorithm="auto"):
        rank, t = _group(comm)
        self.vocab_size = vocab_size
        self.lo, self.hi = shard_bounds(vocab_size, rank, t)
        self.comm, self.clock, self.algorithm = comm, clock, algorithm

    def __repr__(self):
        return f"VocabParallelCrossEntropy(columns {self.lo}:{self.hi} of {self.vocab_size})"

    def forward(self, logits, labels):
        labels = np.asarray(labels)
        if labels.shape != logits.shape[:-1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self} expects integer labels of shape {logits.shape[:-1]}, got "
                             f"{labels.dtype} {labels.shape}")
        self.shape = logits.shape
        z, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).astype(np.int64)
        m = communicate(self, "all_reduce", z.max(axis=1), "max")
        mine = (y >= self.lo) & (y < self.hi)
        self.labels = np.where(mine, y - self.lo, -1)
        rows = np.flatnonzero(mine)
        exp = np.exp(z - m[:, None])
        sums = np.stack([exp.sum(axis=1), np.zeros(len(y), z.dtype)])
        sums[1, rows] = z[rows, self.labels[rows]]
        s, z_y = communicate(self, "all_reduce", sums, "sum")  # Σ exp(z − m), z_y
        exp /= s[:, None]
        self.probs = exp
        return float(np.mean(np.log(s) + m - z_y))

    def backward(self):
        grad = self.probs.copy()
        rows = np.flatnonzero(self.labels >= 0)
        grad[rows, self.labels[rows]] -= 1.0
        grad /= len(grad)
        return grad.reshape(self.shape)
