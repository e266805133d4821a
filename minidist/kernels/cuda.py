"""The "cuda" device: host wrappers with the numpy reference's signatures, over Numba-CUDA kernels.

Each wrapper takes numpy arrays or device arrays. If any input already lives on the device, the
result stays there (a model built with device="cuda" keeps params, grads and activations on the
GPU for the whole training loop); with host inputs only, the inputs are copied over, the kernel
runs and the result comes back (so `kernels.use("cuda")` works for any caller, one round trip
per op). Reductions whose numpy version returns a Python number (the loss, `total`) copy that
one number back. `transfers` counts every host↔device copy made here.

The kernels themselves: cuda_matmul.py (tiled matmul), cuda_reduce.py (tree reductions,
softmax cross-entropy), cuda_elementwise.py (bias + activation, backward, optimizer updates).
Runs on a real GPU, or in Numba's CUDA simulator if NUMBA_ENABLE_CUDASIM=1 was set before numba
was imported; the simulator runs a Python thread per CUDA thread, so it gets small launches.
"""

import math
import threading

import numpy as np
from numba import config, cuda

from minidist.kernels import cuda_elementwise as ew
from minidist.kernels import cuda_matmul, cuda_reduce

transfers = {"to_device": 0, "to_host": 0, "bytes": 0}


def mode():
    """"simulator", "gpu", or None when neither can run the kernels."""
    if config.ENABLE_CUDASIM:
        return "simulator"
    return "gpu" if cuda.is_available() else None


def _serialise_simulated_launches():
    """The simulator keeps the kernel it is running in a module global, so two host threads
    (ranks of the thread backend) launching at once mix them up. Launches from host threads
    take turns here; the simulated CUDA threads' own device-function calls pass straight on."""
    from numba.cuda.simulator import kernel as simulated

    launch, turns = simulated.FakeCUDAKernel.__call__, threading.Lock()
    if getattr(launch, "takes_turns", False):
        return

    def call(self, *args):
        if isinstance(threading.current_thread(), simulated.BlockThread):
            return launch(self, *args)
        with turns:
            return launch(self, *args)

    call.takes_turns = True
    simulated.FakeCUDAKernel.__call__ = call


if config.ENABLE_CUDASIM:
    _serialise_simulated_launches()


def device_for_rank(rank, count):
    """The GPU rank k uses: k mod count."""
    if count < 1:
        raise RuntimeError("no CUDA device to place the rank on")
    return rank % count


def select_rank_device(rank):
    """Make GPU (rank mod count) this thread's device; returns its number."""
    number = device_for_rank(rank, len(cuda.gpus))
    cuda.select_device(number)
    return number


def _simulated():
    return bool(config.ENABLE_CUDASIM)


def threads_per_block():
    """T for the 1-D kernels: 256 on a GPU, 32 (one warp) in the simulator."""
    return 32 if _simulated() else 256


def blocks_for(n):
    """Enough blocks for a grid-stride loop over n elements (capped: each thread loops)."""
    return max(1, min(math.ceil(n / threads_per_block()), 2 if _simulated() else 4096))


def _on_device(*arrays):
    return any(getattr(x, "__cuda_ndarray__", False) for x in arrays)


def to_device(x, dtype=None):
    """A device array holding x (x itself if it is one already)."""
    if _on_device(x):
        return x
    x = np.ascontiguousarray(x, dtype=dtype)
    transfers["to_device"] += 1
    transfers["bytes"] += x.nbytes
    return cuda.to_device(x)


def to_host(x):
    """A numpy copy of a device array."""
    transfers["to_host"] += 1
    transfers["bytes"] += x.nbytes
    return x.copy_to_host()


def zeros(shape, dtype):
    """A device array of zeros (allocated and filled on the device)."""
    out = cuda.device_array(shape, dtype)
    flat = out.reshape(out.size)
    if out.size:
        ew.fill[blocks_for(out.size), threads_per_block()](flat, 0.0)
    return out


def reset_transfers():
    """Zero the copy counters (before the step you want to count)."""
    transfers.update(to_device=0, to_host=0, bytes=0)


def _result(out, keep_on_device):
    return out if keep_on_device else to_host(out)


def _flat(x):
    return x.reshape(x.size)


def _float_pair(A, B, what):
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"{what} needs 2-D arrays, got shapes {A.shape} and {B.shape}")
    if A.dtype != B.dtype or np.dtype(A.dtype) not in cuda_matmul.GPU_TILING:
        raise ValueError(f"{what} needs two float32 or two float64 arrays, "
                         f"got {A.dtype} and {B.dtype}")


def _matmul(A, B, trans_a, trans_b, what):
    _float_pair(A, B, what)
    M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
    K2, N = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if K != K2:
        raise ValueError(f"{what}: inner dimensions differ: A is {A.shape}, B is {B.shape}")
    keep = _on_device(A, B)
    C = cuda.device_array((M, N), A.dtype)
    tiling = (cuda_matmul.SIMULATOR_TILING if _simulated()
              else cuda_matmul.GPU_TILING[np.dtype(A.dtype)])
    cuda_matmul.launch(to_device(A), to_device(B), C, trans_a, trans_b, tiling)
    return _result(C, keep)


def matmul(A, B):
    """C = A B. One block per 128 × 128 tile of C (float32; 64 × 64 for float64, 16 × 16 in the
    simulator); each of its 256 (16) threads computes an 8 × 8 (4 × 4) sub-tile in registers
    from shared-memory slices of A and B."""
    return _matmul(A, B, False, False, "matmul")


def matmul_tn(A, B):
    """C = Aᵀ B (the weight gradient Xᵀ dY), same kernel reading A transposed while tiling."""
    return _matmul(A, B, True, False, "matmul_tn")


def matmul_nt(A, B):
    """C = A Bᵀ (the input gradient dY Wᵀ), same kernel reading B transposed while tiling."""
    return _matmul(A, B, False, True, "matmul_nt")


def _bias_activation(Z, b, activation):
    if b is not None and (b.ndim != 1 or Z.ndim != 2 or b.shape[0] != Z.shape[1]):
        raise ValueError(f"add_bias: Z is {Z.shape} and b is {b.shape}; b must be (Z.shape[1],)")
    keep = _on_device(Z) if b is None else _on_device(Z, b)
    Z = to_device(Z)
    out = cuda.device_array(Z.shape, Z.dtype)
    if Z.size:
        kernel = ew.bias_activation_kernel(ew.ACTIVATIONS[activation], b is not None)
        bias, d = (to_device(b, Z.dtype), b.shape[0]) if b is not None else (_flat(Z), 1)
        kernel[blocks_for(Z.size), threads_per_block()](_flat(Z), bias, d, _flat(out))
    return _result(out, keep)


def add_bias(Z, b, activation=None):
    """Y[n, j] = act(Z[n, j] + b[j]), act = identity, "relu" or "tanh": one thread per element
    (grid-stride), the bias add and the activation fused in one pass over memory."""
    if activation not in ew.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: None, 'relu', 'tanh'")
    return _bias_activation(Z, b, activation)


def relu(Z):
    """Y = max(Z, 0), one thread per element."""
    return _bias_activation(Z, None, "relu")


def tanh(Z):
    """Y = tanh(Z), one thread per element."""
    return _bias_activation(Z, None, "tanh")


def _activation_backward(dY, saved, activation):
    if dY.shape != saved.shape:
        raise ValueError(f"{activation}_backward: dY is {dY.shape}, the saved array {saved.shape}")
    keep = _on_device(dY, saved)
    dY, saved = to_device(dY), to_device(saved)
    dZ = cuda.device_array(dY.shape, dY.dtype)
    if dY.size:
        kernel = ew.activation_backward_kernel(ew.ACTIVATIONS[activation])
        kernel[blocks_for(dY.size), threads_per_block()](_flat(dY), _flat(saved), _flat(dZ))
    return _result(dZ, keep)


def relu_backward(dY, Z):
    """dZ = dY · 1[Z > 0], one thread per element."""
    return _activation_backward(dY, Z, "relu")


def tanh_backward(dY, Y):
    """dZ = dY · (1 − Y²), one thread per element, from the forward output Y."""
    return _activation_backward(dY, Y, "tanh")


def reduce_threads_per_block():
    """T for the tree reductions: 256 on a GPU, 8 in the simulator (its barriers are slow)."""
    return 8 if _simulated() else 256


def total(x, square=False):
    """s = Σ_i x_i (or Σ x_i²): each block tree-sums its grid-stride share in shared memory,
    then one block tree-sums the blocks' partial sums. Returns a number (one value copied)."""
    x = to_device(x)
    if x.size == 0:
        return 0.0
    blocks = 8 if _simulated() else 1024
    result = cuda_reduce.total(_flat(x), reduce_threads_per_block(), blocks, square)
    return to_host(result)[0]


def sum_rows(dY):
    """db[j] = Σ_n dY[n, j]: blocks of 32 columns × 8 rows of threads (8 × 4 in the simulator);
    each thread sums every 8th row of its column, then a tree sum over the 8 partial sums."""
    keep = _on_device(dY)
    dY = to_device(dY)
    n, d = dY.shape
    db = cuda.device_array(d, dY.dtype)
    cols, rows = (8, 4) if _simulated() else (32, 8)
    if d:
        kernel = cuda_reduce.sum_rows_kernel(np.dtype(dY.dtype), cols, rows)
        kernel[math.ceil(d / cols), (cols, rows)](dY, db)
    return _result(db, keep)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy (a number) and softmax probabilities: one block per row, a tree max
    then a tree sum of exp(z − max) in shared memory, so the log-sum-exp never overflows."""
    keep = _on_device(logits)
    z = to_device(logits)
    n, k = z.shape
    probs = cuda.device_array((n, k), z.dtype)
    if n == 0:
        return math.nan, _result(probs, keep)
    row_loss = cuda.device_array(n, z.dtype)
    kernel = cuda_reduce.softmax_cross_entropy_kernel(np.dtype(z.dtype), reduce_threads_per_block())
    kernel[n, reduce_threads_per_block()](z, to_device(labels, np.int64), probs, row_loss)
    return float(total(row_loss)) / n, _result(probs, keep)


def softmax_cross_entropy_backward(probs, labels):
    """dL/dz[n, j] = (p[n, j] − 1[j = y_n]) / N, one thread per element."""
    keep = _on_device(probs)
    probs = to_device(probs)
    n, k = probs.shape
    grad = cuda.device_array((n, k), probs.dtype)
    if probs.size:
        ew.softmax_cross_entropy_backward[blocks_for(probs.size), threads_per_block()](
            _flat(probs), to_device(labels, np.int64), k, 1.0 / n, _flat(grad))
    return _result(grad, keep)


def mse(pred, target):
    """Half mean squared error (a number) and the residual ŷ − y: an elementwise kernel, then
    the tree reduction of the squares."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: prediction is {pred.shape}, target {target.shape}")
    keep = _on_device(pred, target)
    pred, target = to_device(pred), to_device(target, pred.dtype)
    residual = cuda.device_array(pred.shape, pred.dtype)
    if pred.size:
        ew.subtract[blocks_for(pred.size), threads_per_block()](_flat(pred), _flat(target),
                                                            _flat(residual))
    loss = 0.5 * float(total(residual, square=True)) / pred.shape[0]
    return loss, _result(residual, keep)


def mse_backward(residual):
    """dL/dŷ = (ŷ − y) / N, one thread per element."""
    keep = _on_device(residual)
    residual = to_device(residual)
    out = cuda.device_array(residual.shape, residual.dtype)
    if residual.size:
        ew.scale[blocks_for(residual.size), threads_per_block()](1.0 / residual.shape[0],
                                                            _flat(residual), _flat(out))
    return _result(out, keep)


def _in_place(kernel, arrays, scalars, written):
    """Run an update kernel over flat buffers; host arrays go over and the `written` come back."""
    device = [to_device(a) for a in arrays]
    if device[0].size:
        flat = [_flat(a) for a in device]
        kernel[blocks_for(device[0].size), threads_per_block()](*flat, *scalars)
    for i in written:
        if device[i] is not arrays[i]:
            arrays[i][...] = to_host(device[i])


def axpy(alpha, x, y):
    """y ← y + α x in place, one thread per element."""
    if x.shape != y.shape:
        raise ValueError(f"axpy: x is {x.shape}, y is {y.shape}")
    _in_place(ew.axpy, [y, x], (float(alpha),), written=[0])


def scale_into(alpha, x, out):
    """out ← α x, one thread per element (out and x the same shape)."""
    if x.shape != out.shape:
        raise ValueError(f"scale_into: x is {x.shape}, out is {out.shape}")
    device_x, device_out = to_device(x), to_device(out)
    if device_out.size:
        ew.scale[blocks_for(out.size), threads_per_block()](float(alpha), _flat(device_x),
                                                            _flat(device_out))
    if device_out is not out:
        out[...] = to_host(device_out)


def _check_flat(params, **others):
    for name, a in others.items():
        if a.shape != params.shape or a.dtype != params.dtype:
            raise ValueError(f"{name} is {a.dtype} {a.shape}, params are "
                             f"{params.dtype} {params.shape}")


def sgd_update(params, grads, velocity, lr, momentum, weight_decay):
    """One SGD step in place over the flat buffer: thread i updates θᵢ (and vᵢ) alone.

    g = ∇ + λθ;   v ← μ v + g;   θ ← θ − η v      (with μ = 0: θ ← θ − η g)
    """
    _check_flat(params, grads=grads, velocity=velocity)
    _in_place(ew.sgd_update, [params, grads, velocity],
              (float(lr), float(momentum), float(weight_decay)), written=[0, 2])


def adam_update(params, grads, m, v, lr, beta1, beta2, eps, step):
    """One Adam step in place over the flat buffer, thread i updating θᵢ, mᵢ, vᵢ; step from 1."""
    _check_flat(params, grads=grads, m=m, v=v)
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    _in_place(ew.adam_update, [params, grads, m, v],
              (float(lr), float(beta1), float(beta2), float(eps), bias1, bias2), written=[0, 2, 3])
