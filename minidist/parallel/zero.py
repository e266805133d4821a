"""ZeRO (Rajbhandari et al. 2020): data parallelism that shards the training state over N ranks.

Every rank computes the gradient of its shard of the global batch, weighted |B_k|/|B| as in
data_parallel, but keeps only 1/N of what data parallelism replicates:

    stage 1  the optimizer state      after the backward, reduce-scatter ∇; step my 1/N of θ;
                                      all-gather θ
    stage 2  + the gradients          each unit's ∇ lands in a temporary buffer during the
                                      backward, is reduce-scattered, and the buffer goes
    stage 3  + the parameters (FSDP)  each unit's θ is all-gathered before its forward and
                                      again before its backward, and freed after each
                                      (minidist.parallel.fsdp)

The layout (`Layout`). The flat buffer is cut into units (buckets.units: layer-aligned, last
layer first, at most bucket_bytes each). A unit of u elements is padded with zeros to N·c,
c = ⌈u/N⌉, and rank r owns its chunk r, elements [r·c, (r+1)·c). The rank's shard is its
chunks of all units end to end, Σ c_u elements; the optimizer steps that array alone, which
is exact because SGD and Adam act elementwise (the padding: θ = 0 and ∇ = 0, it stays 0).

Bytes each rank sends per step (b = itemsize): (N−1)·Σ c_u·b reduce-scattering, as many
all-gathering θ in stages 1 and 2, twice that in stage 3 (1.5× a ring all-reduce). Rank 0's
θ is broadcast once before training (stats["broadcast"]), as data_parallel does.

Memory, measured from the arrays held (History.memory; b = itemsize, S optimizer arrays):

    persistent  stage 1  θ Ψb,  ∇ Ψb,  optimizer S·Σc·b
                stage 2  θ Ψb,  ∇ shard Σc·b,  optimizer S·Σc·b
                stage 3  θ shard Σc·b,  ∇ shard Σc·b,  optimizer S·Σc·b
    transient   the gathered units (stage 3), the temporary gradient units (stages 2, 3),
                the padded units in flight (overlap), and for the step of stages 1 and 2 the
                working copy of my chunks of θ (stage 1: and the reduced ∇ shard)

A layer lets go of its activations after its backward (as autograd frees saved tensors), and
the ledger looks at every moment a unit is complete (`Zero.moment`). A buffer let go is one a
layer no longer points at (`freed`), nor the model (stage 2 drops model.grads, stage 3 also
model.params).

overlap=True launches each unit's reduce-scatter (async_op=True) as the backward finishes it,
waited for before the step; stage 3 also prefetches the next unit's all-gather.

The timeline (History.events) has a forward and a backward bar per unit, micro = its index k
(viz.gantt prints it), from when the unit may compute (stage 3: its θ gathered) until the next
unit begins, the rank blocks (a reduce-scatter without overlap) or the pass ends. What is of no
unit, the loss's gradient or what follows a blocking reduce-scatter (freeing, a parameterless
layer), is a bar with micro −1. Time blocked on communication is in no bar, nor in the Clock's
compute seconds.
"""

import time

import numpy as np

from minidist import memory
from minidist.data import check_integer
from minidist.nn import Sequential, UnitHooks
from minidist.nn.layers import drop_activations
from minidist.parallel.buckets import units
from minidist.parallel.job import Clock, report

OPTIONS = {"stage": 1, "bucket_bytes": 1 << 20, "overlap": False}
STAGES = (1, 2, 3)


def check_options(options):
    """stage one of 1, 2, 3; bucket_bytes an integer >= 1."""
    stage = options.get("stage", 1)
    if stage not in STAGES:
        raise ValueError(f"zero: stage must be 1 (shard the optimizer state), 2 (and the "
                         f"gradients) or 3 (and the parameters), got {stage!r}; for no "
                         "sharding use strategy='data_parallel'")
    check_integer("bucket_bytes", options.get("bucket_bytes", 1))


def check_model(model_fn, workers, batch_size, options):
    """ZeRO re-binds a Sequential's layers unit by unit: the model must be one, on numpy."""
    model = model_fn()
    if not isinstance(model, Sequential) or getattr(model, "device", None) != "numpy":
        raise ValueError(f"strategy='zero' needs a minidist.nn.Sequential model on the numpy "
                         f"device, got {type(model).__name__} on "
                         f"{getattr(model, 'device', 'unknown')!r}")


def worker(comm, job):
    from minidist.parallel.fsdp import FSDP  # stage 3, a Zero with θ sharded too

    options = {**OPTIONS, **job.options}
    model = job.model_fn()
    comm.broadcast(model.params, src=0)
    clock = Clock(job.steps, job.max_memory_per_rank, comm.rank)
    zero = (FSDP if options["stage"] == 3 else Zero)(comm, clock, model, job.make_optimizer,
                                                    options)
    weighted_losses = []
    with zero.attached(model):
        for t, (rows, weight) in enumerate(job.my_batches(comm.rank, comm.world_size)):
            clock.begin(t)
            weighted_losses.append(weight * zero.forward_backward(job.X[rows], job.y[rows],
                                                                  weight))
            zero.step()
            clock.end()
    result = report(comm, zero.params, weighted_losses, clock)  # the training's bytes, memory
    params = zero.full_params()  # gathered after report took the stats
    model.restore(params)  # whole again, for a caller whose model_fn hands out one model
    return {**result, "params": params}


class Layout:
    """Units padded to N·c_u (c_u = ⌈u/N⌉); rank r owns chunk r of each; its shard is those
    chunks end to end: unit k's chunk is shard[chunk(k)]."""

    def __init__(self, unit_list, world_size, rank, dtype):
        self.units, self.n, self.rank, self.dtype = unit_list, world_size, rank, dtype
        self.c = [-(-unit.size // world_size) for unit in unit_list]
        self.offsets = np.concatenate([[0], np.cumsum(self.c, dtype=np.int64)]).astype(int)
        self.size = int(self.offsets[-1])

    def chunk(self, k):
        return slice(self.offsets[k], self.offsets[k + 1])

    def zeros(self, k=None):
        """A zero shard (k None), or unit k padded: N·c_k zeros."""
        return np.zeros(self.size if k is None else self.n * self.c[k], self.dtype)

    def shard_of(self, flat):
        """My chunks of the full buffer `flat`, padded with zeros: a new shard array."""
        out = self.zeros()
        for k, unit in enumerate(self.units):
            lo = min(self.rank * self.c[k], unit.size)
            hi = min(lo + self.c[k], unit.size)
            out[self.offsets[k]:self.offsets[k] + hi - lo] = flat[unit.part][lo:hi]
        return out


def freed(size, dtype):
    """What a released view points at: `size` NaNs in one element's memory, read-only (a
    stray read shows as NaN, a stray write raises)."""
    return np.broadcast_to(np.array(np.nan, dtype), (size,))


class Zero(UnitHooks):
    """One rank's ZeRO-1 or -2 state and the hooks on its model (`attached`): forward_backward
    then step, every step; full_params at the end. `params` is what holds θ (the model's flat
    buffer; fsdp.FSDP: the shard), `grads` the ∇ shard (stage 1: only from the reduce-scatter
    to the step)."""

    def __init__(self, comm, clock, model, make_optimizer, options):
        self.comm, self.clock, self.model = comm, clock, model
        self.stage, self.overlap = options["stage"], options["overlap"]
        self.units = units(model, options["bucket_bytes"])
        self.layout = Layout(self.units, comm.world_size, comm.rank, model.dtype)
        self.by_first = {unit.first: k for k, unit in enumerate(self.units)}
        self.by_last = {unit.last: k for k, unit in enumerate(self.units)}
        self.parts = [*model.layers, model.criterion]
        self.psi, self.weight = model.num_params, None
        self.live = {}  # the temporaries held now, by name: the ledger's transient bytes
        self.pending = {}  # unit -> its async reduce-scatter
        self._pass, self._bar, self._edge = "forward", None, 0.0  # the timeline's pass, its
        # open bar (the unit, -1 for none) and where the next bar begins (perf_counter seconds)
        shard = self.layout.shard_of(model.params)
        self.optimizer = make_optimizer(shard)
        self.grads = self.layout.zeros() if self.stage >= 2 else None
        if self.stage >= 2:
            self._release_all(1)
        self.params = self._keep(shard)
        clock.ledger.hold(memory.array_bytes(self.params),
                          memory.array_bytes(model.grads if self.stage == 1 else self.grads),
                          memory.optimizer_bytes(self.optimizer))

    def _keep(self, shard):
        """What holds θ: the model's own buffer. The optimizer steps a working copy of my
        chunks of it, made for each step."""
        self.optimizer.params = None
        return self.model.params

    # ---- one step -------------------------------------------------------------------------
    def forward_backward(self, X, y, weight):
        """My shard's loss; its gradient, weighted by `weight` = |B_k|/|B|, reduce-scattered
        (or launched) unit by unit."""
        self.weight = weight
        loss = self._computed("forward", self.model.loss, X, y)
        self.moment()
        for part in self.parts:  # a recomputing block's fullest moment is inside its backward
            if getattr(part, "recompute", False):
                part.watch = self.moment
        self._computed("backward", self.model.backward)
        if self.stage == 1 and not self.overlap:
            for k in range(len(self.units)):
                self._reduce(k, self._weighted_copy(k))
        return loss

    def step(self):
        """Step my shard (a working copy of my chunks of θ), then all-gather θ unit by unit."""
        self._wait_reduced()
        shard = self.live["θ shard"] = self.layout.shard_of(self.model.params)
        self.moment()
        self.optimizer.params = shard
        self.clock.timed("compute", self.optimizer.step, self.grads, event="optimizer")
        self.optimizer.params = None
        for k, unit in enumerate(self.units):
            rows = self.clock.timed("comm", self.comm.all_gather, shard[self.layout.chunk(k)],
                                    event="all_gather")
            self.model.params[unit.part] = rows.reshape(-1)[:unit.size]
        del self.live["θ shard"]
        if self.stage == 1:
            del self.live["∇ shard"]
            self.grads = None

    def full_params(self):
        """θ, whole."""
        return self.model.params.copy()

    def moment(self):
        """Show the ledger this moment: the activations kept now, the temporaries held."""
        transient = memory.array_bytes(list(self.live.values())) + self._in_flight()
        self.clock.ledger.saw(memory.activation_bytes(self.parts), transient)

    def _in_flight(self):
        """Bytes the results of async ops in flight take, besides `live` (none here)."""
        return 0

    # ---- the hooks: units is last layer first, so forward runs k = K−1 … 0, backward 0 … K−1
    def before_forward(self, i):
        self._starts(self.by_first.get(i))

    def before_backward(self, i):
        if i == len(self.model.layers) - 1:
            drop_activations([self.model.criterion])
        k = self.by_last.get(i)
        self._starts(k)
        if k is not None and self.stage >= 2:  # the unit's ∇ goes to a temporary buffer
            self.live[("∇", k)] = self.layout.zeros(k)
            self._bind(k, 1, self.live[("∇", k)])

    def after_backward(self, i):
        drop_activations([self.model.layers[i]])
        k = self.by_first.get(i)
        if k is None or (self.stage == 1 and not self.overlap):
            return
        if self.stage == 1:
            self._reduce(k, self._weighted_copy(k))
            return
        padded = self.live.pop(("∇", k))
        padded *= self.weight  # the padding stays 0
        self._reduce(k, padded)
        if self._bar is None:  # it blocked and ended k's bar: what follows is of no unit
            self._bar = -1
        self._free(k, 1)

    # ---- pieces ---------------------------------------------------------------------------
    def _computed(self, name, fn, *args):
        """fn(*args), the pass `name`, drawn as bars (`_starts`); the seconds its hooks blocked
        on communication (clock.exposed grows by them) are not compute."""
        clock, t = self.clock, self.clock.t
        self._pass, blocked = name, clock.exposed[t]
        start = self._edge = time.perf_counter()
        self._bar = -1 if name == "backward" else None  # the loss's gradient: before any layer
        result = fn(*args)
        end = self._end()
        clock.compute[t] += (end - start) - (clock.exposed[t] - blocked)
        return result

    def _starts(self, k):
        """A layer is about to compute, the first of unit k: the open bar ends, k's parameters
        are made ready and k's bar begins. k None (a layer of no unit): it joins the open bar,
        or begins one of no unit."""
        if k is not None:
            self._end()
            self._ready(k)
            self._bar = k
        elif self._bar is None:
            self._bar = -1

    def _ready(self, k):
        """Make unit k's parameters ready to compute with (stages 1, 2: they are)."""

    def _end(self):
        """The open bar, if any, ends now: a compute event of this pass. Returns now."""
        now = time.perf_counter()
        if self._bar is not None:
            self.clock.trace.add(self._pass, self._edge, now, self._bar)
            self._bar, self._edge = None, now
        return now

    def _communicate(self, event, fn, *args):
        """fn(*args), a blocking collective, timed as `event`: the open bar ends before it,
        and the next begins after it."""
        self._end()
        result = self.clock.timed("comm", fn, *args, event=event)
        self._edge = time.perf_counter()
        return result

    def _weighted_copy(self, k):
        """Stage 1: unit k's gradient times the weight, padded to N·c."""
        unit, padded = self.units[k], self.layout.zeros(k)
        np.multiply(self.model.grads[unit.part], self.weight, out=padded[:unit.size])
        return padded

    def _reduce(self, k, padded):
        """Reduce-scatter unit k's padded, weighted gradient (rows split by rank): my chunk of
        the sum goes to the ∇ shard, now or (overlap) when the step waits for it."""
        rows, self.live[("sent", k)] = padded.reshape(self.layout.n, -1), padded
        self.moment()
        if self.overlap:  # `padded` stays in live until the step has waited
            self.pending[k] = self.comm.reduce_scatter(rows, async_op=True)
            return
        chunk = self._communicate("reduce_scatter", self.comm.reduce_scatter, rows)
        del self.live[("sent", k)]
        self._store(k, chunk)

    def _wait_reduced(self):
        for k, work in list(self.pending.items()):
            self._store(k, self.clock.wait(work))
            del self.pending[k], self.live[("sent", k)]

    def _store(self, k, chunk):
        if self.grads is None:  # stage 1: the ∇ shard lives from the first chunk to the step
            self.grads = self.live["∇ shard"] = self.layout.zeros()
        self.grads[self.layout.chunk(k)] = chunk.reshape(-1)

    def _bind(self, k, side, flat):
        """Point unit k's layers' params (side 0) or grads (side 1) into `flat`, the unit's
        buffer (padded: its first unit.size elements)."""
        start = self.units[k].part.start
        for i in range(self.units[k].first, self.units[k].last + 1):
            part = self.model.layer_slices[i]
            if part.stop > part.start:
                views = [None, None]
                views[side] = flat[part.start - start:part.stop - start]
                self.model.bind_layer(i, *views)

    def _free(self, k, side):
        """Let unit k's gathered θ (side 0) or gradient buffer (side 1) go."""
        self._bind(k, side, freed(self.units[k].size, self.model.dtype))
        self.live.pop((("θ", "∇")[side], k), None)

    def _release_all(self, side):
        """Re-point every layer's params (side 0) or grads (side 1) at `freed` and drop the
        model's own flat buffer, so nothing holds it any more."""
        for k in range(len(self.units)):
            self._free(k, side)
        self.model.release(("params", "grads")[side])
