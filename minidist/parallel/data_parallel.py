"""Data parallelism: every rank a full replica; gradients averaged with all-reduce.

Each step: rank 0's parameters were broadcast at the start, so all replicas agree; every rank
computes the gradient of its shard of the global batch (over `accumulate` micro-batches),
weights it by |B_k|/|B| while copying it into a buffer the backend can share, all-reduces that
buffer bucket by bucket (`bucket_bytes`: a large model does not wait for one huge message),
and every replica takes the same optimizer step. To send less (top-k with error feedback,
QSGD, local SGD: the `compression`, `compress_ratio`, `qsgd_levels`, `error_feedback` and
`local_steps` options), see minidist.parallel.compression.

Mixed precision (job.options "precision" and "loss_scale", from train; minidist.precision):
with fp16 or bf16 each rank writes its weighted (fp16: loss-scaled) gradient into a 16-bit
shared buffer and
the all-reduce sums in 16 bits, sending half of fp32's bytes. Every rank then holds the same
reduced buffer, so all see the same inf or NaN and skip the same steps.
"""

import numpy as np

from minidist.data import check_integer, shard_bounds
from minidist.parallel import compression
from minidist.parallel.buckets import buckets
from minidist.parallel.job import Clock, report
from minidist.precision import LOSS_SCALE, MixedPrecision

OPTIONS = {"bucket_bytes": 1 << 20, "accumulate": 1, "algorithm": "auto", **compression.OPTIONS}


def check_options(options):
    """bucket_bytes >= 1, accumulate >= 1 (integers), algorithm one of the all-reduce
    algorithms."""
    from minidist.comm import ALGORITHMS

    check_integer("bucket_bytes", options.get("bucket_bytes", 1))
    check_integer("accumulate", options.get("accumulate", 1))
    if options.get("algorithm", "auto") not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {options['algorithm']!r}; "
                         f"allowed: {', '.join(ALGORITHMS)}")
    compression.check_options(options)


def worker(comm, job):
    options = {**OPTIONS, **job.options}
    model = job.model_fn()
    comm.broadcast(model.params, src=0)
    mixed = MixedPrecision(model, job.make_optimizer, options.get("precision"),
                           options.get("loss_scale", LOSS_SCALE))
    synced = comm.alloc(model.grads.shape, mixed.grad_dtype)  # shared: no copy-in to reduce
    slices = buckets(model.num_params, synced.itemsize, options["bucket_bytes"])
    compressed = compression.make_all_reduce(options, model.num_params, comm.rank, job.seed)
    clock, weighted_losses = Clock(job.steps, job.max_memory_per_rank, comm.rank), []
    mixed.hold(clock.ledger, synced)
    with mixed.running():  # fp16: an overflow is expected (S too large), and skipped
        for t, (rows, weight) in enumerate(job.my_batches(comm.rank, comm.world_size)):
            clock.begin(t)
            loss, first = 0.0, True
            for part in range(options["accumulate"]):  # micro-batches, summed before one sync
                start, stop = shard_bounds(len(rows), part, options["accumulate"])
                if stop > start:
                    micro = rows[start:stop]
                    share = weight * len(micro) / len(rows)  # of the global batch
                    loss += share * clock.forward_backward(model, job.X[micro], job.y[micro])
                    clock.timed("compute", _accumulate, synced, model.grads, share, first,
                                event="backward")
                    first = False
            if first:  # an empty shard: this rank adds nothing
                synced[...] = 0.0
            weighted_losses.append(loss)
            if options["local_steps"] > 1:  # local SGD: my own step; θ averaged every H steps
                clock.timed("compute", mixed.step, synced / weight)
                if (t + 1) % options["local_steps"] == 0 or t + 1 == job.steps:
                    clock.timed("comm", compression.average_parameters, comm,
                                model.params, weight, event="all_reduce")
            else:
                if compressed is not None:
                    compressed(comm, synced, clock)
                else:
                    for bucket in slices:
                        clock.timed("comm", comm.all_reduce, synced[bucket], "sum",
                                    options["algorithm"])
                clock.timed("compute", mixed.step, synced)
            clock.end()
    return {**report(comm, mixed.params, weighted_losses, clock), **mixed.record()}


def _accumulate(total, grads, share, first):
    """total = share · grads for the first micro-batch, then total += share · grads."""
    if first:
        np.multiply(grads, share, out=total)
    else:
        total += share * grads
