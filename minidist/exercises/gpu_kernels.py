"""Lesson 2 (GPU kernels): the elementwise SGD kernel, and the tiled matmul's memory traffic.

The kernel's checker first launches the learner's kernel on its own, on grids with spare
threads and with too few threads, so that a failure names the launch and the element; then it
puts the kernel INSIDE minidist — as the SGD update kernel every optimizer step launches
(kernels.cuda.sgd_update) — and trains a small MLP on the cuda device, to compare with numpy's
SGD (float64, 1e-10). It needs a CUDA GPU or Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, or
minidist.kernels.setup_cuda(), before numba is first imported); without either it says so. The
launches and the training run in a daemon thread, so that a kernel that never ends is reported
after `timeout` seconds instead of hanging the checker.
"""

import contextlib
import functools
import sys
import threading

import numpy as np

from minidist.exercises._common import (
    Check,
    Exercise,
    _brief,
    _call,
    _check_timeout,
    _differs,
    _guarded,
)

SIZES = [4, 8, 3]  # the MLP of the training run: 67 parameters, more than the simulator's grid
RUN = {"steps": 2, "batch_size": 6, "lr": 0.2}
# (n, blocks, threads): exact fit, spare threads, a single element, fewer threads than n
LAUNCHES = ((64, 2, 32), (50, 2, 32), (1, 1, 8), (100, 2, 16))


# ----- exercise 1: the SGD update kernel ----------------------------------------------------

class _AsLibraryKernel:
    """The learner's kernel[grid, block](params, grads, lr) in the place of the library's
    sgd_update kernel, which is launched as kernel[grid, block](params, grads, velocity, lr,
    momentum, weight_decay): plain SGD (μ = λ = 0) needs only the first, second and fourth."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, launch):
        configured = self.kernel[launch]

        def run(params, grads, velocity, lr, momentum, weight_decay):
            if momentum or weight_decay:
                raise ValueError("the exercise's kernel is plain SGD: train it without momentum "
                                 "and weight_decay")
            configured(params, grads, lr)
        return run


@contextlib.contextmanager
def sgd_kernel(kernel):
    """Inside: every SGD step on the cuda device launches `kernel` (params, grads, lr) where
    minidist launches its own sgd_update kernel, on the library's grid; restored after."""
    from minidist.kernels import cuda_elementwise

    saved = cuda_elementwise.sgd_update
    cuda_elementwise.sgd_update = _AsLibraryKernel(kernel)
    try:
        yield
    finally:
        cuda_elementwise.sgd_update = saved


def _cuda_problem():
    """Why no kernel can be launched here (no GPU, simulator off), or None."""
    from minidist import kernels

    if "numba" not in sys.modules:
        return "your kernel is no Numba kernel: define it with @cuda.jit (from numba import cuda)"
    try:
        kernels.resolve("cuda")
    except RuntimeError as exc:
        return f"no CUDA device to launch your kernel on. {exc}"
    return None


def _not_a_kernel(kernel, timeout):
    """Why `kernel` cannot be launched as kernel[blocks, threads](...) (a plain function, the
    stub that raises NotImplementedError), or None."""
    if hasattr(kernel, "__getitem__"):
        return None

    def stub():
        try:
            kernel(np.zeros(1), np.zeros(1), 0.1)
        except NotImplementedError as exc:
            return f"your kernel raised NotImplementedError: {exc}"
        except Exception:  # noqa: BLE001 - a plain function: said below, whatever it does
            return None
        return None

    raised, _ = _within(stub, timeout)
    return raised or (f"{_brief(kernel)} is not a CUDA kernel: put @cuda.jit (from numba "
                      "import cuda) above its def, so that it can be launched as "
                      "kernel[blocks, threads](...)")


def _within(work, timeout):
    """(work(), False) run in a daemon thread, or (None, True) if it is still running after
    `timeout` s: a kernel stuck in a loop cannot be stopped, only left behind."""
    out = {}

    def target():
        try:
            out["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - the checker's own error, raised below
            out["error"] = exc

    thread = threading.Thread(target=target, name="check_sgd_kernel", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, True
    if "error" in out:
        raise out["error"]
    return out.get("value"), False


def _hung(what, timeout):
    return (f"{what} did not finish within the {timeout} s timeout: some thread never leaves "
            "its loop. In a while loop, i must grow by cuda.gridsize(1) on every pass. (The "
            "stuck launch keeps running in the background: restart the Python kernel before "
            "trying again.)")


def _launch_problem(kernel, rng, now):
    """The first wrong launch of LAUNCHES (which elements, what was expected), or None;
    now["launch"] says which launch is running (for a kernel that never ends)."""
    from numba import cuda

    for n, blocks, threads in LAUNCHES:
        params, grads, lr = rng.normal(size=n), rng.normal(size=n), 0.1
        device_params = cuda.to_device(params)
        launch = now["launch"] = f"kernel[{blocks}, {threads}] on {n} elements"
        try:
            kernel[blocks, threads](device_params, cuda.to_device(grads), lr)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            hint = (" A thread read or wrote past the end: skip i ≥ params.shape[0] (the grid "
                    "has more threads than elements)." if isinstance(exc, IndexError) else "")
            return f"{launch} raised {type(exc).__name__}: {exc}.{hint}"
        got = device_params.copy_to_host()
        wrong = np.flatnonzero(~np.isclose(got, params - lr * grads, rtol=1e-12, atol=1e-12))
        if not len(wrong):
            continue
        steps = (params[wrong] - got[wrong]) / (lr * grads[wrong])  # how many η·g were taken
        first = wrong[0]
        if np.allclose(got, params):
            return (f"{launch}: params did not change. Write into params in place "
                    "(params[i] -= ...), do not rebind it.")
        if np.allclose(steps, 0.0):
            return (f"{launch}: elements {first}… were not updated: {blocks} × {threads} = "
                    f"{blocks * threads} threads must cover {n} elements, so each thread "
                    "loops: i, i + cuda.gridsize(1), …")
        if np.allclose(steps, -1.0):
            return f"{launch}: θ moved uphill; the update subtracts η·g."
        if np.allclose(steps, 1.0 / lr):
            return f"{launch}: the learning rate is missing: θ − η·g."
        if np.all(steps > 1.5):
            return (f"{launch}: elements {first}… were updated {steps[0]:.0f} times: the "
                    "stride is the whole grid, cuda.gridsize(1), not the block size.")
        return (f"{launch}: element {first} should be {params[first] - lr * grads[first]:.6f}, "
                f"got {got[first]:.6f}")
    return None


def check_sgd_kernel(kernel, seed=0, timeout=30.0):
    """kernel[blocks, threads](params, grads, lr) should do θᵢ ← θᵢ − η gᵢ for every i exactly
    once, whatever the grid: a grid-stride loop i = cuda.grid(1), + cuda.gridsize(1), …

    First launched on its own (LAUNCHES), then as minidist's SGD kernel: an MLP of 67
    parameters trained on the cuda device must follow numpy's SGD (1e-10). Needs a GPU or the
    CUDA simulator (minidist.kernels.setup_cuda() before numba is imported). The launches, and
    then the training, each end after `timeout` seconds (a kernel that never ends)."""
    from minidist import data, kernels, nn, train

    name = "check_sgd_kernel"
    if not data.is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    _check_timeout(timeout)
    problem = _not_a_kernel(kernel, timeout) or _cuda_problem()
    if not problem:
        now = {}
        problem, hung = _within(
            lambda: _launch_problem(kernel, np.random.default_rng(seed), now), timeout)
        problem = _hung(now.get("launch", "your kernel"), timeout) if hung else problem
    if problem:
        return Check(name, False, problem)
    from minidist.kernels import cuda as gpu  # (numba is imported: _cuda_problem saw it)

    X, y = data.make_classification(24, SIZES[0], SIZES[-1], seed=seed)
    numpy = train(functools.partial(nn.mlp, SIZES, seed=1), X, y, **RUN)
    n = numpy.params.size
    grid = f"kernel[{gpu.blocks_for(n)}, {gpu.threads_per_block()}]"
    with sgd_kernel(kernel):
        result, hung = _within(lambda: _guarded(lambda: train(
            functools.partial(nn.mlp, SIZES, seed=1, device="cuda"), X, y, **RUN), timeout),
            timeout)
    hist, failure = (None, _hung("the run", timeout)) if hung else result
    failure = failure or _differs(hist, numpy, label="numpy")
    if failure:
        return Check(name, False, f"as the SGD step of a training run on the cuda device "
                                  f"({kernels.cuda_mode()}; {n} parameters, launched as {grid}), "
                                  f"against the same run on numpy (η = {RUN['lr']}; the launches "
                                  f"on their own used η = 0.1): {failure}")
    return Check(name, True, f"every element updated once, for every grid; as minidist's SGD "
                             f"kernel ({grid} on {n} parameters) the cuda training equals "
                             "numpy's")


# ----- exercise 2 (formula): the tiled matmul's global memory traffic -----------------------

def check_matmul_traffic(fn):
    """fn(M, N, K, BM, BN) should return (reads of A, reads of B): how many elements a tiled
    matmul C = AB loads from global memory with BM × BN blocks (checked on five shapes)."""
    name = "check_matmul_traffic"
    cases = ((64, 64, 64, 16, 16), (17, 5, 33, 8, 8), (128, 256, 512, 128, 64), (1, 1, 1, 16, 16),
             (100, 30, 7, 32, 16))
    for M, N, K, BM, BN in cases:
        want = (M * K * -(-N // BN), K * N * -(-M // BM))
        got, failed = _call(name, fn, M, N, K, BM, BN,
                            convert=lambda result: tuple(int(v) for v in result))
        if failed is not None:
            return failed
        if got == want:
            continue
        case = f"M={M}, N={N}, K={K}, BM={BM}, BN={BN}"
        hints = [
            ((M * N * K, M * N * K), "that is the naive kernel: every output reads a row of A "
             "and a column of B. A tile of A is loaded once per block and reused by BN outputs"),
            ((M * K * (N // BN), K * N * (M // BM)), "the partial tiles at the edges load "
             "too: count ⌈N/BN⌉ block columns, not ⌊N/BN⌋"),
            ((M * K * -(-M // BM), K * N * -(-N // BN)), "A and B are swapped: a value of A is "
             "reused along a row of C's tile, so A is re-read once per block column"),
        ]
        hint = next((h for wrong, h in hints if got == wrong), "count, for one element of A, "
                    "how many blocks load it")
        return Check(name, False, f"{case}: expected (A, B) reads {want}, got {got}: {hint}.")
    return Check(name, True, "A is read ⌈N/BN⌉ times and B ⌈M/BM⌉ times: bigger tiles, less "
                             "traffic per multiply-add")


__all__ = ["check_sgd_kernel", "check_matmul_traffic"]

EXERCISES = (
    Exercise(2, "my_sgd_kernel", check_sgd_kernel, "sgd_kernel",
             "the elementwise SGD kernel (a grid-stride loop), launched on odd grids and then as "
             "minidist's SGD kernel in a training run on the cuda device (GPU or simulator)"),
    Exercise(2, "my_matmul_reads", check_matmul_traffic, "matmul_reads",
             "the global-memory reads of A and B by the tiled matmul, worked out by hand",
             kind="formula"),
)
