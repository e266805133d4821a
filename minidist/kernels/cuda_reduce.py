"""Reductions in Numba-CUDA: the block-level tree, full sums, column sums, softmax cross-entropy.

The tree: T threads (T a power of two) each put one partial value in shared memory buf[0:T];
then for s = T/2, T/4, …, 1 thread t < s does buf[t] ← buf[t] ⊕ buf[t + s], with a barrier
after each round. After log₂ T rounds buf[0] holds the block's result (⊕ is + or max).
"""

import functools
import math

import numba
import numpy as np
from numba import cuda

SUM, MAX = 0, 1


@cuda.jit(device=True)
def block_reduce(buf, tid, op):
    """Tree-reduce buf[0:len(buf)] into buf[0]; every thread of the block must call it."""
    cuda.syncthreads()
    stride = buf.shape[0] // 2
    while stride > 0:
        if tid < stride:
            if op == MAX:
                buf[tid] = max(buf[tid], buf[tid + stride])
            else:
                buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2


@functools.cache
def partial_sums_kernel(dtype, threads, square):
    """out[b] = Σ x[i] (or Σ x[i]²) over the elements i that block b's threads visit.

    Thread t of block b adds x[b·T + t], x[b·T + t + G·T], … (G blocks: a grid-stride loop,
    so neighbouring threads read neighbouring addresses), then the block tree-sums the T values.
    """
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(x, out):
        buf = cuda.shared.array(threads, nb_dtype)
        tid = cuda.threadIdx.x
        acc = nb_dtype(0)
        for i in range(cuda.blockIdx.x * threads + tid, x.shape[0], cuda.gridDim.x * threads):
            acc += x[i] * x[i] if square else x[i]
        buf[tid] = acc
        block_reduce(buf, tid, SUM)
        if tid == 0:
            out[cuda.blockIdx.x] = buf[0]

    return kernel


def total(x, threads, max_blocks, square=False):
    """Σ x (or Σ x²) of a 1-D device array: blocks write partial sums, one block adds them."""
    blocks = max(1, min(max_blocks, math.ceil(x.shape[0] / threads)))
    partial = cuda.device_array(blocks, x.dtype)
    partial_sums_kernel(np.dtype(x.dtype), threads, square)[blocks, threads](x, partial)
    if blocks == 1:
        return partial
    result = cuda.device_array(1, x.dtype)
    partial_sums_kernel(np.dtype(x.dtype), threads, False)[1, threads](partial, result)
    return result


@functools.cache
def sum_rows_kernel(dtype, cols, rows):
    """db[j] = Σ_n dY[n, j]. A block is cols × rows threads and owns `cols` columns.

    Thread (x, y) sums rows y, y + rows, y + 2·rows, … of column j = block·cols + x (a warp
    reads a contiguous stretch of a row); then the `rows` partial sums of each column are
    tree-reduced in shared memory.
    """
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(dY, db):
        buf = cuda.shared.array((rows, cols), nb_dtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * cols + tx
        acc = nb_dtype(0)
        if j < dY.shape[1]:
            for n in range(ty, dY.shape[0], rows):
                acc += dY[n, j]
        buf[ty, tx] = acc
        cuda.syncthreads()
        stride = rows // 2
        while stride > 0:
            if ty < stride:
                buf[ty, tx] += buf[ty + stride, tx]
            cuda.syncthreads()
            stride //= 2
        if ty == 0 and j < dY.shape[1]:
            db[j] = buf[0, tx]

    return kernel


@functools.cache
def softmax_cross_entropy_kernel(dtype, threads):
    """One block per row n: probs[n] = softmax(z_n), row_loss[n] = logsumexp(z_n) − z_n[y_n].

    Stable: the block first finds m = max_j z_nj (tree max), then Σ_j exp(z_nj − m) (tree sum),
    so exp never sees a positive argument; thread t handles columns t, t + T, t + 2T, …
    """
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(z, labels, probs, row_loss):
        buf = cuda.shared.array(threads, nb_dtype)
        n, tid = cuda.blockIdx.x, cuda.threadIdx.x
        k = z.shape[1]
        m = nb_dtype(-math.inf)  # typed: float32 logits keep float32 exp and log
        for j in range(tid, k, threads):
            m = max(m, z[n, j])
        buf[tid] = m
        block_reduce(buf, tid, MAX)
        m = buf[0]
        cuda.syncthreads()  # everyone has read buf[0] before it is reused
        s = nb_dtype(0)
        for j in range(tid, k, threads):
            s += math.exp(z[n, j] - m)
        buf[tid] = s
        block_reduce(buf, tid, SUM)
        log_norm = m + math.log(buf[0])
        for j in range(tid, k, threads):
            probs[n, j] = math.exp(z[n, j] - log_norm)
        if tid == 0:
            row_loss[n] = log_norm - z[n, labels[n]]

    return kernel
