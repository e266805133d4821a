"""The all_to_all part of benchmarks/long_context.py: minidist (process backend, "native" and
"pairwise", call by call), MPICH (mpi4py `Alltoallv` under mpiexec) and PyTorch gloo
(`dist.all_to_all_single`, which gloo runs on CPU), on p ranks of one machine.

Each rank holds n bytes of float32 filled with its rank and sends rows shard_bounds(n/4, j, p)
to rank j (its own chunk stays home): every peer checks what it received (chunk i all i).
Times as benchmarks/allreduce.py takes them (allreduce.time_calls: every call after a barrier,
the first round dropped; a call's time is the slowest rank's). minidist's bytes sent and
received per call are checked against cost.all_to_all_bytes (asserted).

    mpiexec -n 2 python benchmarks/long_context_all_to_all.py OUT SIZE ...   (the MPICH ranks)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import allreduce
import numpy as np
from allreduce import PeerCrashed, repetitions, run_peer, time_calls

from minidist.data import shard_bounds

DTYPE = np.float32
NATIVE, PAIRWISE, MPICH, GLOO = ("minidist native", "minidist pairwise", "MPICH Alltoallv",
                                 "PyTorch gloo")


def split(nbytes, p):
    """[elements rank j gets], the same from every rank: shard_bounds of n/4 float32s."""
    n = nbytes // np.dtype(DTYPE).itemsize
    return [hi - lo for lo, hi in (shard_bounds(n, j, p) for j in range(p))]


def check_received(pieces, counts, rank):
    """pieces[i] came from rank i: counts[rank] elements, all equal to i."""
    for i, piece in enumerate(pieces):
        if len(piece) != counts[rank] or np.any(np.asarray(piece) != i):
            raise AssertionError(f"rank {rank}: the chunk from rank {i} is wrong")


# ---- minidist ---------------------------------------------------------------------------------
def minidist_rank(comm, sizes, quick):
    """{(peer, n): this rank's times}, native and pairwise call by call; each algorithm's bytes
    sent and received in one call checked against cost.all_to_all_bytes."""
    from minidist.cost import all_to_all_bytes

    p, out = comm.world_size, {}
    for nbytes in sizes:
        counts = split(nbytes, p)
        x = np.full(sum(counts), comm.rank, DTYPE)
        chunks = np.split(x, np.cumsum(counts)[:-1])
        want = all_to_all_bytes([counts] * p, x.itemsize)[comm.rank]
        calls = {name: (lambda a=algorithm, c=chunks: comm.all_to_all(c, algorithm=a))
                 for name, algorithm in ((NATIVE, "native"), (PAIRWISE, "pairwise"))}
        for call in calls.values():
            comm.stats.reset()
            check_received(call(), counts, comm.rank)
            got = comm.stats["all_to_all"]
            assert (got.bytes_sent, got.bytes_received) == want, (nbytes, got, want)
        times = time_calls(list(calls.values()), comm.barrier, repetitions(nbytes, quick))
        out.update({(name, nbytes): t for name, t in zip(calls, times, strict=True)})
    return out


def run_minidist(p, sizes, quick):
    from minidist import run

    per_rank = run(minidist_rank, p, args=(sizes, quick), backend="process", timeout=1800)
    return {key: np.max([r[key] for r in per_rank], axis=0) for key in per_rank[0]}, "process"


# ---- MPICH through mpi4py (this file, under mpiexec) ------------------------------------------
def mpi_worker(out_path, sizes, quick):
    from mpi4py import MPI

    comm, results = MPI.COMM_WORLD, {}
    p, r = comm.size, comm.rank
    for nbytes in sizes:
        counts = split(nbytes, p)
        x, y = np.full(sum(counts), r, DTYPE), np.empty(p * counts[r], DTYPE)
        send = [x, (counts, np.cumsum([0, *counts[:-1]])), MPI.FLOAT]
        recv = [y, ([counts[r]] * p, [i * counts[r] for i in range(p)]), MPI.FLOAT]
        comm.Alltoallv(send, recv)
        check_received(np.split(y, p), counts, r)
        (times,) = time_calls([lambda s=send, g=recv: comm.Alltoallv(s, g)], comm.Barrier,
                              repetitions(nbytes, quick))
        results[nbytes] = np.max(comm.allgather(times), axis=0).tolist()
    if r == 0:
        Path(out_path).write_text(json.dumps(
            {"library": MPI.Get_library_version().split("\n")[0], "times": results}))


def run_mpich(p, sizes, quick):
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        return None, "mpiexec not found (pip install 'minidist[mpi]')"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mpi.json"
        cmd = [str(mpiexec), "-n", str(p), sys.executable, __file__, str(out),
               *map(str, sizes)] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise PeerCrashed(f"mpiexec exited {done.returncode}: {done.stderr.strip()[-300:]}")
        data = json.loads(out.read_text())
    return {(MPICH, int(k)): np.array(v) for k, v in data["times"].items()}, data["library"]


# ---- PyTorch gloo -----------------------------------------------------------------------------
def gloo_worker(rank, p, sizes, quick, store, out_path):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=p)
    results = {}
    for nbytes in sizes:
        counts = split(nbytes, p)
        x = torch.full((sum(counts),), float(rank), dtype=torch.float32)
        y = torch.empty(p * counts[rank], dtype=torch.float32)

        def call(x=x, y=y, counts=counts):
            dist.all_to_all_single(y, x, [counts[rank]] * p, counts)

        call()
        check_received(np.split(y.numpy(), p), counts, rank)
        (times,) = time_calls([call], dist.barrier, repetitions(nbytes, quick))
        gathered = [None] * p
        dist.all_gather_object(gathered, times)
        results[nbytes] = np.max(gathered, axis=0).tolist()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_gloo(p, sizes, quick):
    """allreduce.run_gloo with this file's all_to_all_single worker."""
    return allreduce.run_gloo(p, sizes, quick, gloo_worker, GLOO)


RUNNERS = {"minidist": run_minidist, MPICH: run_mpich, GLOO: run_gloo}


# ---- the interleaved runs, and their records --------------------------------------------------
def measure(p, sizes, quick, rounds, with_torch):
    """{(peer, n): times pooled over `rounds` interleaved runs (the order reversed every other
    round)}, {peer: note}; a crashed run is retried once, then noted."""
    order = [name for name in RUNNERS if with_torch or name != GLOO]
    times, notes = {}, {}
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            got, notes[name] = run_peer(RUNNERS[name], p, sizes, quick)
            for key, value in (got or {}).items():
                times[key] = np.concatenate([times.get(key, []), value])
    return times, notes


def rows(times, sizes, p):
    """One record per (peer, n): median µs, busBW = (p−1)/p·n/t, speed vs MPICH."""
    from minidist.cost import bus_bandwidth

    median = {key: float(np.median(v)) for key, v in times.items()}
    return [{"peer": peer, "bytes": n, "median_us": 1e6 * median[(peer, n)],
             "repetitions": len(times[(peer, n)]),
             "busbw_GBps": bus_bandwidth("all_to_all", n, median[(peer, n)], p) / 1e9,
             "speed_vs_mpich": median[(MPICH, n)] / median[(peer, n)]
             if (MPICH, n) in median else None}
            for peer in dict.fromkeys(k[0] for k in times) for n in sizes if (peer, n) in times]


if __name__ == "__main__":
    mpi_worker(sys.argv[1], [int(s) for s in sys.argv[2:] if s != "--quick"],
               "--quick" in sys.argv)
