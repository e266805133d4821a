"""Hybrid parallelism: data parallel over model-parallel groups — the article's closing theme.

    Topology(dp, tp, pp): world_size = dp·tp·pp ranks, rank = (d·pp + s)·tp + k

Rank (d, s, k) holds tensor-parallel part k of pipeline stage s of data-parallel replica d.
Tensor-parallel peers get adjacent ranks (they talk most: all-reduces twice per MLP block and
four times per transformer block each step, forward and backward). Three
sub-communicators from comm.split: `tp` (same d, s), `pp` (same d, k) and `dp` (same s, k).
One step: replica d takes its shard of the global batch, runs it through its pipeline of
tensor-parallel stages, and the ranks that hold the same part of the model all-reduce their
gradients (each weighted by |B_d|/|B|) over `dp` before the optimizer step.

strategy="tensor_parallel" is Topology(1, t, 1), "pipeline" Topology(1, 1, p): one engine.
With cp > 1 (dp × cp: context_parallel.worker, a ring in each replica) or ep > 1 (dp × ep:
expert_parallel.worker, an ep group in each replica) the job goes to those workers; they do
not compose with tp or pp, nor with each other.

Memory (the rank's "memory"): params and grads of its ModelShard, plus run_batch's `total`
(the sum of the micro-batch gradients, as long as the shard's) as grads; the optimizer over
the shard; activations: the most bytes the stashed micro-batches held at once (pipeline.run_batch).
`shard.index` (where each element lives in the full buffer) is bookkeeping, not in the ledger.
Under schedule="interleaved_1f1b" the shard is a chunks.StageChunks (the rank's v chunks of
layers, one buffer) and `details["layers"]` lists their v (start, stop).
"""

from dataclasses import dataclass

import numpy as np

from minidist import memory
from minidist.data import check_integer, shard_bounds
from minidist.parallel import context_parallel, expert_parallel, pipeline, tensor_parallel
from minidist.parallel.chunks import StageChunks
from minidist.parallel.job import Clock, merge_stats, report
from minidist.parallel.shard import ModelShard, gather_params

OPTIONS = {"dp": 1, "tp": 1, "pp": 1, **pipeline.OPTIONS, **tensor_parallel.OPTIONS,
           "micro_batches": 1, "cp": 1, "ep": 1, "load_balance": False}


@dataclass(frozen=True)
class Topology:
    """dp × tp × pp ranks: which replica, stage and tensor part each rank holds."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("dp", "tp", "pp"):
            check_integer(f"Topology: {name}", getattr(self, name))

    @property
    def world_size(self):
        return self.dp * self.tp * self.pp

    def coords(self, rank):
        """{"dp": d, "pp": s, "tp": k} of a rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        return {"dp": rank // (self.pp * self.tp), "pp": rank // self.tp % self.pp,
                "tp": rank % self.tp}

    def rank(self, dp=0, pp=0, tp=0):
        return (dp * self.pp + pp) * self.tp + tp

    def group(self, axis, rank):
        """The ranks that differ from `rank` only along `axis` ("dp", "tp" or "pp"), in order."""
        here = self.coords(rank)
        return [self.rank(**{**here, axis: i}) for i in range(getattr(self, axis))]

    def split(self, comm):
        """{"dp": …, "tp": …, "pp": …}: this rank's three sub-communicators (every rank calls)."""
        if comm.world_size != self.world_size:
            raise ValueError(f"{self} needs {self.world_size} ranks, the communicator has "
                             f"{comm.world_size}")
        groups = {}
        for axis in ("tp", "pp", "dp"):  # every rank splits in the same order
            members = self.group(axis, comm.rank)
            groups[axis] = comm.split(color=min(members), key=self.coords(comm.rank)[axis])
        return groups

    def __str__(self):
        return f"dp×tp×pp = {self.dp}×{self.tp}×{self.pp}"


def check_options(options):
    pipeline.check_options(options)
    tensor_parallel.check_options(options)


def check_job(model_fn, workers, batch_size, options, data_shape, defaults=OPTIONS):
    """Clear errors, before any rank starts, for shapes that cannot work (data_shape: the
    training inputs' shape, (rows, T) for a GPT)."""
    given, options = set(options), {**OPTIONS, **defaults, **options}
    for name in ("cp", "ep"):
        check_integer(name, options[name])
    if options["cp"] > 1 or options["ep"] > 1:
        return _check_cp_ep(model_fn, workers, batch_size, options, data_shape, given)
    if options["load_balance"]:
        raise ValueError("load_balance=True balances context parallelism's ring: it needs "
                         "cp > 1")
    topology = Topology(options["dp"], options["tp"], options["pp"])
    if topology.world_size != workers:
        raise ValueError(f"{topology} = {topology.world_size} ranks, but workers={workers}")
    model = model_fn()
    chunks = options["chunks"]
    if options["schedule"] == "interleaved_1f1b":
        if chunks > 1 and topology.pp == 1:
            raise ValueError(f"chunks={chunks} needs at least 2 pipeline stages, got 1")
        pipeline.check_micro_batches(options["micro_batches"], topology.pp)
        if topology.pp * chunks > len(model.layers):
            raise ValueError(f"{topology.pp} pipeline stages × chunks={chunks} = "
                             f"{topology.pp * chunks} chunks, more than the model's "
                             f"{len(model.layers)} layers")
    for start, stop in pipeline.stage_bounds(model, topology.pp * chunks, options["cuts"]):
        tensor_parallel.check_split(model.layers, topology.tp, start, stop)
    if options["sequence_parallel"] and topology.tp > 1:
        tensor_parallel.check_sequence_parallel(model.layers, topology.tp, data_shape[1])
    if batch_size < topology.dp * options["micro_batches"]:
        raise ValueError(f"batch_size={batch_size} cannot give dp={topology.dp} replicas "
                         f"{options['micro_batches']} micro-batches of at least one row each")


def _check_cp_ep(model_fn, workers, batch_size, options, data_shape, given):
    """dp × cp or dp × ep: no tp, pp or pipeline options beside them; workers = dp·cp (dp·ep);
    then context_parallel's or expert_parallel's own checks."""
    cp, ep, dp = options["cp"], options["ep"], options["dp"]
    check_integer("dp", dp)
    axis = f"cp={cp}" if cp > 1 else f"ep={ep}"
    if cp > 1 and ep > 1:
        raise ValueError(f"cp={cp} and ep={ep} do not compose here: context parallelism "
                         "splits every sequence over its ranks, and a mixture of experts "
                         "routes (capacity, load-balancing loss) whole sequences")
    allowed = {"dp", "tp", "pp", "cp", "ep", "algorithm"} | ({"load_balance"} if cp > 1 else set())
    extra = sorted(name for name in given - allowed)
    extra += [f"{name}={options[name]}" for name in ("tp", "pp") if options[name] > 1]
    if extra:
        raise ValueError(f"{axis} and {', '.join(extra)} do not compose here: "
                         f"{'context' if cp > 1 else 'expert'} parallelism runs in data-parallel "
                         f"replicas of the whole model (dp × {axis.split('=')[0]}), without "
                         "tensor or pipeline parallelism")
    if dp * max(cp, ep) != workers:
        raise ValueError(f"dp×{axis.split('=')[0]} = {dp}×{max(cp, ep)} = {dp * max(cp, ep)} "
                         f"ranks, but workers={workers}")
    if cp > 1:
        if batch_size < dp:
            raise ValueError(f"batch_size={batch_size} cannot give dp={dp} replicas a "
                             "sequence each")
        context_parallel.check_job(model_fn, cp, batch_size, options, data_shape)
    else:
        expert_parallel.check_job(model_fn, workers, batch_size, options, data_shape, dp, "ep")


def worker(comm, job, topology=None, defaults=OPTIONS):
    """strategy="hybrid" (and, with a fixed topology, the two model-parallel strategies)."""
    options = {**OPTIONS, **defaults, **job.options}
    if topology is None and options["cp"] > 1:
        return context_parallel.worker(comm, job, options["dp"])
    if topology is None and options["ep"] > 1:
        return expert_parallel.worker(comm, job, options["dp"])
    topology = topology or Topology(options["dp"], options["tp"], options["pp"])
    groups = topology.split(comm)
    here = topology.coords(comm.rank)
    clock, losses, peaks = Clock(job.steps, job.max_memory_per_rank, comm.rank), [], []
    model = job.model_fn()
    bounds = pipeline.stage_bounds(model, topology.pp * options["chunks"], options["cuts"])
    mine = bounds[here["pp"]::topology.pp]  # chunks s, s+p, …: one unless interleaved
    tp_comm = groups["tp"] if topology.tp > 1 else None
    split = (tp_comm, clock, options["algorithm"], options["sequence_parallel"])
    shard = (StageChunks(model, mine, *split) if options["schedule"] == "interleaved_1f1b"
             else ModelShard(model, *mine[0], *split))
    del model
    optimizer = job.make_optimizer(shard.params)
    total = np.zeros_like(shard.grads)  # run_batch sums the micro-batches' gradients here
    clock.ledger.hold(params=memory.array_bytes(shard.params),
                      grads=memory.array_bytes(shard.grads, total),
                      optimizer=memory.optimizer_bytes(optimizer))
    comm.stats.reset()  # count the training's traffic, not the set-up's
    for t, batch in enumerate(job.global_batches(comm.rank)):
        clock.begin(t)
        a, b = shard_bounds(len(batch), here["dp"], topology.dp)
        rows = batch[a:b]
        loss, peak = pipeline.run_batch(
            shard, groups["pp"] if topology.pp > 1 else None, job.X, job.y, rows,
            (b - a) / len(batch), options["micro_batches"], options["schedule"], clock, total)
        if shard.partial.size:  # sequence parallel: each LayerNorm's γ, β saw T/tp positions
            shard.grads[shard.partial] = clock.timed(
                "comm", groups["tp"].all_reduce, shard.grads[shard.partial], "sum",
                options["algorithm"])
        if topology.dp > 1:
            clock.timed("comm", groups["dp"].all_reduce, shard.grads, "sum",
                        options["algorithm"])
        clock.trace.timed("optimizer", optimizer.step, shard.grads)
        losses.append(loss if here["tp"] == 0 else 0.0)  # report() sums them (a stage's MoE
        # blocks add their load-balancing loss; the last stage the task loss)
        peaks.append(peak)
        clock.end()
    clock.compute = clock.step - clock.comm
    merge_stats(comm, groups.values())
    out = report(comm, shard.params, losses, clock)
    out["params"] = gather_params(comm, shard)
    out["details"] = {**here, "layers": mine[0] if len(mine) == 1 else mine,
                      "shard": repr(shard),
                      "param_bytes": shard.params.nbytes,
                      "peak_activations": max(peaks),
                      "peak_activation_bytes": clock.ledger.activations}
    return out


def tensor_parallel_worker(comm, job):
    """strategy="tensor_parallel": every rank the whole batch, the matrices split t ways."""
    return worker(comm, job, Topology(tp=comm.world_size), tensor_parallel.OPTIONS)


def pipeline_worker(comm, job):
    """strategy="pipeline": one stage per rank."""
    return worker(comm, job, Topology(pp=comm.world_size), pipeline.OPTIONS)


def check_tensor_parallel(model_fn, workers, batch_size, options, data_shape):
    check_job(model_fn, workers, batch_size, {**options, "tp": workers}, data_shape,
              defaults=tensor_parallel.OPTIONS)


def check_pipeline(model_fn, workers, batch_size, options, data_shape):
    check_job(model_fn, workers, batch_size, {**options, "pp": workers}, data_shape,
              defaults=pipeline.OPTIONS)
