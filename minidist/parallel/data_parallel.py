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

Overlap (overlap=True, as PyTorch's DDP): the buffer is cut into layer-aligned units
(buckets.units, last layer first, each at most bucket_bytes). The model gets a hook
(`Overlap`, a minidist.nn.UnitHooks) that, the moment the backward has written a unit's
gradients, copies them (weighted) into the unit's part of the buffer and launches its
all-reduce with async_op=True; the backward of the earlier layers runs on while it travels.
With accumulate > 1 only the last micro-batch's backward launches (the earlier ones add up, as
DDP's no_sync). After the backward the step waits for every handle, the time it spends blocked
there being its *exposed* communication (History.exposed_comm_time), then steps.

On the GPU (a model built with device="cuda"): θ, ∇, the weighted buffer and the optimizer's
state stay on the device; each bucket is copied down into a host twin, all-reduced there and
copied back up (minidist.comm.staging), so a step makes one copy down and one up per bucket,
besides the batch going over and the loss coming back. `details["host_copies"]` counts them.
Compression, local SGD and 16-bit precision run on the host only.
"""

import contextlib

from minidist import kernels
from minidist.comm.staging import HostStaging, staged_copies
from minidist.data import check_integer, shard_bounds
from minidist.nn import UnitHooks
from minidist.parallel import compression
from minidist.parallel.buckets import buckets, units
from minidist.parallel.job import Clock, check_algorithm, report
from minidist.precision import LOSS_SCALE, MixedPrecision

OPTIONS = {"bucket_bytes": 1 << 20, "accumulate": 1, "algorithm": "auto", "overlap": False,
           **compression.OPTIONS}


def check_options(options):
    """bucket_bytes >= 1, accumulate >= 1 (integers), algorithm one of the all-reduce
    algorithms; overlap not with compression or local_steps > 1 (they send something else
    than the gradient's buckets)."""
    check_integer("bucket_bytes", options.get("bucket_bytes", 1))
    check_integer("accumulate", options.get("accumulate", 1))
    check_algorithm(options)
    compression.check_options(options)
    if options.get("overlap", False) and (options.get("compression") is not None
                                          or options.get("local_steps", 1) > 1):
        raise ValueError("overlap=True all-reduces the gradient's buckets during the backward: "
                         "it does not combine with compression "
                         f"(got {options.get('compression')!r}) or local_steps > 1 "
                         f"(got {options.get('local_steps', 1)}); use overlap=False for those")


def check_job(model_fn, workers, batch_size, options, data_shape):
    """A model on the GPU: only the plain all-reduce of the gradient (16-bit precision on the
    GPU is refused with the other strategies', in minidist.arguments)."""
    model = model_fn()
    if not kernels.is_device_array(model.params):
        return
    host_only = [f"{name}={options[name]!r}" for name, plain in (
        ("compression", None), ("local_steps", 1)) if options.get(name, plain) != plain]
    if host_only:
        raise ValueError(f"data_parallel on a device='cuda' model all-reduces its gradient as "
                         f"it is; {', '.join(host_only)} runs on the host only: build the model "
                         "with device='numpy' for it")


def worker(comm, job):
    options = {**OPTIONS, **job.options}
    model = job.model(comm.rank)
    on_device = kernels.is_device_array(model.params)
    stagings = []
    if on_device:
        stagings.append(HostStaging(comm, model.params))
        stagings[0].broadcast(src=0)
    else:
        comm.broadcast(model.params, src=0)
    mixed = MixedPrecision(model, job.make_optimizer, options.get("precision"),
                           options.get("loss_scale", LOSS_SCALE))
    if on_device:  # the weighted gradient on the device, all-reduced through its host twin
        synced = kernels.zeros_like(model.grads)
        stagings.append(HostStaging(comm, synced))
    else:  # shared memory: no copy-in to reduce
        synced = comm.alloc(model.grads.shape, mixed.grad_dtype)
    staged = stagings[-1] if on_device else None
    slices = buckets(model.num_params, synced.dtype.itemsize, options["bucket_bytes"])
    compressed = compression.make_all_reduce(options, model.num_params, comm.rank, job.seed)
    clock, weighted_losses = Clock(job.steps, job.max_memory_per_rank, comm.rank), []
    mixed.hold(clock.ledger, synced)
    overlap = (Overlap(comm, clock, model, synced, options, staged) if options["overlap"]
               else None)
    hooked = overlap.attached(model) if overlap else contextlib.nullcontext()
    with mixed.running(), hooked:  # fp16: an overflow is expected (S too large), and skipped
        for t, (rows, weight) in enumerate(job.my_batches(comm.rank, comm.world_size)):
            clock.begin(t)
            loss, accumulate = 0.0, options["accumulate"]
            bounds = (shard_bounds(len(rows), part, accumulate) for part in range(accumulate))
            parts = [(start, stop) for start, stop in bounds if stop > start]  # non-empty
            for n, (start, stop) in enumerate(parts):  # micro-batches, summed before one sync
                micro = rows[start:stop]
                share = weight * len(micro) / len(rows)  # of the global batch
                launch = overlap is not None and n == len(parts) - 1
                if launch:  # this backward's hooks add the last share and launch the buckets
                    overlap.arm(share, first=n == 0)
                loss += share * clock.forward_backward(model, job.X[micro], job.y[micro])
                if not launch:
                    clock.timed("compute", _accumulate, synced, model.grads, share, n == 0,
                                event="backward")
            if not parts:  # an empty shard: this rank adds nothing
                kernels.ops_for(synced).scale_into(0.0, kernels.zeros_like(synced), synced)
            weighted_losses.append(loss)
            if options["local_steps"] > 1:  # local SGD: my own step; θ averaged every H steps
                clock.timed("compute", mixed.step, synced / weight)
                if (t + 1) % options["local_steps"] == 0 or t + 1 == job.steps:
                    clock.timed("comm", compression.average_parameters, comm,
                                model.params, weight, event="all_reduce")
            else:
                if overlap is not None:
                    overlap.finish()
                elif compressed is not None:
                    compressed(comm, synced, clock)
                elif staged is not None:
                    for bucket in slices:
                        clock.timed("comm", staged.all_reduce, bucket, "sum",
                                    options["algorithm"], event="all_reduce")
                else:
                    for bucket in slices:
                        clock.timed("comm", comm.all_reduce, synced[bucket], "sum",
                                    options["algorithm"])
                clock.timed("compute", mixed.step, synced)
            clock.end()
    details = {} if overlap is None else {"launches": overlap.launches}
    if on_device:
        details["host_copies"] = staged_copies(*stagings)
    return {**report(comm, mixed.params, weighted_losses, clock), **mixed.record(),
            "details": details}


def _accumulate(total, grads, share, first):
    """total = share · grads for the first micro-batch, then total += share · grads (on the
    device where the buffers live)."""
    ops = kernels.ops_for(total, grads)
    if first:
        ops.scale_into(share, grads, total)
    else:
        ops.axpy(share, grads, total)


class Overlap(UnitHooks):
    """DDP's bucket hook. Armed for a backward (`arm`), after_backward(i) of a unit's first
    layer i writes the unit's gradient times `share` into synced[unit.part] (added to what is
    there unless `first`) and launches its all-reduce asynchronously; `finish` waits for them.
    launches: (step, the unit's first layer, when its all-reduce was issued), one per launch.
    staged: synced's HostStaging when it lives on the device (a unit goes down before its
    launch and comes back up after its wait), else None."""

    def __init__(self, comm, clock, model, synced, options, staged=None):
        self.comm, self.clock, self.model, self.synced = comm, clock, model, synced
        self.staged = staged
        self.algorithm = options["algorithm"]
        self.units = units(model, options["bucket_bytes"], synced.dtype.itemsize)
        self.by_first = {unit.first: unit for unit in self.units}
        self.share, self.first, self.pending, self.launches = None, True, [], []

    def arm(self, share, first):
        self.share, self.first = share, first

    def after_backward(self, i):
        unit = self.by_first.get(i)
        if self.share is not None and unit is not None:
            _accumulate(self.synced[unit.part], self.model.grads[unit.part], self.share,
                        self.first)
            self._launch(unit)

    def _launch(self, unit):
        buffer = (self.synced[unit.part] if self.staged is None
                  else self.staged.down(unit.part))
        work = self.comm.all_reduce(buffer, "sum", self.algorithm, async_op=True)
        self.pending.append((unit, work))
        self.launches.append((self.clock.t, unit.first, work.issued))

    def finish(self):
        """Launch what no backward launched (a rank with an empty shard sends its zeros, so
        every rank makes the same calls), then wait for every bucket: the exposed part."""
        self.share = None
        launched = {unit.first for unit, _ in self.pending}
        for unit in self.units:
            if unit.first not in launched:
                self._launch(unit)
        for unit, work in self.pending:
            self.clock.wait(work)
            if self.staged is not None:
                self.staged.up(unit.part)
        self.pending = []
