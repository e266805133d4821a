"""Expert parallelism (strategy="expert_parallel"; with dp replicas, strategy="hybrid", ep=e):
the E experts of every mixture-of-experts block spread over e ranks (GShard, Switch).

Rank k of the ep group holds experts [k·E/e, (k+1)·E/e) of every MoE block; everything else
(embedding, attention, LayerNorms, routers, head) is data-parallel: replicated, rank r taking
rows shard_bounds(|B|, r, p) of the global batch (whole sequences, so each token's routing and
capacity are single's) and weighting its gradient by |B_r|/|B|. In each MoE block (nn.moe):

    route         router, top-k, capacity and gates on the token's own rank (as single)
    dispatch      the kept assignments' rows go to their experts' ranks: dispatch_chunks, then
                  comm.all_to_all (with each chunk's per-expert row counts sent first)
    experts       rank k runs each of its experts once, on the rows every rank sent it
    combine       the outputs go back (a second all_to_all; combine_chunks restores the order)
                  and are gated and summed on the token's own rank
    backward      ∂(outputs) go to the experts' ranks, ∂(inputs) come back: two more all_to_alls

Gradients: the dense ones are all-reduced (sum of the weighted shares) over all p = dp·e ranks;
an expert's gradient already holds every row of its ep group, so it stays on its owner (dp = 1)
or is all-reduced over the dp ranks that hold the same experts. With rank = d·e + k the ep
group of replica d holds consecutive ranks, so its rows reach each expert in single's order.
Bytes: cost.expert_parallel_bytes_per_rank; parameters: memory.expert_parallel_param_bytes.
"""

import numpy as np

from minidist import memory
from minidist.nn.moe import MoE, aux_loss, moe_layers
from minidist.nn.transformer import GPT
from minidist.parallel.job import Clock, check_algorithm, merge_stats, report
from minidist.parallel.shard import gather_params

OPTIONS = {"algorithm": "auto"}


def dispatch_chunks(x_rows, expert_of_row, experts_per_rank, world_size):
    """(chunks, order): chunks[j] holds the rows of x_rows (M, d) whose expert
    expert_of_row[i] lives on rank j (experts [j·n, (j+1)·n), n = experts_per_rank), sorted by
    expert, rows of one expert in their order in x_rows; order (M,) says which row is where:
    concatenate(chunks) == x_rows[order]. The chunks are what comm.all_to_all sends."""
    order = np.argsort(expert_of_row, kind="stable")
    counts = np.bincount(np.asarray(expert_of_row) // experts_per_rank, minlength=world_size)
    ends = np.cumsum(counts)
    ordered = x_rows[order]
    return [ordered[end - n:end] for n, end in zip(counts, ends, strict=True)], order


def combine_chunks(chunks, order):
    """dispatch_chunks's inverse: the rows back in x_rows's order, rows[order] =
    concatenate(chunks) (chunks: what came back, item j from rank j, in the order sent)."""
    stacked = np.concatenate(chunks)
    rows = np.empty_like(stacked)
    rows[order] = stacked
    return rows


class ExpertParallelMoE(MoE):
    """`moe`'s router and its experts [k·E/e, (k+1)·E/e) for rank k of the ep group `comm`;
    the rest of its experts run on the other ranks (experts_forward, experts_backward).
    tokens_to: after a forward, the rows this rank sent to each rank of the group (its own
    included: they stay home)."""

    def __init__(self, moe, comm, clock=None):
        super().__init__(moe.d_model, moe.d_ff, moe.n_experts, moe.top_k, moe.capacity_factor,
                         moe.aux_loss_coef)
        self.comm, self.clock = comm, clock
        self.per_rank = moe.n_experts // comm.world_size
        self.first = comm.rank * self.per_rank
        self.router, self.experts = moe.router, moe.experts[self.first:self.first + self.per_rank]
        self.tokens_to = None

    def __repr__(self):
        return (f"ExpertParallelMoE(experts {self.first}…{self.first + self.per_rank - 1} of "
                f"{self.n_experts} on rank {self.comm.rank} of {self.comm.world_size}, "
                f"top_k={self.top_k})")

    def parts(self):
        return {"router": self.router, **{f"experts.{self.first + i}": x
                                          for i, x in enumerate(self.experts)}}

    def _all_to_all(self, chunks):
        if self.clock is None:
            return self.comm.all_to_all(chunks)
        return self.clock.timed("comm", self.comm.all_to_all, chunks, event="all_to_all")

    def _exchange(self, rows, run):
        """Send `rows` (the kept assignments', token order) to their experts' ranks, apply
        run(l, rows of local expert l) there, bring the results back: one list per expert
        e = 0 … E−1 of its rows' results, in MoE's dispatch order."""
        chunks, order = dispatch_chunks(rows, self.sent_experts, self.per_rank,
                                        self.comm.world_size)
        back = self._all_to_all(self._run_local(self._all_to_all(chunks), run))
        ordered = combine_chunks(back, order)[np.argsort(self.sent_experts, kind="stable")]
        return np.split(ordered, np.cumsum(self.counts)[:-1])

    def _run_local(self, received, run):
        """received[i]: rank i's rows for my experts, grouped by expert (`self.counts_in[i, l]`
        rows for local expert l); run each local expert once on all its rows (rank 0's first,
        then rank 1's, …: single's token order); the results laid out as received."""
        flat = np.concatenate(received)
        expert = np.repeat(np.tile(np.arange(self.per_rank), len(received)),
                           self.counts_in.reshape(-1))
        perm = np.argsort(expert, kind="stable")  # expert by expert
        by_expert = np.split(flat[perm], np.cumsum(self.counts_in.sum(axis=0))[:-1])
        out = np.empty_like(flat)
        out[perm] = np.concatenate([run(lo, x) for lo, x in enumerate(by_expert)])
        return np.split(out, np.cumsum(self.counts_in.sum(axis=1))[:-1])

    def experts_forward(self, rows):
        kept = np.flatnonzero(self.kept.reshape(-1))  # the kept assignments a = r·k + j
        self.sent_experts = self.assignment.reshape(-1)[kept]
        e = self.comm.world_size
        counts = np.bincount(self.sent_experts, minlength=self.n_experts).reshape(e, -1)
        self.tokens_to = tuple(int(n) for n in counts.sum(axis=1))
        self.counts_in = np.stack(self._all_to_all(list(counts)))  # (e, E/e): who sends what
        return self._exchange(rows[kept // self.top_k], lambda lo, x: self.rounded(
            self.experts[lo].forward(x)))

    def experts_backward(self, d_outputs):
        d_rows = np.empty((len(self.sent_experts), self.d_model), d_outputs[0].dtype)
        d_rows[np.argsort(self.sent_experts, kind="stable")] = np.concatenate(d_outputs)
        return self._exchange(d_rows, lambda lo, d: self.experts[lo].backward(d))


class ExpertShard:
    """A GPT's layers with every MoE block an ExpertParallelMoE of `ep_comm`, in this rank's
    own flat buffers: the dense parameters first (params[:dense]), then its experts. index:
    where each element lives in the full model's buffer (shard.gather_params)."""

    def __init__(self, model, ep_comm, clock=None):
        self.layers, self.criterion = model.layers, model.criterion
        for block in self.layers:
            if isinstance(getattr(block, "ffn", None), MoE):
                block.moe = ExpertParallelMoE(block.moe, ep_comm, clock)
        entries = [(i, name, shape) for i, layer in enumerate(self.layers)
                   for name, shape in layer.param_shapes().items()]
        entries.sort(key=lambda entry: ".experts." in entry[1])  # stable: dense first
        sizes = [int(np.prod(shape)) for _, _, shape in entries]
        self.dense = sum(n for n, (_, name, _) in zip(sizes, entries, strict=True)
                         if ".experts." not in name)
        self.params = np.zeros(sum(sizes), model.dtype)
        self.grads = np.zeros_like(self.params)
        self.index, self.full_size = np.zeros(sum(sizes), np.int64), model.num_params
        views, offset = [({}, {}) for _ in self.layers], 0
        for (i, name, shape), n in zip(entries, sizes, strict=True):
            where = model.slices[f"{i}.{name}"]
            span = slice(offset, offset + n)
            self.params[span], self.index[span] = model.params[where], np.arange(where.start,
                                                                                 where.stop)
            views[i][0][name] = self.params[span].reshape(shape)
            views[i][1][name] = self.grads[span].reshape(shape)
            offset += n
        for layer, (p, g) in zip(self.layers, views, strict=True):
            layer.bind(p, g)
        self.moes = moe_layers(self.layers)

    def loss(self, X, y):
        """The mean cross-entropy of my rows + Σ_blocks aux_loss_coef · aux (GPT.loss)."""
        for layer in self.layers:
            X = layer.forward(X)
        return self.criterion.forward(X, y) + aux_loss(self.layers)

    def backward(self, share):
        """Overwrite `grads` with ∇(share · loss): the task loss's and the aux losses' seeds
        weighted by share = |B_r|/|B| (MoE.loss_weight), so an expert's gradient sums every
        rank's share."""
        for layer in self.moes:
            layer.loss_weight = share
        try:
            d = share * self.criterion.backward()
            for layer in reversed(self.layers):
                d = layer.backward(d)
        finally:
            for layer in self.moes:
                del layer.loss_weight


def check_options(options):
    """algorithm: one of the all-reduce algorithms (the gradients' all-reduces)."""
    check_algorithm(options)


def check_job(model_fn, workers, batch_size, options, data_shape, dp=1, name="workers"):
    """Before any rank starts: a mixture-of-experts GPT whose n_experts the e = workers / dp
    ranks of an ep group divide (`name`: how the caller calls e), one row per rank at least."""
    model = model_fn()
    if not isinstance(model, GPT) or not model.n_experts:
        raise ValueError(f"expert parallelism spreads the experts of a mixture-of-experts GPT "
                         f"over ranks: it needs nn.gpt(..., n_experts=E), got {model!r}")
    ep = workers // dp
    if model.n_experts % ep:
        raise ValueError(f"n_experts={model.n_experts} must be divisible by {name}={ep}: "
                         f"every rank of the ep group holds n_experts / {ep} whole experts")
    if batch_size < workers:
        raise ValueError(f"batch_size={batch_size} is smaller than the {workers} ranks: every "
                         f"rank needs at least one sequence")


def worker(comm, job, dp=1):
    """strategy="expert_parallel" (dp = 1), and hybrid's dp × ep: rank = d·e + k."""
    options = {**OPTIONS, **job.options}
    algorithm, e = options["algorithm"], comm.world_size // dp
    d, k = divmod(comm.rank, e)
    ep_comm = comm if dp == 1 else comm.split(color=d, key=k)
    dp_comm = None if dp == 1 else comm.split(color=k, key=d)
    model = job.model_fn()
    comm.broadcast(model.params, src=0)
    clock = Clock(job.steps, job.max_memory_per_rank, comm.rank)
    shard = ExpertShard(model, ep_comm, clock)
    del model
    optimizer = job.make_optimizer(shard.params)
    clock.ledger.hold(params=memory.array_bytes(shard.params),
                      grads=memory.array_bytes(shard.grads),
                      optimizer=memory.optimizer_bytes(optimizer))
    comm.stats.reset()  # count the training's traffic, not the set-up's
    losses, tokens_to = [], []
    for t, (rows, share) in enumerate(job.my_batches(comm.rank, comm.world_size)):
        clock.begin(t)
        loss = clock.timed("compute", shard.loss, job.X[rows], job.y[rows], event="forward")
        tokens_to.append(np.array([layer.tokens_to for layer in shard.moes]))
        memory.track([*shard.layers, shard.criterion], clock.ledger)
        clock.timed("compute", shard.backward, share, event="backward")
        losses.append(share * loss)
        clock.timed("comm", comm.all_reduce, shard.grads[:shard.dense], "sum", algorithm)
        if dp_comm is not None:  # the replicas of my experts
            clock.timed("comm", dp_comm.all_reduce, shard.grads[shard.dense:], "sum", algorithm)
        clock.trace.timed("optimizer", optimizer.step, shard.grads)
        clock.end()
    clock.compute = clock.step - clock.comm  # the all_to_alls ran inside the compute
    if dp > 1:
        merge_stats(comm, [ep_comm, dp_comm])
    out = report(comm, shard.params, losses, clock)
    out["params"] = gather_params(comm, shard)
    first = shard.moes[0].first
    out["details"] = {"dp": d, "ep": k, "experts": (first, first + shard.moes[0].per_rank),
                      "tokens_to": tokens_to, "dense_params": shard.dense,
                      "param_bytes": shard.params.nbytes}
    return out
