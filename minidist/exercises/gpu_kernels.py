"""Lesson 2 (GPU kernels): an elementwise SGD kernel, the tiled matmul's memory traffic."""

import numpy as np

from minidist.exercises._common import Check, _call


def check_sgd_kernel(kernel, seed=0):
    """kernel[blocks, threads](params, grads, lr) should do θᵢ ← θᵢ − η gᵢ for every i exactly
    once, whatever the grid: a grid-stride loop i = cuda.grid(1), + cuda.gridsize(1), …

    Needs a GPU or the CUDA simulator (minidist.kernels.setup_cuda() before numba is imported).
    """
    from numba import cuda

    name = "check_sgd_kernel"
    rng = np.random.default_rng(seed)
    # (n, blocks, threads): exact fit, spare threads, a single element, fewer threads than n
    for n, blocks, threads in ((64, 2, 32), (50, 2, 32), (1, 1, 8), (100, 2, 16)):
        params, grads, lr = rng.normal(size=n), rng.normal(size=n), 0.1
        device_params = cuda.to_device(params)
        launch = f"kernel[{blocks}, {threads}] on {n} elements"
        try:
            kernel[blocks, threads](device_params, cuda.to_device(grads), lr)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            hint = (" A thread read or wrote past the end: skip i ≥ params.shape[0] (the grid "
                    "has more threads than elements)." if isinstance(exc, IndexError) else "")
            return Check(name, False, f"{launch} raised {type(exc).__name__}: {exc}.{hint}")
        got = device_params.copy_to_host()
        wrong = np.flatnonzero(~np.isclose(got, params - lr * grads, rtol=1e-12, atol=1e-12))
        if not len(wrong):
            continue
        steps = (params[wrong] - got[wrong]) / (lr * grads[wrong])  # how many η·g were taken
        first = wrong[0]
        if np.allclose(got, params):
            return Check(name, False, f"{launch}: params did not change. Write into params "
                                      "in place (params[i] -= ...), do not rebind it.")
        if np.allclose(steps, 0.0):
            return Check(name, False, f"{launch}: elements {first}… were not updated: "
                         f"{blocks} × {threads} = {blocks * threads} threads must cover {n} "
                         "elements, so each thread loops: i, i + cuda.gridsize(1), …")
        if np.allclose(steps, -1.0):
            return Check(name, False, f"{launch}: θ moved uphill; the update subtracts η·g.")
        if np.allclose(steps, 1.0 / lr):
            return Check(name, False, f"{launch}: the learning rate is missing: θ − η·g.")
        if np.all(steps > 1.5):
            return Check(name, False, f"{launch}: elements {first}… were updated "
                         f"{steps[0]:.0f} times: the stride is the whole grid, "
                         "cuda.gridsize(1), not the block size.")
        return Check(name, False, f"{launch}: element {first} should be "
                                  f"{params[first] - lr * grads[first]:.6f}, got {got[first]:.6f}")
    return Check(name, True, "every element is updated once, for every grid: a correct "
                             "elementwise kernel")


def check_matmul_traffic(fn):
    """fn(M, N, K, BM, BN) should return (reads of A, reads of B): how many elements a tiled
    matmul C = AB loads from global memory with BM × BN blocks: M·K·⌈N/BN⌉ and K·N·⌈M/BM⌉."""
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
            ((M * K * -(-M // BM), K * N * -(-N // BN)), "A is re-read by every block column "
             "(⌈N/BN⌉ of them), B by every block row (⌈M/BM⌉)"),
        ]
        hint = next((h for wrong, h in hints if got == wrong), "count, for one element of A, "
                    "how many blocks load it")
        return Check(name, False, f"{case}: expected (A, B) reads {want}, got {got}: {hint}.")
    return Check(name, True, "A is read ⌈N/BN⌉ times and B ⌈M/BM⌉ times: bigger tiles, less "
                             "traffic per multiply-add")
