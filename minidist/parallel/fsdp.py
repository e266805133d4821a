"""ZeRO stage 3 (FSDP, as PyTorch's FullyShardedDataParallel): the parameters are sharded too.

A rank keeps only its shard of θ (its chunk of every padded unit, zero_layout.Layout). A unit's θ
exists whole only while the unit computes:

    before its forward    all-gather the unit's chunks into a fresh buffer, bind its layers
    after its forward     let the buffer go (the layers point at a freed placeholder)
    before its backward   all-gather it again, and a zero gradient buffer for the unit
    after its backward    reduce-scatter the gradient into my ∇ shard; let both buffers go

so per step a rank sends 2·(N−1)·Σc·b all-gathering and (N−1)·Σc·b reduce-scattering. With
overlap=True the next unit's all-gather is launched (async_op=True) before the current unit
computes, the unit after it in the forward and the unit before it in the backward (the
backward's first unit beneath the loss), and every reduce-scatter is launched as its unit's
backward ends and waited for before the step. The step updates the shard in place.
On the timeline (zero's docstring) a unit's bar begins once its gather has returned: without
prefetch after a gap, the gather beneath it; with prefetch the next unit's gather runs beneath.
"""

import time

import numpy as np

from minidist.parallel.zero import Zero
from minidist.parallel.zero_layout import bind, release


class FSDP(Zero):
    """Zero with the parameters sharded: `params` is my shard of θ; full_params gathers it."""

    def __init__(self, comm, clock, model, make_optimizer, options):
        self.prefetched = {}  # unit -> the async all-gather of its θ
        super().__init__(comm, clock, model, make_optimizer, {**options, "stage": 3})

    def _keep(self, shard):
        """What holds θ: the shard the optimizer steps; the model's buffer is let go."""
        release(self.model, self.units, 0)
        return shard

    def step(self):
        self._wait_reduced()
        self.moment()
        self.clock.timed("compute", self.optimizer.step, self.grads, event="optimizer")

    def full_params(self):
        """θ, whole, gathered unit by unit."""
        full = np.empty(self.psi, self.model.dtype)
        for k, unit in enumerate(self.units):
            rows = self.comm.all_gather(self.params[self.layout.chunk(k)])
            full[unit.part] = rows.reshape(-1)[:unit.size]
        return full

    def _in_flight(self):
        """Zero's, and a prefetch in flight: the N·c elements its result takes."""
        n, c = self.layout.n, self.layout.c
        return super()._in_flight() + sum(
            n * c[k] for k in self.prefetched) * self.layout.dtype.itemsize

    # ---- the hooks (and Zero's before_forward, before_backward: they call _ready) -------------
    def after_forward(self, i):
        k = self.by_last.get(i)
        if k is not None:
            self.moment()
            self._free(k, 0)
            if self.overlap and k == 0:
                self._prefetch(0)

    def after_backward(self, i):
        super().after_backward(i)
        if self.by_first.get(i) is not None:
            self._free(self.by_first[i], 0)

    # ---- pieces ---------------------------------------------------------------------------
    def _ready(self, k):
        """Unit k's θ gathered; with overlap, the next unit's all-gather launched to run beneath
        k's compute: k − 1 in the forward, k + 1 in the backward (0 at the forward's end)."""
        self._gather(k)
        after = k - 1 if self._pass == "forward" else k + 1
        if self.overlap and 0 <= after < len(self.units):
            self._prefetch(after)

    def _wait(self, work):
        """An async op's result (clock.wait): the open bar ends, and the next begins when the
        op finished, or now if it had (the time clock.exposed counts as blocked: in no bar)."""
        self._end()
        called = time.perf_counter()
        result = self.clock.wait(work)
        self._edge = max(called, work.finished)
        return result

    def _prefetch(self, k):
        self.prefetched[k] = self.comm.all_gather(self.params[self.layout.chunk(k)],
                                                  async_op=True)

    def _gather(self, k):
        """Unit k's θ, all-gathered (or its prefetch waited for), bound to its layers."""
        work = self.prefetched.pop(k, None)
        if work is not None:
            rows = self._wait(work)
        else:
            rows = self._communicate("all_gather", self.comm.all_gather,
                                     self.params[self.layout.chunk(k)])
        self.live[("θ", k)] = rows
        bind(self.model, self.units[k], 0, rows.reshape(-1))
