"""All-reduce on two ranks of one machine, 4 KiB … 256 MiB, every peer in ONE run.

    python benchmarks/allreduce.py [--ranks 2] [--max-mib 256] [--quick]

Peers: minidist's process backend (the ring written over send/recv; the native shared-memory
path on plain arrays, which copies them in; and the native path on arrays allocated with
comm.alloc, which already live in shared memory), mpi4py + MPICH `Allreduce` (under mpiexec),
PyTorch gloo `all_reduce` (torch CPU build, when installed), and the memory-traffic limit.

The limit is the least memory traffic any p-rank all-reduce of n bytes in shared memory must do,
timed at each message size. Every output element needs all p inputs: if k ranks compute it, they
read k·p values, the other p − k read the result, and all p write their output, so the least is
k = 1: (2p − 1)·n bytes read and p·n written, i.e. per rank (2p − 1)/p·n read and n written
(p = 2: 1.5·n and n). The limit does exactly that traffic and nothing else: each rank sums its
1/p chunk of the p buffers into its own (reads n, writes n/p), then copies the other p − 1 chunks
from their owners (reads and writes (p − 1)/p·n). The copy needs the owners' sums, so the two
phases are timed apart, each after a barrier that is not timed; per repetition, t(limit) = the
slowest rank's first phase + the slowest rank's second phase: the traffic with a free
synchronisation (and no rank reading a chunk while its owner writes it). It runs on the same
buffers as "minidist native shared" (comm.alloc, the peers' published views), interleaved with it
call by call, with the same repetitions and the same median, so both see the same cache state
and the same bursts of load; so are the ring and the copy-in path (on plain arrays of the same
size): the five calls of a size take turns.

Every collective does at least this traffic, so fraction of the limit = t(limit) / t(peer) ≤ 1
but for noise. A fraction measured above 1 is printed clipped to 1.00 and flagged (the raw ratio
goes in the JSON), never as a fraction above the limit: for the minidist peers, timed call by
call beside the limit, the two are equal within noise there; for MPICH and gloo, timed in runs
of their own, the machine's state (load, where the ranks run) changed between the runs. For the
minidist peers a ratio above 1 + LIMIT_NOISE is not noise but a limit that is no limit (a bug in
this file): the results are still written, then the run fails loudly (exit status 1). The
buffers hold zeros, so hundreds of in-place sums stay finite (the cost of an add does not depend
on the values).

Each point: the median over repetitions of one call's time (every call starts after a barrier;
a call's time is the slowest rank's). algBW = n/t; busBW = algBW·2(p−1)/p (NCCL's convention).
An external peer whose processes crash (e.g. gloo's SIGABRT at start-up) is retried once, then
reported as crashed. Writes benchmarks/results/allreduce.json and allreduce.png and prints a
table of times, one of ratios and one of fractions of the limit.
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

from minidist.data import shard_bounds

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE = np.float32
LIMIT = "limit: least traffic"
NATIVE = "minidist native shared"
INTERLEAVED = ["minidist ring", "minidist native copy-in", NATIVE]  # call by call with the limit
# a ratio t(limit)/t(peer) up to 1.25 is noise (clipped, flagged); above it, for a peer timed call
# by call beside the limit, the run fails. On a shared 2-core machine the medians of 9 calls of
# two identical 256 MiB passes differ by up to ~12 %.
LIMIT_NOISE = 0.25


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
    return int(np.clip(budget // nbytes, 9, 50 if quick else 200))


def time_calls(calls, barrier, reps):
    """Per-call durations on this rank of each of `calls`, interleaved call by call (so a burst
    of load hits them alike), each call after a barrier; one list per call."""
    times = [[] for _ in calls]
    for _ in range(reps + 1):
        for call, out in zip(calls, times, strict=True):
            barrier()
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return [t[1:] for t in times]  # the first round warms up caches and page tables


def least_traffic(flat, peers, rank, p):
    """The least memory traffic of an all-reduce (see the module docstring) on rank `rank`, as
    two calls: the first sums chunk `rank` of every buffer into `flat`, the second copies the
    other chunks from their owners (run it once every rank's first call is done). peers: {rank
    s: rank s's buffer}. The slices are cut beforehand: the calls time the traffic alone."""
    lo, hi = shard_bounds(flat.size, rank, p)
    mine = flat[lo:hi]
    sums = [theirs[lo:hi] for theirs in peers.values()]
    copies = [(flat[a:b], theirs[a:b]) for s, theirs in peers.items()
              for a, b in [shard_bounds(flat.size, s, p)]]

    def reduce_mine():
        for theirs in sums:
            np.add(mine, theirs, out=mine)

    def gather_theirs():
        for dst, src in copies:
            np.copyto(dst, src)

    return reduce_mine, gather_theirs


def traffic_bytes(nbytes, p):
    """(read, written) bytes per rank of the least-traffic all-reduce of nbytes on p ranks."""
    return (2 * p - 1) * nbytes / p, nbytes


# ---- minidist ---------------------------------------------------------------------------------
def minidist_rank(comm, sizes, quick):
    """Per size, call by call: the ring and the native path on plain arrays, the native path on
    shared buffers, and the limit's two phases on those same shared buffers."""
    out, n_of = {}, lambda nbytes: nbytes // np.dtype(DTYPE).itemsize
    for nbytes in sizes:
        ring, copy_in = np.zeros(n_of(nbytes), DTYPE), np.zeros(n_of(nbytes), DTYPE)
        shared = comm.alloc(n_of(nbytes), DTYPE)  # zeroed: sums of zeros stay finite
        # the views the native path itself uses to read the other ranks' buffers (private API:
        # the limit must read exactly the memory the collective reads)
        comm._publish(shared)
        comm.barrier()
        peers = {s: comm._peer_view(s, shared) for s in range(comm.world_size) if s != comm.rank}
        comm.barrier()
        times = time_calls(
            [lambda x=ring: comm.all_reduce(x, algorithm="ring"),
             lambda x=copy_in: comm.all_reduce(x, algorithm="native"),
             lambda x=shared: comm.all_reduce(x, algorithm="native"),
             *least_traffic(shared, peers, comm.rank, comm.world_size)],
            comm.barrier, repetitions(nbytes, quick))
        for name, got in zip(INTERLEAVED + [LIMIT + " 1", LIMIT + " 2"], times, strict=True):
            out[(name, nbytes)] = got
    return out


def run_minidist(ranks, sizes, quick):
    from minidist import run

    per_rank = run(minidist_rank, ranks, args=(sizes, quick), backend="process", timeout=1800)
    slowest = {key: np.max([r[key] for r in per_rank], axis=0) for key in per_rank[0]}
    for nbytes in sizes:  # the limit: its two phases, each the slowest rank's, back to back
        slowest[(LIMIT, nbytes)] = (slowest.pop((LIMIT + " 1", nbytes))
                                    + slowest.pop((LIMIT + " 2", nbytes)))
    return slowest


# ---- MPICH through mpi4py (this file, run under mpiexec) --------------------------------------
def mpi_worker(sizes, quick, out_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    results = {}
    for nbytes in sizes:
        x = np.zeros(nbytes // np.dtype(DTYPE).itemsize, DTYPE)
        (times,) = time_calls([lambda x=x: comm.Allreduce(MPI.IN_PLACE, x)], comm.Barrier,
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
            raise PeerCrashed(f"mpiexec exited {done.returncode}: {done.stderr.strip()[-300:]}")
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
        (times,) = time_calls([lambda x=x: dist.all_reduce(x)], dist.barrier,
                              repetitions(nbytes, quick))
        gathered = [None] * ranks
        dist.all_gather_object(gathered, times)
        results[nbytes] = np.max(gathered, axis=0).tolist()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_gloo(ranks, sizes, quick, worker=gloo_worker, label="PyTorch gloo"):
    """`worker`(rank, ranks, sizes, quick, store, out) on `ranks` spawned processes, rank 0
    writing {nbytes: seconds}: ({(label, nbytes): seconds}, torch's version)."""
    try:
        import torch
        import torch.multiprocessing as tmp_mp
    except ImportError:
        return None, "torch not installed (pip install 'minidist[bench]')"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        try:
            tmp_mp.spawn(worker, nprocs=ranks, join=True,
                         args=(ranks, sizes, quick, str(Path(tmp) / "store"), str(out)))
        except (tmp_mp.ProcessExitedException, tmp_mp.ProcessRaisedException) as error:
            raise PeerCrashed(str(error).strip().splitlines()[0]) from error
        data = json.loads(out.read_text())
    return {(label, int(k)): np.array(v) for k, v in data.items()}, torch.__version__


class PeerCrashed(RuntimeError):
    """An external peer's processes died (a signal, or a non-zero exit)."""


def run_peer(runner, *args, tries=2):
    """runner(*args) -> (times or None, note); a crash is retried (`tries` attempts in all),
    then reported in the note instead of ending the benchmark."""
    errors = []
    for _ in range(tries):
        try:
            times, note = runner(*args)
        except PeerCrashed as error:
            errors.append(str(error))
            continue
        return times, note + (f" (crashed once, then ran: {errors[0]})" if errors else "")
    return None, f"CRASHED {tries} times: " + "; ".join(errors)


# ---- fractions of the limit -------------------------------------------------------------------
def fraction_of_limit(limit_s, peer_s):
    """(fraction, measured, clipped): t(limit)/t(peer), clipped to 1 when noise makes the limit
    time slower than the peer (clipped is then True and `measured` keeps the raw ratio)."""
    measured = limit_s / peer_s
    return min(measured, 1.0), measured, measured > 1.0


def result_rows(times, peers, sizes, p):
    """One record per (peer, size): median time, algBW, busBW; the limit's traffic; every other
    peer's fraction of the limit (clipped at 1, flagged, the raw ratio kept)."""
    results = []
    for peer in peers:
        for nbytes in sizes:
            if (peer, nbytes) not in times:
                continue
            t = float(np.median(times[(peer, nbytes)]))
            row = {"peer": peer, "bytes": nbytes, "median_s": t, "algbw_GBps": nbytes / t / 1e9,
                   "busbw_GBps": nbytes / t / 1e9 * 2 * (p - 1) / p,
                   "repetitions": len(times[(peer, nbytes)])}
            if peer == LIMIT:
                read, written = traffic_bytes(nbytes, p)
                row.update(read_bytes_per_rank=read, written_bytes_per_rank=written,
                           traffic_GBps_per_rank=(read + written) / t / 1e9)
            else:
                limit = float(np.median(times[(LIMIT, nbytes)]))
                fraction, measured, clipped = fraction_of_limit(limit, t)
                row.update(fraction_of_limit=fraction, limit_over_peer_measured=measured,
                           fraction_clipped=clipped, interleaved_with_limit=peer in INTERLEAVED)
            results.append(row)
    return results


def limit_violations(results):
    """The rows where the peer timed call by call beside the limit beat it by more than noise:
    then the limit is no limit, and the run must fail."""
    return [r for r in results if r.get("interleaved_with_limit")
            and r["limit_over_peer_measured"] > 1 + LIMIT_NOISE]


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
    load_before = os.getloadavg()
    times, notes = run_minidist(p, sizes, args.quick), {}
    for name, runner in [("MPICH Allreduce", run_mpich), ("PyTorch gloo", run_gloo)]:
        got, note = run_peer(runner, p, sizes, args.quick)
        notes[name] = note
        if got:
            times.update(got)
    order = ["minidist ring", "minidist native copy-in", NATIVE, "MPICH Allreduce",
             "PyTorch gloo", LIMIT]
    peers = [peer for peer in order if any(key[0] == peer for key in times)]
    median = {key: float(np.median(v)) for key, v in times.items()}
    results = result_rows(times, peers, sizes, p)
    violations = limit_violations(results)
    report = {
        "command": "python benchmarks/allreduce.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "ranks": p, "dtype": np.dtype(DTYPE).name,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "limit": f"least traffic of a {p}-rank shared-memory all-reduce of n bytes, per rank "
                 f"{2 * p - 1}/{p}·n read and n written, timed at each size on the same "
                 f"buffers as {NATIVE!r}, call by call with it and the other minidist peers; "
                 f"fraction = t(limit) / t(peer), clipped to 1 and flagged when noise puts it "
                 f"above",
        "limit_noise_tolerance": LIMIT_NOISE,
        "fractions_clipped": sum(r.get("fraction_clipped", False) for r in results),
        "limit_violated": bool(violations),
        "peers": notes,
        "results": results,
    }
    print_table(report, peers, sizes, median)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allreduce.json").write_text(json.dumps(report, indent=1))
    plot(report, peers, sizes, median)
    print(f"\nwrote {RESULTS / 'allreduce.json'} and {RESULTS / 'allreduce.png'}")
    if violations:
        sys.exit("LIMIT VIOLATED: " + "; ".join(
            f"{r['peer']} at {_size(r['bytes'])} took {1 / r['limit_over_peer_measured']:.2f}× "
            "the limit's time" for r in violations) + f", call by call beside it (more than "
            f"{LIMIT_NOISE:.0%} below it is not noise: the limit does not time the least "
            "traffic)")


def print_table(report, peers, sizes, median):
    print(f"all-reduce, {report['ranks']} ranks, {report['dtype']}; load average "
          f"{report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after on {report['machine']['cpus']} cpus "
          "(other jobs may share this machine: timings are noisy); median time per call (µs) "
          "and algBW (GB/s)\n")
    print(f"{'size':>9} " + " ".join(f"{peer[:24]:>24}" for peer in peers))
    for nbytes in sizes:
        cells = [f"{median[(p, nbytes)] * 1e6:10.1f} {nbytes / median[(p, nbytes)] / 1e9:6.2f}GB/s"
                 if (p, nbytes) in median else f"{'—':>24}" for p in peers]
        print(f"{_size(nbytes):>9} " + " ".join(f"{c:>24}" for c in cells))
    rows = {(r["peer"], r["bytes"]): r for r in report["results"]}
    others = [p for p in peers if p not in (NATIVE, LIMIT)]
    print(f"\nratios: time of the peer / time of {NATIVE} (> 1 means minidist is faster)")
    print(f"{'size':>9} " + " ".join(f"{p[:24]:>24}" for p in others))
    for nbytes in sizes:
        cells = [f"{median[(p, nbytes)] / median[(NATIVE, nbytes)]:.2f}×"
                 if (p, nbytes) in median else "—" for p in others]
        print(f"{_size(nbytes):>9} " + " ".join(f"{c:>24}" for c in cells))
    measured = [p for p in peers if p != LIMIT]
    print(f"\nfraction of the limit reached: t(limit) / t(peer), the limit being the least "
          f"traffic ({report['ranks'] * 2 - 1}/{report['ranks']}·n read, n written per rank) "
          "timed at each size")
    print(f"{'size':>9} " + " ".join(f"{p[:24]:>24}" for p in measured))
    flagged = []
    for nbytes in sizes:
        cells = []
        for p in measured:
            row = rows.get((p, nbytes))
            if row is None:
                cells.append("—")
                continue
            cells.append(f"{row['fraction_of_limit']:.2f}" + ("*" if row["fraction_clipped"]
                                                              else ""))
            if row["fraction_clipped"]:
                why = ("call by call beside the limit: noise" if row["interleaved_with_limit"]
                       else "timed in a run of its own: the machine's state changed")
                flagged.append(f"{p} at {_size(nbytes)}: {row['limit_over_peer_measured']:.3f} "
                               f"({why})")
        print(f"{_size(nbytes):>9} " + " ".join(f"{c:>24}" for c in cells))
    if flagged:
        print("* clipped to 1.00, not a fraction above the limit: the limit timed slower than "
              "the peer; measured t(limit)/t(peer): " + "; ".join(flagged))
    for peer, note in report["peers"].items():
        print(f"{peer}: {note}")


def plot(report, peers, sizes, median):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"minidist ring": ("tab:blue", "o", "-"),
              "minidist native copy-in": ("tab:cyan", "s", "-"),
              NATIVE: ("tab:green", "D", "-"), "MPICH Allreduce": ("tab:red", "^", "-"),
              "PyTorch gloo": ("tab:orange", "v", "-"), LIMIT: ("black", None, "--")}
    rows = {(r["peer"], r["bytes"]): r for r in report["results"]}
    fig, (ax_t, ax_bw, ax_f) = plt.subplots(1, 3, figsize=(15, 4.6))
    for peer in peers:
        colour, marker, line = styles[peer]
        xs = [n for n in sizes if (peer, n) in median]
        kw = {"color": colour, "marker": marker, "ls": line, "ms": 4, "label": peer,
              "lw": 2 if peer == LIMIT else 1.3, "zorder": 3 if peer == LIMIT else 2}
        ax_t.loglog(xs, [median[(peer, n)] * 1e6 for n in xs], **kw)
        ax_bw.loglog(xs, [n / median[(peer, n)] / 1e9 for n in xs], **kw)
        if peer != LIMIT:
            ax_f.semilogx(xs, [rows[(peer, n)]["fraction_of_limit"] for n in xs], **kw)
            clipped = [n for n in xs if rows[(peer, n)]["fraction_clipped"]]
            ax_f.plot(clipped, [1.0] * len(clipped), "*", color=colour, ms=11, zorder=4)
    ticks = [n for n in sizes if sizes.index(n) % 2 == 0]
    for ax in (ax_t, ax_bw, ax_f):
        ax.set_xticks(ticks, [_size(n) for n in ticks])
        ax.set_xlabel("message size")
        ax.grid(True, which="major", alpha=0.3)
    ax_t.set(ylabel="median time per call (µs)", title=f"all-reduce on {report['ranks']} ranks")
    ax_bw.set(ylabel="algBW = n / t (GB/s)", title="bandwidth")
    note = "\n(★: measured above 1, clipped to 1)" if report["fractions_clipped"] else ""
    ax_f.set(ylabel="t(limit) / t(peer)", ylim=(0, 1.05),
             title=f"fraction of the least-traffic limit{note}")
    ax_f.axhline(1.0, color="black", ls="--", lw=1)
    ax_f.title.set_fontsize(10)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(RESULTS / "allreduce.png", dpi=110)


def _size(nbytes):
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 1024} KiB"


if __name__ == "__main__":
    main()
