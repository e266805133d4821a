"""The lesson-2 checker that launches the learner's kernel (needs the simulator or a GPU)."""

from numba import cuda

from minidist import exercises


@cuda.jit
def right(params, grads, lr):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, params.shape[0], stride):
        params[i] -= lr * grads[i]


@cuda.jit
def no_bounds_check(params, grads, lr):
    i = cuda.grid(1)
    params[i] -= lr * grads[i]


@cuda.jit
def no_stride(params, grads, lr):
    i = cuda.grid(1)
    if i < params.shape[0]:
        params[i] -= lr * grads[i]


@cuda.jit
def block_stride(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.blockDim.x):
        params[i] -= lr * grads[i]


@cuda.jit
def uphill(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] += lr * grads[i]


@cuda.jit
def no_rate(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] -= grads[i]


def test_sgd_kernel_checker():
    assert exercises.check_sgd_kernel(right)
    cases = {"past the end": no_bounds_check, "each thread loops": no_stride,
             "updated 2 times": block_stride, "uphill": uphill, "rate is missing": no_rate}
    for hint, kernel in cases.items():
        result = exercises.check_sgd_kernel(kernel)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)
