"""Lesson 2's exercises, solved: what a learner is asked to write, in the plainest form.

    sgd_kernel     plain SGD as a CUDA kernel, θᵢ ← θᵢ − η gᵢ in a grid-stride loop
    matmul_reads   the global-memory reads of A and B by the tiled matmul (the formula)

Importing this module imports numba: turn the CUDA simulator on first where there is no GPU
(NUMBA_ENABLE_CUDASIM=1 in the environment, or minidist.kernels.setup_cuda()).
"""

from numba import cuda


@cuda.jit
def sgd_kernel(params, grads, lr):
    """Thread i = b·T + t starts at element i and strides by the whole grid, G·T, so that any
    grid covers any size once; the loop's bound is also the guard against spare threads."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, params.shape[0], stride):
        params[i] -= lr * grads[i]


def matmul_reads(M, N, K, BM, BN):
    """(reads of A, reads of B) = (M·K·⌈N/BN⌉, K·N·⌈M/BM⌉): each block of a block row loads
    that row's BM × K slice of A, each block of a block column the K × BN slice of B; the
    edge tiles count too (they load the elements that exist)."""
    block_rows, block_cols = -(-M // BM), -(-N // BN)
    return M * K * block_cols, K * N * block_rows
