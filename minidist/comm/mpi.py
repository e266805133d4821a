"""The MPI backend: every rank is an MPI process; messages and native collectives go through mpi4py.

Two ways to run the same `fn`:
- under `mpiexec -n N python script.py`, `run(fn, N, backend="mpi")` runs fn on this rank and
  all-gathers the results, so every rank returns the full list. A rank that raises sends its
  report to the others (MPI tag FAILURE_TAG), which every wait polls for: every rank raises
  WorkerError naming it, and the job ends as the script does. A rank that dies cannot tell:
  mpiexec then kills the job, and the rank's watcher (`mpi_watch.py`) removes its shared memory.
- from a plain process (a notebook, a script started without mpiexec), `run` starts mpiexec
  itself (`mpi_launcher.py`), ships fn by value and collects each rank's result or failure.

Messages: MPI tags are small (MPICH: < 2**29) and minidist's wire tags are 64-bit, so every message
travels under one MPI tag with a small header (wire tag, dtype, shape, then the collective call it
is part of) in front of the data. A receiver takes rank src's messages in order and stashes those
for other tags until asked.
Nothing blocks inside MPI: every wait polls a request (MPICommunicator._poll), so a waiting rank
gives its core to a busy one (8 ranks on 2 cores) and every wait ends at its timeout. Native
collectives are MPI's own (Iallreduce, Ibcast, Iallgather, Ireduce_scatter, Ialltoallv:
mpi_native.py), checked first for a call that all ranks agree on (an all-gather of 8-byte
digests), since MPI answers mismatched sizes with wrong numbers rather than an error.
"""

import contextlib
import os
import subprocess
import sys
import time
import traceback

import cloudpickle
import numpy as np
from threadpoolctl import threadpool_limits

from minidist.comm.buffers import wire_dtype
from minidist.comm.calls import CALL_BYTES, NO_CALL
from minidist.comm.communicator import Communicator, closing_error, deadline_error
from minidist.comm.mpi_native import MPICollectives
from minidist.errors import CommTimeout, remote_failure

MPI = None  # mpi4py.MPI, imported on first use: importing it starts MPI in this process
P2P_TAG = 7  # the one MPI tag all of minidist's messages travel under
FAILURE_TAG = 8  # a failed rank's report to every other rank (MPICommunicator.tell_failure)
HEAD = 3  # header words before the shape: wire tag, ndim, dtype (8 ASCII bytes)
YIELD_S, NAP_S, MAX_PAUSE_S = 0.05, 1e-6, 1e-3  # waiting: see MPICommunicator._poll
MPIEXEC_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


def _load_mpi():
    global MPI
    if MPI is None:
        from mpi4py import MPI as mpi
        MPI = mpi
    return MPI


def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def mpich_shm_files():
    """The shared-memory files MPICH made for this job (Linux). MPI_Abort and a killed rank leave
    them in /dev/shm; whoever ends a job abnormally removes them."""
    if not os.path.exists("/proc/self/maps"):
        return set()
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "/dev/shm/mpich" in line
                and not line.rstrip().endswith("(deleted)")}


def abort(world):
    """End the whole MPI job now, leaving no shared memory behind."""
    for path in mpich_shm_files():
        with contextlib.suppress(OSError):
            os.unlink(path)
    world.Abort(1)


def _pack(array, wire, call=NO_CALL):
    """One message: int64 header words [wire, ndim, dtype, *shape] (16-byte aligned), the
    CALL_BYTES of `call` (the collective the message is part of), then data."""
    words = HEAD + array.ndim + (HEAD + array.ndim) % 2
    start = 8 * words + CALL_BYTES
    buf = np.empty(start + array.nbytes, dtype=np.uint8)
    head = buf[:8 * words].view(np.int64)
    head[:] = (wire, array.ndim, 0, *array.shape) + (0,) * (words - HEAD - array.ndim)
    head[2:3].view("S8")[0] = wire_dtype(array.dtype).encode()
    buf[8 * words:start] = call.wire
    buf[start:] = array.reshape(-1).view(np.uint8)
    return buf


def _unpack(buf):
    """(wire tag, array, raw bytes of the call) from a message; the array is a view into buf."""
    ndim = int(buf[8:16].view(np.int64)[0])
    words = HEAD + ndim + (HEAD + ndim) % 2
    start = 8 * words + CALL_BYTES
    head = buf[:8 * words].view(np.int64)
    dtype = np.dtype(head[2:3].view("S8")[0].decode())
    array = buf[start:].view(dtype).reshape(tuple(head[HEAD:HEAD + ndim]))
    return int(head[0]), array, buf[8 * words:start].tobytes()


class MPICommunicator(MPICollectives, Communicator):
    """A Communicator over an mpi4py communicator (COMM_WORLD by default; duplicated, so
    minidist's messages never mix with the caller's own)."""

    backend = "mpi"

    def __init__(self, mpi_comm=None, timeout=60.0, debug=False):
        _load_mpi()
        self._base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.mpi = self._base.Dup()
        super().__init__(self.mpi.rank, self.mpi.size, timeout, debug)
        self._returned()
        node = self._base.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self._crowded = node.size > cores()  # more ranks than cores
        node.Free()
        self._sends = []  # requests of sends not yet known to be complete
        self._stash = {}  # (src, wire tag) -> arrays that came before they were asked for
        self.peer_failure = None  # the report of a rank that failed, once one has come

    def _set_status(self, text):
        self.status = text

    def _poll(self, ready, deadline, timeout, what):
        """Call ready() until it returns something true; CommTimeout at `deadline`. Between
        calls: with a core per rank, just let others run (sched_yield); with more ranks than
        cores, nap (the rank we wait for needs this core), and after YIELD_S always nap, longer
        and longer up to MAX_PAUSE_S. Measured on 2 cores, 8 ranks taking turns to compute
        between all-reduces: compute speed with naps, 2x slower with yields (a loop of nothing
        but small all-reduces is 3x faster with yields, though). With 2 ranks, naps make a small
        all-reduce 13x slower (0.4 ms against 30 us)."""
        start, pause = time.monotonic(), NAP_S
        while not (got := ready()):
            self._check_peers()
            now = time.monotonic()
            if now > deadline:
                raise deadline_error(f"rank {self.rank}: {what}", timeout)
            if self._interrupted():
                raise closing_error(f"rank {self.rank}: {what}")
            if now - start > YIELD_S:
                time.sleep(pause)
                pause = min(2 * pause, MAX_PAUSE_S)
            elif self._crowded:
                time.sleep(NAP_S)
            else:
                os.sched_yield()
        return got

    def _check_async(self):
        """The progress thread calls MPI, and after a failure the main thread may call it
        (to tell the other ranks) while the progress thread is still inside an op, so MPI must
        have been started with THREAD_MULTIPLE (as mpi4py asks by default)."""
        level = MPI.Query_thread()
        if level != MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "THREAD_SINGLE", MPI.THREAD_FUNNELED: "THREAD_FUNNELED",
                     MPI.THREAD_SERIALIZED: "THREAD_SERIALIZED"}
            raise RuntimeError(
                f"async_op=True on the MPI backend needs MPI's thread level THREAD_MULTIPLE (a "
                f"progress thread calls MPI beside the rank's own thread), but MPI runs at "
                f"{names.get(level, level)}; set mpi4py.rc.thread_level = 'multiple' (mpi4py's "
                f"default) before the first `from mpi4py import MPI`")

    def _transport_send(self, array, dst, tag, call):
        """Isend a private packed copy; completed requests are dropped from time to time."""
        self._sends.append(self.mpi.Isend(_pack(array, tag, call), dst, P2P_TAG))
        if len(self._sends) > 32:
            self._sends = [req for req in self._sends if not req.Test()]

    def _transport_recv(self, src, tag, timeout):
        deadline = time.monotonic() + timeout
        status = MPI.Status()
        while (src, tag) not in self._stash:
            message = self._poll(lambda: self.mpi.Improbe(src, P2P_TAG, status), deadline,
                                 timeout, f"recv from rank {src}")
            buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self._poll(message.Irecv(buf).Test, deadline, timeout, f"recv from rank {src}")
            wire, array, call = _unpack(buf)
            self._stash.setdefault((src, wire), []).append((array, call))
        queue = self._stash[(src, tag)]
        if len(queue) == 1:
            del self._stash[(src, tag)]
        return queue.pop(0)

    def finish(self):
        """End of a run: wait (at most `timeout`) until every rank has finished and every message
        has been delivered, receiving and dropping the ones nobody asked for (MPICH crashes in
        Finalize over a send still pending); then free the duplicated communicator."""
        self._set_status("finished; waiting for the other ranks")
        barrier, drops = None, []

        def done():
            nonlocal barrier
            status = MPI.Status()
            while (message := self.mpi.Improbe(MPI.ANY_SOURCE, P2P_TAG, status)) is not None:
                drops.append(message.Irecv(np.empty(status.Get_count(MPI.BYTE), np.uint8)))
            self._sends = [req for req in self._sends if not req.Test()]
            if barrier is None and not self._sends:  # entered once my own sends are done
                barrier = self._base.Ibarrier()  # not self.mpi: it must not match a
                # native collective that a rank still running fn is waiting in
            return barrier is not None and barrier.Test() and MPI.Request.Testall(drops)

        self._poll(done, time.monotonic() + self.timeout, self.timeout,
                   "finished, but the other ranks did not all finish")
        self.mpi.Free()

    # ---- a failure reaches every rank: what each wait checks while it waits --------------------
    def tell_failure(self, report):
        """This rank failed: send its report (rank, exc_type, message, traceback) to every other
        rank, and wait (briefly: a dead peer never receives) until the sends are out."""
        self.peer_failure = report  # from now on, this rank heeds no other rank's report
        sends = [self.mpi.isend(report, dst, FAILURE_TAG)
                 for dst in range(self.world_size) if dst != self.rank]
        with contextlib.suppress(CommTimeout):
            self._poll(lambda: MPI.Request.Testall(sends), time.monotonic() + 1.0, 1.0,
                       "telling the other ranks that this one failed")

    def _check_peers(self):
        """Raise the failure another rank reported (WorkerError naming it); once one has come,
        every later wait raises it again."""
        if self.peer_failure is None:
            message = self.mpi.improbe(MPI.ANY_SOURCE, FAILURE_TAG)  # a pickled report
            if message is None:
                return
            self.peer_failure = message.recv()
        if self.peer_failure["rank"] != self.rank:
            f = self.peer_failure
            raise remote_failure(f["rank"], f["exc_type"], f["message"], f["traceback"])


# ---- run(fn, world_size, backend="mpi") ----------------------------------------------------------
def run_mpi(fn, world_size, args, kwargs, timeout, debug):
    """Run fn(comm, *args, **kwargs) on `world_size` MPI ranks; results in rank order."""
    if any(name in os.environ for name in MPIEXEC_ENV):  # started by mpiexec: we are one rank
        return _run_this_rank(fn, world_size, args, kwargs, timeout, debug)
    from minidist.comm.mpi_launcher import run_with_mpiexec

    return run_with_mpiexec(fn, world_size, args, kwargs, timeout, debug)


def _run_this_rank(fn, world_size, args, kwargs, timeout, debug):
    """Under mpiexec: fn on this rank, then every rank gets every result. A rank that fails
    says so on stderr, sends its report to every other rank and raises WorkerError naming
    itself; each other rank raises WorkerError naming it at its next wait (at the latest when it
    finishes fn). A CommTimeout, KeyboardInterrupt or SystemExit is raised as it is."""
    world = _load_mpi().COMM_WORLD
    if world.size != world_size:
        raise ValueError(f"run(..., world_size={world_size}) inside an MPI job of {world.size} "
                         f"ranks; start it with mpiexec -n {world_size} or pass "
                         f"world_size={world.size}")
    comm = MPICommunicator(world, timeout, debug)
    _tell_watcher(world.rank, b"run\n")
    try:
        with threadpool_limits(limits=1):
            result = fn(comm, *args, **kwargs)
            comm._end_async()  # fn may return with async ops pending: they count too
        blob = cloudpickle.dumps(result)
        del result
        comm.finish()
        return [cloudpickle.loads(b) for b in world.allgather(blob)]
    except BaseException as exc:
        comm._end_async(wait=False)  # first: then only this thread calls MPI
        if comm.peer_failure is not None:  # raised by the report of a rank that failed first
            raise
        report = {"rank": comm.rank, "exc_type": type(exc).__name__, "message": str(exc),
                  "traceback": traceback.format_exc()}
        sys.stderr.write(f"minidist: rank {comm.rank} failed: {report['exc_type']}: {exc}; "
                         f"the other ranks raise WorkerError naming it\n")
        sys.stderr.flush()
        comm.tell_failure(report)
        if isinstance(exc, (CommTimeout, KeyboardInterrupt, SystemExit)):
            raise
        raise remote_failure(comm.rank, report["exc_type"], report["message"],
                             report["traceback"]) from None
    finally:
        _tell_watcher(world.rank, b"done\n")


_WATCHER = None  # this rank's watcher (mpi_watch.py), started by its first run()


def _tell_watcher(rank, line):
    """Tell this rank's watcher that run() starts or ends: should the rank die inside run(),
    the watcher says how and removes the job's shared memory (nobody else in the job can)."""
    global _WATCHER
    if _WATCHER is None:
        _WATCHER = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.join(os.path.dirname(__file__), "mpi_watch.py"),
             str(rank), str(os.getpid()), *sorted(mpich_shm_files())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    with contextlib.suppress(OSError):  # a watcher gone (killed) is no reason to fail
        _WATCHER.stdin.write(line)
        _WATCHER.stdin.flush()
