"""The SGD update in one pass over memory, compiled for the CPU with Numba.

numpy's  θ −= η·g  first writes η·g into a temporary, then walks θ and the temporary again;
with momentum and weight decay it walks memory five times. A compiled loop reads gᵢ, vᵢ, θᵢ
once and writes them once, as PyTorch's fused in-place ops do: for 10⁶ float32 numbers it
takes about half numpy's time. That matters where the update is the bottleneck: a parameter
server's shard applies every worker's gradient, one after another.

The arithmetic is numpy_ops.sgd_update's, in the same order and the same precision (the
scalars are cast to the buffer's dtype, as numpy casts a Python float), and the loop is
compiled without fastmath, so nothing is fused or reordered: the results are the same bit for
bit (tests/test_cpu_fused.py).

Two limits on where it is used:
- importing numba fixes, once per process, whether Numba's CUDA simulator is on (see
  minidist.kernels). So only processes that never run CUDA use this module: the parameter
  server's shards (minidist.ps.server).
- below FUSED_MIN numbers the numpy update takes well under 0.1 ms and importing numba
  (about 0.5 s) would cost more than it saves, so small buffers keep numpy; so do dtypes
  other than float32 and float64.
"""

import functools

import numpy as np

from minidist.kernels import numpy_ops

FUSED_MIN = 1 << 18
FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

adam_update = numpy_ops.adam_update


def sgd_update(params, grads, velocity, lr, momentum, weight_decay):
    """numpy_ops.sgd_update, bit for bit:  g = ∇ + λθ;  v ← μv + g;  θ ← θ − η v."""
    if params.shape[0] < FUSED_MIN or params.dtype not in FUSED_DTYPES:
        numpy_ops.sgd_update(params, grads, velocity, lr, momentum, weight_decay)
        return
    scalar = params.dtype.type
    _compiled()(params, grads, velocity, scalar(lr), scalar(momentum), scalar(weight_decay))


def _sgd_loop(params, grads, velocity, lr, momentum, weight_decay):
    for i in range(params.shape[0]):
        g = grads[i]
        if weight_decay != 0:
            g = g + weight_decay * params[i]
        if momentum != 0:
            g = momentum * velocity[i] + g
            velocity[i] = g
        params[i] -= lr * g


@functools.cache
def _compiled():
    import numba

    return numba.njit(cache=True)(_sgd_loop)
