"""minidist's CUDA kernels against the vendor libraries and the memory-copy limit, on one GPU.

    python benchmarks/kernels.py [--quick]

On a real GPU (float32 throughout):
- matmul: the register-tiled kernel vs cuBLAS (CuPy's `matmul` if CuPy is installed, else
  PyTorch's `mm` with TF32 off) at n = 1024, 2048, 4096; GFLOP/s = 2n³ / t.
  Target: ≥ 25% of cuBLAS at 4096.
- memory-bound kernels over n = 2²⁶ elements (2²⁴ with --quick): the tree reduction (reads n),
  bias + ReLU (reads n, writes n), the SGD-momentum update (reads θ, ∇, v; writes θ, v) and the
  Adam update (reads θ, ∇, m, v; writes θ, m, v), each as bandwidth = bytes moved / t against a
  device-to-device copy of n elements (reads n, writes n) timed in the same run.
  Target: ≥ 70% of the copy's bandwidth.
- softmax cross-entropy forward (probabilities and per-row losses, 65536 rows × 1000 classes) vs
  PyTorch's softmax + cross_entropy on the same logits.

Each time is the median over 5 batches of the per-call time of `reps` back-to-back calls, the
device synchronised before and after each batch (the first call, which compiles, is not
timed). The kernels are launched directly on preallocated device arrays, so the numbers are the
kernels' and not the host wrappers' allocations. Prints a table of ratios and writes
benchmarks/results/kernels.json.

Without a GPU it runs every measurement once at a tiny size in Numba's CUDA simulator (the peers
on the CPU), checks the results against numpy, says so and reports no speed: a simulated thread
is a Python thread, its timings mean nothing.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidist import kernels  # noqa: E402  (numba is not imported yet)

MODE = kernels.setup_cuda()  # "gpu", or "simulator" with NUMBA_ENABLE_CUDASIM turned on

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from minidist.kernels import cuda as cuda_ops  # noqa: E402
from minidist.kernels import cuda_elementwise as ew  # noqa: E402
from minidist.kernels import cuda_matmul, cuda_reduce  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
F32 = np.float32
TARGETS = {"matmul": 0.25, "bandwidth": 0.70}


def time_per_call(call, sync, reps):
    """Median over 5 batches of (time of `reps` calls) / reps; a warm-up call first."""
    call()
    sync()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            call()
        sync()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


# ---- peers: cuBLAS through CuPy or PyTorch, PyTorch's softmax --------------------------------


def torch_peer():
    """(torch, device) where PyTorch can run: its CUDA build on a GPU, else the CPU."""
    try:
        import torch
    except ImportError:
        return None, None
    if MODE == "gpu" and not torch.cuda.is_available():
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS in plain fp32, like our kernel
    return torch, "cuda" if MODE == "gpu" else "cpu"


def cublas_matmul(n, reps):
    """(library name, seconds per n × n float32 product, the product as numpy) or None."""
    if MODE == "gpu":
        try:
            import cupy as cp

            A, B = cp.random.rand(n, n, dtype=F32), cp.random.rand(n, n, dtype=F32)
            sync = cp.cuda.Device().synchronize
            t = time_per_call(lambda: cp.matmul(A, B), sync, reps)
            return "cupy (cuBLAS)", t, cp.asnumpy(A), cp.asnumpy(B), cp.asnumpy(A @ B)
        except ImportError:
            pass
    torch, device = torch_peer()
    if torch is None:
        return None
    A = torch.rand(n, n, dtype=torch.float32, device=device)
    B = torch.rand(n, n, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time_per_call(lambda: torch.mm(A, B), sync, reps)
    name = "torch.mm (cuBLAS)" if device == "cuda" else "torch.mm (CPU)"
    return name, t, A.cpu().numpy(), B.cpu().numpy(), (A @ B).cpu().numpy()


# ---- measurements ------------------------------------------------------------------------------


def bench_matmul(n, reps):
    """Our tiled kernel on the peer's inputs (so the products can be compared), and the peer."""
    peer = cublas_matmul(n, reps)
    rng = np.random.default_rng(0)
    A_host, B_host = (peer[2], peer[3]) if peer else (rng.random((n, n), F32),) * 2
    A, B = cuda.to_device(A_host), cuda.to_device(B_host)
    C = cuda.device_array((n, n), F32)
    tiling = cuda_matmul.SIMULATOR_TILING if MODE == "simulator" else cuda_matmul.GPU_TILING[
        np.dtype(F32)]
    t = time_per_call(lambda: cuda_matmul.launch(A, B, C, False, False, tiling),
                      cuda.synchronize, reps)
    expected = peer[4] if peer else A_host.astype(np.float64) @ B_host
    np.testing.assert_allclose(C.copy_to_host(), expected, rtol=1e-3, atol=1e-3 * n)
    flops = 2.0 * n**3
    row = {"kernel": "matmul", "size": f"{n}×{n}·{n}×{n}", "ours_s": t,
           "ours_gflops": flops / t / 1e9, "peer": peer[0] if peer else None,
           "peer_s": peer[1] if peer else None, "target": TARGETS["matmul"]}
    row["peer_gflops"] = flops / peer[1] / 1e9 if peer else None
    row["ratio"] = peer[1] / t if peer else None  # our GFLOP/s over theirs
    return row


def _launch_1d(kernel, n):
    """kernel configured as the host wrappers launch it: a grid-stride grid over n elements."""
    return kernel[cuda_ops.blocks_for(n), cuda_ops.threads_per_block()]


def bench_memory_bound(n, reps):
    """Reduction, bias + ReLU, SGD and Adam updates vs a device-to-device copy, in GB/s."""
    rng = np.random.default_rng(1)
    x = cuda.to_device(rng.standard_normal(n).astype(F32))
    params, grads, m, out = (cuda.to_device(rng.standard_normal(n).astype(F32))
                             for _ in range(4))
    v = cuda.to_device(rng.random(n).astype(F32))  # Adam's second moment is ≥ 0
    cols = 1000
    bias = cuda.to_device(rng.standard_normal(cols).astype(F32))
    threads = cuda_ops.reduce_threads_per_block()
    blocks = 8 if MODE == "simulator" else 1024
    partial = cuda.device_array(blocks, F32)
    result = cuda.device_array(1, F32)
    reduce_kernel = cuda_reduce.partial_sums_kernel(np.dtype(F32), threads, False)

    def reduction():
        reduce_kernel[blocks, threads](x, partial)
        reduce_kernel[1, threads](partial, result)

    bias_relu = ew.bias_activation_kernel(ew.RELU, True)
    cases = {  # name: (call, bytes moved per call)
        "copy (device to device)": (lambda: out.copy_to_device(x), 2 * 4 * n),
        "total (tree reduction)": (reduction, 4 * n),
        "bias + relu (fused)": (lambda: _launch_1d(bias_relu, n)(x, bias, cols, out), 2 * 4 * n),
        "sgd_update (momentum)": (lambda: _launch_1d(ew.sgd_update, n)(
            params, grads, m, 1e-9, 0.9, 0.0), 5 * 4 * n),
        "adam_update": (lambda: _launch_1d(ew.adam_update, n)(
            params, grads, m, v, 1e-9, 0.9, 0.999, 1e-8, 0.1, 0.001), 7 * 4 * n),
    }
    seconds = {name: time_per_call(call, cuda.synchronize, reps)
               for name, (call, _) in cases.items()}
    reduction()
    assert np.isclose(result.copy_to_host()[0], x.copy_to_host().sum(dtype=np.float64),
                      rtol=1e-3, atol=1e-2 * np.sqrt(n))
    copy_bw = cases["copy (device to device)"][1] / seconds["copy (device to device)"]
    rows = []
    for name, (_, nbytes) in cases.items():
        bw = nbytes / seconds[name]
        rows.append({"kernel": name, "size": f"{n} float32", "ours_s": seconds[name],
                     "ours_gbps": bw / 1e9, "peer": "device-to-device copy",
                     "peer_gbps": copy_bw / 1e9, "ratio": bw / copy_bw,
                     "target": None if name.startswith("copy") else TARGETS["bandwidth"]})
    return rows


def bench_softmax(rows, classes, reps):
    """Our softmax cross-entropy forward vs PyTorch's softmax + cross_entropy."""
    rng = np.random.default_rng(2)
    z_host = (3 * rng.standard_normal((rows, classes))).astype(F32)
    y_host = rng.integers(0, classes, rows)
    z, y = cuda.to_device(z_host), cuda.to_device(y_host)
    probs, row_loss = cuda.device_array((rows, classes), F32), cuda.device_array(rows, F32)
    threads = cuda_ops.reduce_threads_per_block()
    kernel = cuda_reduce.softmax_cross_entropy_kernel(np.dtype(F32), threads)
    t = time_per_call(lambda: kernel[rows, threads](z, y, probs, row_loss), cuda.synchronize, reps)
    ref_loss, ref_probs = kernels.numpy_ops.softmax_cross_entropy(z_host.astype(np.float64), y_host)
    np.testing.assert_allclose(probs.copy_to_host(), ref_probs, rtol=1e-3, atol=1e-6)
    assert np.isclose(row_loss.copy_to_host().mean(), ref_loss, rtol=1e-4)
    row = {"kernel": "softmax_cross_entropy", "size": f"{rows}×{classes}", "ours_s": t,
           "peer": None, "peer_s": None, "ratio": None, "target": None,
           "ours_gbps": 2 * 4 * rows * classes / t / 1e9}
    torch, device = torch_peer()
    if torch is not None:
        zt = torch.as_tensor(z_host, device=device)
        yt = torch.as_tensor(y_host, device=device)
        F = torch.nn.functional
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        row["peer"] = f"torch softmax + cross_entropy ({device})"
        row["peer_s"] = time_per_call(
            lambda: (torch.softmax(zt, 1), F.cross_entropy(zt, yt, reduction="none")), sync, reps)
        row["ratio"] = row["peer_s"] / t  # > 1: ours is faster
    return row


# ---- report ------------------------------------------------------------------------------------


def table(rows):
    """One line per measurement: ours, the peer, ratio (ours as a fraction of the peer)."""
    lines = [f"{'kernel':<26} {'size':<22} {'ours':>14} {'peer':>14}  {'ratio':>6}  target  peer",
             "-" * 110]
    for r in rows:
        if "ours_gflops" in r:
            ours, peer = f"{r['ours_gflops']:.0f} GFLOP/s", r["peer_gflops"]
            peer = f"{peer:.0f} GFLOP/s" if peer else "-"
        elif r["kernel"] == "softmax_cross_entropy":
            ours = f"{r['ours_s'] * 1e3:.3f} ms"
            peer = f"{r['peer_s'] * 1e3:.3f} ms" if r["peer_s"] else "-"
        else:
            ours, peer = f"{r['ours_gbps']:.0f} GB/s", f"{r['peer_gbps']:.0f} GB/s"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        target = f"≥{r['target']:.2f}" if r["target"] else ""
        lines.append(f"{r['kernel']:<26} {r['size']:<22} {ours:>14} {peer:>14}  {ratio:>6}  "
                     f"{target:<6}  {r['peer'] or ''}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    args = parser.parse_args()
    if MODE == "simulator":
        print("No CUDA GPU here: running every measurement once, at a tiny size, in Numba's "
              "CUDA simulator\n(peers on the CPU) to check the kernels and this script. A "
              "simulated thread is a Python thread, so no speed is reported and no JSON written.")
        rows = [bench_matmul(16, reps=1), *bench_memory_bound(256, reps=1),
                bench_softmax(4, 10, reps=1)]
        table(rows)  # the table is built (and so checked) but simulated timings are not shown
        print("simulator check: matmul, total, bias + relu, sgd_update, adam_update, "
              "softmax_cross_entropy all match numpy.")
        return
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    print(f"GPU: {name}")
    n = 2**24 if args.quick else 2**26
    rows = [bench_matmul(size, reps=3 if size >= 4096 else 10)
            for size in ([1024, 2048] if args.quick else [1024, 2048, 4096])]
    rows += bench_memory_bound(n, reps=20)
    rows.append(bench_softmax(16384 if args.quick else 65536, 1000, reps=10))
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    report = {"gpu": name, "python": platform.python_version(), "quick": args.quick,
              "numba_cuda": _version("numba-cuda"), "torch": _version("torch"),
              "cupy": _version("cupy"), "rows": rows}
    (RESULTS / "kernels.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {RESULTS / 'kernels.json'}")


def _version(package):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
