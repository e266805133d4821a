"""Your own all-reduce, run by the library: `comm.all_reduce(x, algorithm=fn)`.

fn(comm, array) must leave Σ_k array_k (the sum over the ranks) in every rank's `array`, in
place, or return it. The Communicator runs fn inside the collective as it runs its own
algorithms: fn's sends and receives carry the call (so every rank must pass the same fn), they
count under "all_reduce" in comm.stats, async_op=True runs fn on the progress thread, and a
strategy given `algorithm=fn` (data_parallel, train's option) sums its gradients with it.
op="mean" divides fn's sum by p afterwards; "max" and "min" are not sums, so fn cannot run them.
"""

import numpy as np

from minidist.comm.collectives import _finish

OPS = ("sum", "mean")


def name(fn):
    """The name the call's text gives fn (every rank's must agree)."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def all_reduce(comm, fn, op):
    """(run(array, op), the algorithm's name) for comm.all_reduce with algorithm=fn."""
    if op not in OPS:
        raise ValueError(f"all_reduce with algorithm={name(fn)} (your function) computes a sum: "
                         f"op must be 'sum' or 'mean', got {op!r}")

    def run(array, op):
        result = fn(comm, array)
        if result is not None and result is not array:
            result = np.asarray(result)
            if result.shape != array.shape:
                raise ValueError(f"all_reduce: algorithm {name(fn)} returned an array of shape "
                                 f"{result.shape} on rank {comm.rank}; the array is "
                                 f"{array.shape}")
            array[...] = result
        _finish(array, op, comm.world_size)

    return run, name(fn)
