"""Context parallelism (strategy="context_parallel"): the sequence split over c ranks.

Every rank holds the whole model and all N sequences of the global batch, but only T/c
positions of each: rank r holds ring_attention.chunks(T, c, r, load_balance), the positions
[r·T/c, (r+1)·T/c), or with load_balance the chunks r and 2c−1−r of T/(2c) (a front and a back
chunk, so that every rank does the same causal attention work). Then

    embedding  x = wte[tokens] + wpe[p] at the GLOBAL positions p of the rank's chunks
    blocks     LayerNorms, MLP and residuals on the local positions; attention is ring
               attention (ring_attention.RingAttention): the K/V blocks go round the ring
    loss       L = Σ_r (T_r/T) L_r, L_r the mean over rank r's N·T_r positions (T_r = T/c)
    gradients  each rank backpropagates its own L_r; the ∂K, ∂V that ring attention sends
               home carry the other ranks' shares, so Σ_r ∇_r = ∇ Σ_r L_r, and with every
               share T_r/T = 1/c the step's gradient is Σ_r (1/c)·∇_r: one all-reduce (sum)
               of the weighted gradients per step, as data parallelism

and every rank takes the same optimizer step. Activations per rank are 1/c of a one-rank
run's (memory.context_activation_bytes), and ring attention never keeps the T×T softmax; the
peak adds the ring's blocks in flight (memory.context_peak_bytes); bytes per rank and step:
cost.context_parallel_bytes_per_rank.
"""

import numpy as np

from minidist import memory
from minidist.nn.transformer import GPT, Block, Embedding
from minidist.parallel.job import Clock, check_algorithm, merge_stats, report
from minidist.parallel.ring_attention import RingAttention, chunks

OPTIONS = {"load_balance": False, "algorithm": "auto"}


def check_options(options):
    """algorithm: one of the all-reduce algorithms (the gradients' all-reduce)."""
    check_algorithm(options)


def check_job(model_fn, workers, batch_size, options, data_shape):
    """Before any rank starts: the model must be a GPT and its sequences of T = data_shape[1]
    positions must cut into c = workers chunks (2c with load_balance)."""
    model = model_fn()
    if not isinstance(model, GPT):
        raise ValueError(f"strategy='context_parallel' splits sequences of tokens over ranks: "
                         f"it needs a GPT (minidist.nn.gpt), got {type(model).__name__}")
    if model.n_experts:
        raise ValueError("strategy='context_parallel' does not take mixture-of-experts GPTs: "
                         "their routing is per sequence (each expert's capacity and the "
                         "load-balancing loss count a whole sequence's tokens), and context "
                         "parallelism splits every sequence over the ranks")
    chunks(data_shape[1], workers, 0, options.get("load_balance", False))


class ChunkEmbedding(Embedding):
    """x = wte[tokens] + wpe[p] for tokens (N, T_r) at the global positions p of `chunks`
    [(start, stop), ...] (kept as numbers, not as an array: no activation).
    ∂wpe[p] = Σ_n ∂x[n, p]."""

    def __init__(self, embedding, chunks):
        super().__init__(embedding.vocab_size, embedding.context, embedding.d_model)
        self.chunks = tuple(chunks)

    def __repr__(self):
        return f"ChunkEmbedding(vocab={self.vocab_size}, positions {list(self.chunks)})"

    def forward(self, tokens):
        self.tokens = self.check_tokens(tokens)
        wpe = self.params["wpe"]
        return self.params["wte"][self.tokens] + np.concatenate(
            [wpe[start:stop] for start, stop in self.chunks])

    def backward(self, dX):
        super().backward(dX)  # ∂wte; its ∂wpe took positions 0 … T_r − 1: redone here
        d_wpe, offset = self.grads["wpe"], 0
        d_wpe[...] = 0.0
        for start, stop in self.chunks:
            d_wpe[start:stop] = dX[:, offset:offset + stop - start].sum(axis=0)
            offset += stop - start


def context_parallel(model, comm, load_balance=False, clock=None, seq_len=None):
    """Make a GPT `model` this rank's part of a context-parallel group `comm`, in place: its
    Embedding becomes a ChunkEmbedding of chunks(seq_len, c, rank, load_balance) and every
    block's attention a RingAttention, each bound to the same parameter views. Returns the
    chunks."""
    mine = chunks(seq_len, comm.world_size, comm.rank, load_balance)
    old = model.layers[0]
    model.layers[0] = ChunkEmbedding(old, mine)
    model.layers[0].bind(old.params, old.grads)
    for block in model.layers:
        if isinstance(block, Block):
            attn = block.attn
            block.attn = RingAttention(attn.d_model, attn.n_heads, comm, load_balance, clock,
                                       attn.d_head)
            block.attn.bind(attn.params, attn.grads)
    return mine


def worker(comm, job, dp=1):
    """strategy="context_parallel" (dp = 1), and hybrid's dp × cp: rank = d·c + k, the ring on
    the c ranks of replica d, which takes rows shard_bounds(|B|, d, dp) of the batch; every
    rank's gradient weighted by (T_r/T)·(|B_d|/|B|), one all-reduce over all dp·c ranks."""
    options = {**OPTIONS, **job.options}
    d, k = divmod(comm.rank, comm.world_size // dp)
    ring = comm if dp == 1 else comm.split(color=d, key=k)
    model = job.model_fn()
    comm.broadcast(model.params, src=0)
    clock = Clock(job.steps, job.max_memory_per_rank, comm.rank)
    T = job.X.shape[1]
    mine = context_parallel(model, ring, options["load_balance"], clock, T)
    positions = np.concatenate([np.arange(start, stop) for start, stop in mine])
    optimizer = job.make_optimizer(model.params)
    clock.ledger.hold(params=memory.array_bytes(model.params),
                      grads=memory.array_bytes(model.grads),
                      optimizer=memory.optimizer_bytes(optimizer))
    comm.stats.reset()  # count the training's traffic, not the set-up's
    losses = []
    for t, (batch, weight) in enumerate(job.my_batches(comm.rank, comm.world_size,
                                                        ring.world_size)):
        clock.begin(t)
        rows = np.ix_(batch, positions)
        share = len(positions) / T * weight  # (T_r/T)·(|B_d|/|B|)
        losses.append(share * clock.forward_backward(model, job.X[rows], job.y[rows]))
        model.grads *= share
        clock.timed("comm", comm.all_reduce, model.grads, "sum", options["algorithm"])
        clock.trace.timed("optimizer", optimizer.step, model.grads)
        clock.end()
    clock.compute = clock.step - clock.comm  # the ring's send/recv ran inside the compute
    if dp > 1:
        merge_stats(comm, [ring])
    out = report(comm, model.params, losses, clock)
    attention = next(block.attn for block in model.layers if isinstance(block, Block))
    out["details"] = {"dp": d, "cp": k, "chunks": mine, "block_pairs": dict(attention.block_pairs),
                      "chunk_len": mine[0][1] - mine[0][0],
                      "compute_time": clock.compute.copy()}
    return out
