"""Lesson 11's exercises, solved: what a learner is asked to write, in the plainest form.

    zero1_step     one ZeRO-1 step: reduce-scatter ∇, step my shard of θ, all-gather θ
    BucketHooks    overlapped data parallelism: each unit's all-reduce launched the moment the
                   backward has written its last gradient
"""

from minidist.nn import UnitHooks


def zero1_step(comm, params, grads, optimizer):
    """Row r of the reduce-scattered (p, c) gradient is the global gradient of my shard
    θ[r·c:(r+1)·c]; the optimizer (momentum for that shard only) updates optimizer.params; the
    all-gather puts every rank's updated shard, in rank order, back into params."""
    p = comm.world_size
    mine = comm.reduce_scatter(grads.reshape(p, -1))[0]
    optimizer.step(mine)
    params[:] = comm.all_gather(optimizer.params).reshape(-1)


class BucketHooks(UnitHooks):
    """after_backward(i) runs right after layer i's gradients are written; a unit (last layer
    first) is complete once its `first` layer's are: copy its gradients into the buffer, launch
    their mean all-reduce without waiting, and keep the handle (the caller waits on them)."""

    def __init__(self, comm, model, units, buffer):
        self.comm, self.model, self.buffer = comm, model, buffer
        self.by_first = {unit.first: unit for unit in units}
        self.handles = []

    def after_backward(self, i):
        unit = self.by_first.get(i)
        if unit is not None:
            self.buffer[unit.part] = self.model.grads[unit.part]
            self.handles.append(self.comm.all_reduce(self.buffer[unit.part], op="mean",
                                                     async_op=True))
