"""The tiled matrix multiply in Numba-CUDA: shared-memory tiles plus register tiles.

C = op(A) op(B), with op(A) of shape (M, K) and op(B) of shape (K, N); op is the identity or the
transpose, which gives the three products a linear layer needs (AB, AᵀB, ABᵀ) from one kernel.

One block computes a BM × BN tile of C. Each step along K, its threads copy a BK-wide slice of
op(A) (BM × BK) and of op(B) (BK × BN) into shared memory, cooperatively and coalesced, then
every thread reads them to update its own TM × TN sub-tile of C held in registers: per shared
value it loads, a thread does TM (or TN) multiply-adds instead of one. A thread's outputs are
interleaved (rows trow, trow + BM/TM, …; columns tcol, tcol + BN/TN, …) so that neighbouring
threads touch neighbouring addresses, in shared memory and in C. Out-of-range elements of the
edge tiles are loaded as 0 and not stored, so every shape works, 1 × 1 included.
"""

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import cuda


@dataclass(frozen=True)
class Tiling:
    """BM × BN outputs per block, BK-deep K slices, TM × TN outputs per thread."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int

    @property
    def threads(self):
        return (self.BM // self.TM) * (self.BN // self.TN)


# On a GPU: 256 threads × 64 (float32) or 16 (float64) outputs each, the classic SGEMM shape.
GPU_TILING = {np.dtype(np.float32): Tiling(128, 128, 8, 8, 8),
              np.dtype(np.float64): Tiling(64, 64, 8, 4, 4)}
# In the simulator every CUDA thread is a Python thread: 16 threads per block, 4 × 4 each.
SIMULATOR_TILING = Tiling(16, 16, 8, 4, 4)


@functools.cache
def matmul_kernel(dtype, trans_a, trans_b, tiling):
    """Compile-time specialised kernel C = op(A) op(B) for one dtype, transposes and tiling."""
    BM, BN, BK, TM, TN = tiling.BM, tiling.BN, tiling.BK, tiling.TM, tiling.TN
    THREADS = tiling.threads
    ROW_THREADS, COL_THREADS = BM // TM, BN // TN
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(A, B, C, M, N, K):
        # As[k, i] = op(A)[row0 + i, k0 + k];  Bs[k, j] = op(B)[k0 + k, col0 + j]
        As = cuda.shared.array((BK, BM), nb_dtype)
        Bs = cuda.shared.array((BK, BN), nb_dtype)
        acc = cuda.local.array((TM, TN), nb_dtype)
        a_reg = cuda.local.array(TM, nb_dtype)
        b_reg = cuda.local.array(TN, nb_dtype)
        zero = nb_dtype(0)  # typed, so float32 loads stay float32
        tid = cuda.threadIdx.x
        trow, tcol = tid // COL_THREADS, tid % COL_THREADS
        row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for k0 in range(0, K, BK):
            for idx in range(tid, BM * BK, THREADS):  # the A tile; consecutive threads read
                if trans_a:                            # consecutive addresses of A
                    k, i = idx // BM, idx % BM
                    inside = row0 + i < M and k0 + k < K
                    As[k, i] = A[k0 + k, row0 + i] if inside else zero
                else:
                    i, k = idx // BK, idx % BK
                    inside = row0 + i < M and k0 + k < K
                    As[k, i] = A[row0 + i, k0 + k] if inside else zero
            for idx in range(tid, BK * BN, THREADS):  # the B tile
                if trans_b:
                    j, k = idx // BK, idx % BK
                    inside = col0 + j < N and k0 + k < K
                    Bs[k, j] = B[col0 + j, k0 + k] if inside else zero
                else:
                    k, j = idx // BN, idx % BN
                    inside = col0 + j < N and k0 + k < K
                    Bs[k, j] = B[k0 + k, col0 + j] if inside else zero
            cuda.syncthreads()
            for k in range(BK):  # TM + TN shared loads feed TM·TN multiply-adds
                for i in range(TM):
                    a_reg[i] = As[k, trow + i * ROW_THREADS]
                for j in range(TN):
                    b_reg[j] = Bs[k, tcol + j * COL_THREADS]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()
        for i in range(TM):
            row = row0 + trow + i * ROW_THREADS
            for j in range(TN):
                col = col0 + tcol + j * COL_THREADS
                if row < M and col < N:
                    C[row, col] = acc[i, j]

    return kernel


def launch(A, B, C, trans_a, trans_b, tiling):
    """C ← op(A) op(B) on device arrays, C already allocated with shape (M, N)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if M == 0 or N == 0:
        return
    grid = (math.ceil(N / tiling.BN), math.ceil(M / tiling.BM))
    kernel = matmul_kernel(np.dtype(C.dtype), trans_a, trans_b, tiling)
    kernel[grid, tiling.threads](A, B, C, M, N, K)
