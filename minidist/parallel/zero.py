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

The layout (zero_layout.Layout): the flat buffer is cut into units (buckets.units), each padded
to N·c_u, c_u = ⌈u/N⌉; rank r owns chunk r of each, its shard is those chunks, Σ c_u elements.

Bytes each rank sends per step (b = itemsize): (N−1)·Σ c_u·b reduce-scattering, as many
all-gathering θ in stages 1 and 2, twice that in stage 3 (1.5× a ring all-reduce); rank 0's θ
is broadcast once before training (stats["broadcast"]), as data_parallel does.

Memory, measured from the arrays held (History.memory; b = itemsize, S optimizer arrays):

    persistent  stage 1  θ Ψb,  ∇ Ψb,  optimizer S·Σc·b
                stage 2  θ Ψb,  ∇ shard Σc·b,  optimizer S·Σc·b
                stage 3  θ shard Σc·b,  ∇ shard Σc·b,  optimizer S·Σc·b
    transient   stage 3's gathered units, stages 2 and 3's gradient units, the padded units
                in flight (overlap) with their reduced chunks, stage 1's ∇ shard (from the
                first chunk to the step) and, in the step of stages 1 and 2, my chunks of θ
                and each unit's gathered rows

Layers let go of their activations after their backward (as autograd frees saved tensors).
The ledger is shown (`Zero.moment`; zero_memory.zero_moments) wherever what is held may be at
its most: after each unit's forward and the loss, and as each buffer above is made. A buffer
let go is one nothing points at: not `live`, not a layer (zero_layout.freed), not the model
(stage 2 drops model.grads, stage 3 also model.params).

overlap=True launches each unit's reduce-scatter (async_op=True) as the backward finishes it,
waited for before the step; stage 3 also prefetches the next unit's all-gather.

The timeline (History.events): a forward and a backward bar per unit, micro = its index k,
from when the unit may compute (stage 3: its θ gathered) until the next unit begins, the rank
blocks (a reduce-scatter without overlap) or the pass ends; what is of no unit (the loss's
gradient, what follows a blocking reduce-scatter) is a bar with micro −1. Time blocked on
communication is in no bar, nor in the Clock's compute seconds.
"""

import time

import numpy as np

from minidist import memory
from minidist.data import check_integer
from minidist.nn import Sequential, UnitHooks
from minidist.nn.layers import drop_activations
from minidist.parallel.buckets import units
from minidist.parallel.job import Clock, report
from minidist.parallel.zero_layout import Layout, bind, freed, release

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


def check_model(model_fn, workers, batch_size, options, data_shape=None):
    """ZeRO re-binds a Sequential's layers unit by unit: the model must be one, on numpy
    (data_shape, the training inputs' shape every job check is given, does not matter here)."""
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


class Zero(UnitHooks):
    """One rank's ZeRO-1 or -2 state and the hooks on its model (`attached`): forward_backward
    then step, every step; full_params at the end. `params` holds θ (the model's flat buffer;
    fsdp.FSDP: the shard), `grads` the ∇ shard (stage 1: from the reduce-scatter to the step)."""

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
            release(self.model, self.units, 1)
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
        """Step my shard (a working copy of my chunks of θ; stage 1 then lets its ∇ shard go),
        then all-gather θ unit by unit, each unit's rows copied into θ and let go."""
        self._wait_reduced()
        shard = self.live["θ shard"] = self.layout.shard_of(self.model.params)
        self.moment()
        self.optimizer.params = shard
        self.clock.timed("compute", self.optimizer.step, self.grads, event="optimizer")
        self.optimizer.params = None
        if self.stage == 1:
            del self.live["∇ shard"]
            self.grads = None
        for k, unit in enumerate(self.units):
            self.live[("θ", k)] = self.clock.timed(
                "comm", self.comm.all_gather, shard[self.layout.chunk(k)], event="all_gather")
            self.moment()
            self.model.params[unit.part] = self.live.pop(("θ", k)).reshape(-1)[:unit.size]
        del self.live["θ shard"], shard

    def full_params(self):
        """θ, whole."""
        return self.model.params.copy()

    def moment(self):
        """Show the ledger this moment: the activations kept now, the temporaries held."""
        transient = memory.array_bytes(list(self.live.values())) + self._in_flight()
        self.clock.ledger.saw(memory.activation_bytes(self.parts), transient)

    def _in_flight(self):
        """Bytes the results of async ops in flight take, besides `live`: a reduce-scatter's,
        my chunk of c_k elements (taken from its launch, as a preallocated output would be)."""
        return sum(self.layout.c[k] for k in self.pending) * self.layout.dtype.itemsize

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
            bind(self.model, self.units[k], 1, self.live[("∇", k)])
            self.moment()  # the unit's fullest: its activations only go from here on

    def after_backward(self, i):
        drop_activations([self.model.layers[i]])
        k = self.by_first.get(i)
        if k is None or (self.stage == 1 and not self.overlap):
            return
        if self.stage == 1:
            self._reduce(k, self._weighted_copy(k))
            return
        self.live[("sent", k)] = self.live.pop(("∇", k))
        self.live[("sent", k)] *= self.weight  # the padding stays 0
        self._reduce(k, ("sent", k))
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
        """Stage 1: unit k's gradient times the weight, padded to N·c, held as ("sent", k)."""
        unit, key = self.units[k], ("sent", k)
        self.live[key] = self.layout.zeros(k)
        np.multiply(self.model.grads[unit.part], self.weight, out=self.live[key][:unit.size])
        self.moment()
        return key

    def _reduce(self, k, key):
        """Reduce-scatter unit k's padded, weighted gradient live[key] (rows split by rank): my
        chunk of the sum goes to the ∇ shard, and the padded copy goes, now or (overlap) when
        the step waits for it."""
        rows = self.live[key].reshape(self.layout.n, -1)
        if self.overlap:
            self.pending[k] = self.comm.reduce_scatter(rows, async_op=True)
            return
        chunk = self._communicate("reduce_scatter", self.comm.reduce_scatter, rows)
        del rows, self.live[key]
        self._store(k, chunk)

    def _wait_reduced(self):
        for k in list(self.pending):  # in the order launched
            chunk = self.clock.wait(self.pending.pop(k))
            del self.live[("sent", k)]
            self._store(k, chunk)
            del chunk  # not held into the next wait

    def _store(self, k, chunk):
        """My chunk of unit k's summed ∇ into the ∇ shard (stage 1: made by the first chunk,
        beside the copies still in flight with overlap, and let go after the step)."""
        if self.grads is None:
            self.grads = self.live["∇ shard"] = self.layout.zeros()
            self.moment()
        self.grads[self.layout.chunk(k)] = chunk.reshape(-1)

    def _free(self, k, side):
        """Let unit k's gathered θ (side 0) or gradient buffer (side 1) go."""
        bind(self.model, self.units[k], side, freed(self.units[k].size, self.model.dtype))
        self.live.pop((("θ", "∇")[side], k), None)
