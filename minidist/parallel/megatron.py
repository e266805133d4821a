"""Megatron-LM tensor parallelism for the GPT (Shoeybi et al. 2019): each block over t ranks.

    attention  rank k runs heads [k·H/t, (k+1)·H/t): W_qkv[:, heads], b_qkv[:, heads] are
               column-parallel (Q, K and V by head groups), W_o[heads] row-parallel;
               Y = g(Σ_k O_k W_o[k]) + b_o, b_o whole on every rank and added once
    MLP        fc column-parallel (d_ff/t columns), GELU on them, proj row-parallel
    f, g       Megatron's conjugate operators around both (tensor_parallel.py), or sequence
               parallelism's all-gather / reduce-scatter (sequence_parallel.py)

so a block sends two all-reduces of N·T·d forward and two backward (with sequence
parallelism: two reduce-scatters and two all-gathers each way, plus the all-gathers of the
column-parallel inputs in backward). The LayerNorms stay whole; under sequence parallelism
they see T/t positions, so their γ and β gradients are partial sums over the tp group
(`partial_params`), summed once per step. The GPT's ends are vocabulary-parallel
(vocab_parallel.py). Each `take(rank, t, **params)` gives this rank's part of a full layer's
named parameters (views), so ModelShard's full[index] = local rule puts the model together.
"""

from minidist.nn import Block, LayerNorm
from minidist.nn.attention import CausalSelfAttention
from minidist.nn.transformer import GELU, MLP
from minidist.parallel.sequence_parallel import region_operators
from minidist.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, _group
from minidist.parallel.vocab_parallel import VocabParallelEmbedding, VocabParallelHead

KINDS = ("embedding", "block", "head")  # tensor_parallel.plan's names for a GPT's layers


def take_parts(layer, rank, t, **values):
    """A composite layer's `take`: each part's own take of its "part.name" values (a part
    without one, a LayerNorm, is kept whole)."""
    out = {}
    for p, part in layer.parts().items():
        mine = {name[len(p) + 1:]: v for name, v in values.items() if name.startswith(p + ".")}
        taken = part.take(**mine, rank=rank, t=t) if hasattr(part, "take") else mine
        out.update({f"{p}.{name}": v for name, v in taken.items()})
    return out


class ParallelAttention(CausalSelfAttention):
    """This rank's H/t heads of CausalSelfAttention(d, H), each of width d/H:
    Y = g(O_k W_o[k]) + b_o with O_k = the local heads' output of f(X). Under sequence
    parallelism it keeps only the local chunk of its input and all-gathers it again (f) in
    backward, for ∂W_qkv."""

    def __init__(self, d_model, n_heads, f, g):
        _, t = _group(f.comm)
        super().__init__(d_model, n_heads // t, d_head=d_model // n_heads)
        self.total_heads, self.f, self.g = n_heads, f, g

    def __repr__(self):
        return (f"ParallelAttention(d_model={self.d_model}, heads {self.n_heads} of "
                f"{self.total_heads})")

    @staticmethod
    def take(W_qkv, b_qkv, W_o, b_o, rank, t):
        """Heads [rank·H/t, (rank+1)·H/t) of W_qkv (3, H, d, d_h), b_qkv, W_o; b_o whole."""
        H = W_o.shape[0]
        heads = slice(rank * H // t, (rank + 1) * H // t)
        return {"W_qkv": W_qkv[:, heads], "b_qkv": b_qkv[:, heads], "W_o": W_o[heads],
                "b_o": b_o}

    def forward(self, X):
        full = self.f.forward(X)
        heads = self.heads(full)
        self.X = X  # the input as it came in: the local chunk under sequence parallelism
        Y = (heads @ self.params["W_o"].reshape(-1, self.d_model)).reshape(full.shape)
        return self.g.forward(Y) + self.params["b_o"]

    def backward(self, dY):
        dY = self.g.backward(dY).reshape(-1, self.d_model)  # the whole ∂Y, every position
        W_o = self.params["W_o"].reshape(-1, self.d_model)
        self.grads["W_o"][...] = (self.O.T @ dY).reshape(self.grads["W_o"].shape)
        self.grads["b_o"][...] = dY.sum(axis=0)
        return self.f.backward(self.heads_backward(dY @ W_o.T, self.f.forward(self.X)))


class ParallelMLP(MLP):
    """fc column-parallel (d → d_ff/t), GELU, proj row-parallel (d_ff/t → d, b_proj added once
    after g); MLP's forward and backward."""

    take = take_parts

    def __init__(self, d_model, d_ff, f, g):
        self.fc = ColumnParallelLinear(d_model, d_ff, f.comm, f=f)
        self.gelu = GELU()
        self.proj = RowParallelLinear(d_ff, d_model, g.comm, g=g)

    def __repr__(self):
        return f"ParallelMLP({self.fc!r}, {self.proj!r})"


class ParallelBlock(Block):
    """A Block with ParallelAttention and ParallelMLP, the full block's LayerNorms kept whole
    (the same objects, rebound); Block's residuals, recomputation and rounding unchanged.
    With recompute, backward reruns the forward and so its communication."""

    take = take_parts

    def __init__(self, block, comm, clock=None, algorithm="auto", sequence_parallel=False):
        d, H, d_ff = block.attn.d_model, block.attn.n_heads, block.mlp.fc.d_out
        super().__init__(d, H, d_ff, recompute=block.recompute)  # then its parts replaced:
        self.ln1, self.ln2 = block.ln1, block.ln2
        self.attn = ParallelAttention(d, H, *region_operators(comm, clock, algorithm,
                                                              sequence_parallel))
        self.mlp = ParallelMLP(d, d_ff, *region_operators(comm, clock, algorithm,
                                                          sequence_parallel))

    def __repr__(self):
        return (f"ParallelBlock(d_model={self.attn.d_model}, heads {self.attn.n_heads} of "
                f"{self.attn.total_heads}, d_ff {self.mlp.fc.d_local} of {self.mlp.fc.d_out}"
                f"{', recompute' if self.recompute else ''})")


def parallel_layer(kind, full, comm, clock=None, algorithm="auto", sequence_parallel=False):
    """This rank's layer for `full`, a GPT layer of tensor_parallel.plan's `kind` (KINDS)."""
    if kind == "block":
        return ParallelBlock(full, comm, clock, algorithm, sequence_parallel)
    f, g = region_operators(comm, clock, algorithm, sequence_parallel)
    if kind == "embedding":
        return VocabParallelEmbedding(full.vocab_size, full.context, full.d_model, g)
    if kind == "head":
        return VocabParallelHead(full.d_in, full.d_out, comm, f=f)
    raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")


def partial_params(layer, prefix=""):
    """The names of `layer`'s parameters whose gradients are partial sums over the tp group
    under sequence parallelism: every LayerNorm's γ and β (each rank saw T/t positions)."""
    if isinstance(layer, LayerNorm):
        return [prefix + name for name in layer.param_shapes()]
    parts = layer.parts() if hasattr(layer, "parts") else {}
    return [name for p, part in parts.items() for name in partial_params(part, f"{prefix}{p}.")]
