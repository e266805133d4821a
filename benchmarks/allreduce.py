"""All-reduce on two ranks of one machine, 4 KiB … 256 MiB, every peer in ONE run.

    python benchmarks/allreduce.py [--ranks 2] [--max-mib 256] [--quick]

Peers: minidist's process backend (the ring written over send/recv; the native shared-memory
path on plain arrays, which copies them in; and the native path on arrays allocated with
comm.alloc, which already live in shared memory), mpi4py + MPICH `Allreduce` (under mpiexec),
PyTorch gloo `all_reduce` (torch CPU build, when installed), and the memory-traffic limit: a
p-rank all-reduce must read p·n and write p·n bytes, i.e. p copies of n bytes, timed at the
memcpy bandwidth measured in the same run (each copying process its own 256 MiB buffer; the
best of 15 repetitions). Two limits: at one core's memcpy bandwidth ("limit: 1-core memcpy",
what a single memcpy call reaches), and at the bandwidth of p processes copying at once
("limit: p-core memcpy", the machine's: the stricter one). The buffers hold zeros, so
hundreds of in-place sums stay finite (the cost of an add does not depend on the values).

Each point: the median over repetitions of one call's time (every call starts after a barrier;
a call's time is the slowest rank's). algBW = n/t; busBW = algBW·2(p−1)/p (NCCL's convention).
Writes benchmarks/results/allreduce.json and allreduce.png and prints a table of ratios.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE = np.float32


def sizes_in_bytes(max_mib):
    """4 KiB, 16 KiB, …: powers of four up to max_mib MiB."""
    size, out = 4096, []
    while size <= max_mib * 2**20:
        out.append(size)
        size *= 4
    return out


def repetitions(nbytes, quick):
    """Enough calls for a stable median, without spending minutes on the big sizes."""
    budget = 2**28 if quick else 2**30
    return int(np.clip(budget // nbytes, 5, 50 if quick else 200))


def time_calls(call, barrier, reps):
    """Per-call durations on this rank, each call after a barrier."""
    times = []
    for _ in range(reps + 1):
        barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first call warms up caches and page tables


# ---- minidist ---------------------------------------------------------------------------------
def minidist_rank(comm, sizes, quick):
    out = {}
    for variant, algorithm, shared in [("minidist ring", "ring", False),
                                       ("minidist native copy-in", "native", False),
                                       ("minidist native shared", "native", True)]:
        for nbytes in sizes:
            n = nbytes // np.dtype(DTYPE).itemsize
            x = comm.alloc(n, DTYPE) if shared else np.zeros(n, DTYPE)
            x[:] = 0  # a sum of zeros stays finite over hundreds of in-place calls
            times = time_calls(lambda x=x, a=algorithm: comm.all_reduce(x, algorithm=a),
                               comm.barrier, repetitions(nbytes, quick))
            out[(variant, nbytes)] = times
    return out


def run_minidist(ranks, sizes, quick):
    from minidist import run

    per_rank = run(minidist_rank, ranks, args=(sizes, quick), backend="process", timeout=1800)
    return {key: np.max([r[key] for r in per_rank], axis=0) for key in per_rank[0]}


# ---- MPICH through mpi4py (this file, run under mpiexec) --------------------------------------
def mpi_worker(sizes, quick, out_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    results = {}
    for nbytes in sizes:
        x = np.zeros(nbytes // np.dtype(DTYPE).itemsize, DTYPE)
        times = time_calls(lambda x=x: comm.Allreduce(MPI.IN_PLACE, x), comm.Barrier,
                           repetitions(nbytes, quick))
        slowest = np.max(comm.allgather(times), axis=0)
        results[nbytes] = slowest.tolist()
    if comm.rank == 0:
        Path(out_path).write_text(json.dumps({"library": MPI.Get_library_version().split("\n")[0],
                                              "times": results}))


def run_mpich(ranks, sizes, quick):
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if not mpiexec:
        return None, "mpiexec not found (pip install 'minidist[mpi]')"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mpi.json"
        cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--mpi-worker", str(out),
               "--max-mib", str(max(sizes) // 2**20 or 1)] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            return None, f"mpiexec failed: {done.stderr.strip()[-300:]}"
        data = json.loads(out.read_text())
    times = {("MPICH Allreduce", int(k)): np.array(v) for k, v in data["times"].items()}
    return times, data["library"]


# ---- PyTorch gloo -----------------------------------------------------------------------------
def gloo_worker(rank, ranks, sizes, quick, store_path, out_path):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=ranks)
    results = {}
    for nbytes in sizes:
        x = torch.zeros(nbytes // np.dtype(DTYPE).itemsize, dtype=torch.float32)
        times = time_calls(lambda x=x: dist.all_reduce(x), dist.barrier,
                           repetitions(nbytes, quick))
        gathered = [None] * ranks
        dist.all_gather_object(gathered, times)
        results[nbytes] = np.max(gathered, axis=0).tolist()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_gloo(ranks, sizes, quick):
    try:
        import torch
        import torch.multiprocessing as tmp_mp
    except ImportError:
        return None, "torch not installed (pip install 'minidist[bench]')"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        tmp_mp.spawn(gloo_worker, args=(ranks, sizes, quick, str(Path(tmp) / "store"), str(out)),
                     nprocs=ranks, join=True)
        data = json.loads(out.read_text())
    return {("PyTorch gloo", int(k)): np.array(v) for k, v in data.items()}, torch.__version__


# ---- the memory-traffic limit -----------------------------------------------------------------
def copy_rank(comm, nbytes, reps):
    """Each rank copies its own buffer, all at once; per repetition, this rank's seconds."""
    src, dst = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)  # both touched: no faults
    return time_calls(lambda: np.copyto(dst, src), comm.barrier, reps)


def memcpy_bandwidth(ranks, nbytes=256 * 2**20, reps=15):
    """Bytes per second that `ranks` processes copy together, one buffer each, much larger than
    the caches: the machine's copy bandwidth for that many cores. Best repetition (a limit)."""
    from minidist import run

    slowest = np.max(run(copy_rank, ranks, args=(nbytes, reps), backend="process",
                         timeout=600), axis=0)
    return ranks * nbytes / float(np.min(slowest))


# ---- report -----------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--mpi-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = sizes_in_bytes(args.max_mib)
    if args.mpi_worker:
        return mpi_worker(sizes, args.quick, args.mpi_worker)

    p = args.ranks
    copy_bw = {1: memcpy_bandwidth(1), p: memcpy_bandwidth(p)}
    times, notes = run_minidist(p, sizes, args.quick), {}
    for name, runner in [("MPICH Allreduce", run_mpich), ("PyTorch gloo", run_gloo)]:
        got, note = runner(p, sizes, args.quick)
        notes[name] = note
        if got:
            times.update(got)
    for nbytes in sizes:
        for cores, bandwidth in copy_bw.items():
            times[(f"limit: {cores}-core memcpy", nbytes)] = np.array([p * nbytes / bandwidth])
    peers = sorted({peer for peer, _ in times}, key=list(dict.fromkeys(
        peer for peer, _ in times)).index)
    median = {key: float(np.median(v)) for key, v in times.items()}
    report = {
        "command": "python benchmarks/allreduce.py " + " ".join(argv or sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "ranks": p, "dtype": np.dtype(DTYPE).name,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "memcpy_GBps": {f"{cores} cores": bw / 1e9 for cores, bw in copy_bw.items()},
        "peers": notes,
        "results": [{"peer": peer, "bytes": nbytes, "median_s": median[(peer, nbytes)],
                     "algbw_GBps": nbytes / median[(peer, nbytes)] / 1e9,
                     "busbw_GBps": nbytes / median[(peer, nbytes)] / 1e9 * 2 * (p - 1) / p,
                     "repetitions": len(times[(peer, nbytes)])}
                    for peer in peers for nbytes in sizes if (peer, nbytes) in median],
    }
    print_table(report, peers, sizes, median)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allreduce.json").write_text(json.dumps(report, indent=1))
    plot(report, peers, sizes, median)
    print(f"\nwrote {RESULTS / 'allreduce.json'} and {RESULTS / 'allreduce.png'}")


def print_table(report, peers, sizes, median):
    native = "minidist native shared"
    copies = ", ".join(f"{k} {v:.1f} GB/s" for k, v in report["memcpy_GBps"].items())
    print(f"all-reduce, {report['ranks']} ranks, {report['dtype']}; memcpy {copies}; "
          "median time per call (µs) and algBW (GB/s)\n")
    print(f"{'size':>9} " + " ".join(f"{peer[:24]:>24}" for peer in peers))
    for nbytes in sizes:
        cells = [f"{median[(p, nbytes)] * 1e6:10.1f} {nbytes / median[(p, nbytes)] / 1e9:6.2f}GB/s"
                 if (p, nbytes) in median else f"{'—':>24}" for p in peers]
        print(f"{_size(nbytes):>9} " + " ".join(f"{c:>24}" for c in cells))
    print(f"\nratios for {native} (time of the peer / time of minidist: > 1 means minidist "
          "is faster; for the limit, the fraction of it reached)")
    others = [p for p in peers if p != native]
    print(f"{'size':>9} " + " ".join(f"{p[:24]:>24}" for p in others))
    for nbytes in sizes:
        cells = [f"{median[(p, nbytes)] / median[(native, nbytes)]:.2f}×"
                 if (p, nbytes) in median else "—" for p in others]
        print(f"{_size(nbytes):>9} " + " ".join(f"{c:>24}" for c in cells))
    for peer, note in report["peers"].items():
        print(f"{peer}: {note}")


def plot(report, peers, sizes, median):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(11, 4))
    for peer in peers:
        xs = [n for n in sizes if (peer, n) in median]
        style = ("k--" if "1-core" in peer else "k:") if peer.startswith("limit") else "o-"
        ax_t.loglog(xs, [median[(peer, n)] * 1e6 for n in xs], style, label=peer, ms=3)
        ax_bw.semilogx(xs, [n / median[(peer, n)] / 1e9 for n in xs], style, label=peer, ms=3)
    ax_t.set(xlabel="message size (bytes)", ylabel="median time per call (µs)",
             title=f"all-reduce on {report['ranks']} ranks")
    ax_bw.set(xlabel="message size (bytes)", ylabel="algBW (GB/s)", title="bandwidth")
    ax_bw.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "allreduce.png", dpi=110)


def _size(nbytes):
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 1024} KiB"


if __name__ == "__main__":
    main()
