"""The MPI backend: every rank is an MPI process; messages and native collectives go through mpi4py.

Two ways to run the same `fn`:
- under `mpiexec -n N python script.py`, `run(fn, N, backend="mpi")` runs fn on this rank and
  all-gathers the results, so every rank returns the full list. A rank that raises prints its
  traceback and calls MPI_Abort, which ends the whole job: that is how MPI programs fail.
- from a plain process (a notebook, a script started without mpiexec), `run` starts mpiexec
  itself (`mpi_launcher.py`), ships fn by value and collects each rank's result or failure.

Messages: MPI tags are small (MPICH: < 2**29) and minidist's wire tags are 64-bit, so every message
travels under one MPI tag with a small header (wire tag, dtype, shape) in front of the data. A
receiver takes rank src's messages in order and stashes those for other tags until asked.
Nothing blocks inside MPI: every wait polls a request (MPICommunicator._poll), so a waiting rank
gives its core to a busy one (8 ranks on 2 cores) and every wait ends at its timeout. Native
collectives are MPI's own (Iallreduce, Ibcast, Iallgather), checked first for a call that all
ranks agree on, since MPI answers mismatched sizes with wrong numbers rather than an error.
"""

import contextlib
import os
import sys
import time
import traceback
import zlib

import cloudpickle
import numpy as np
from threadpoolctl import threadpool_limits

from minidist.comm import collectives
from minidist.comm.communicator import Communicator, deadline_error
from minidist.errors import CollectiveMismatchError

MPI = None  # mpi4py.MPI, imported on first use: importing it starts MPI in this process
P2P_TAG = 7  # the one MPI tag all of minidist's messages travel under
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


def _pack(array, wire):
    """One message: int64 header words [wire, ndim, dtype, *shape] (16-byte aligned), then data."""
    words = HEAD + array.ndim + (HEAD + array.ndim) % 2
    buf = np.empty(8 * words + array.nbytes, dtype=np.uint8)
    head = buf[:8 * words].view(np.int64)
    head[:] = (wire, array.ndim, 0, *array.shape) + (0,) * (words - HEAD - array.ndim)
    head[2:3].view("S8")[0] = array.dtype.str.encode()
    buf[8 * words:] = array.reshape(-1).view(np.uint8)
    return buf


def _unpack(buf):
    """(wire tag, array) from a message; the array is a view into buf, no copy."""
    ndim = int(buf[8:16].view(np.int64)[0])
    words = HEAD + ndim + (HEAD + ndim) % 2
    head = buf[:8 * words].view(np.int64)
    dtype = np.dtype(head[2:3].view("S8")[0].decode())
    return int(head[0]), buf[8 * words:].view(dtype).reshape(tuple(head[HEAD:HEAD + ndim]))


def _as_bytes(array):
    """A byte view of a contiguous array: MPI moves any dtype's bytes for bcast and gather."""
    return array.reshape(-1).view(np.uint8)


def _mpi_op(dtype, op):
    """MPI's reduction for (dtype, op), or None where MPI has none (then the ring runs)."""
    from mpi4py.util.dtlib import from_numpy_dtype
    try:
        from_numpy_dtype(dtype)
    except (KeyError, ValueError, TypeError):
        return None
    if dtype.kind == "b":  # numpy's add and maximum on booleans are a logical or
        return {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND}[op]
    if dtype.kind == "c" and op in ("max", "min"):
        return None
    return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


class MPICommunicator(Communicator):
    """A Communicator over an mpi4py communicator (COMM_WORLD by default; duplicated, so
    minidist's messages never mix with the caller's own)."""

    backend = "mpi"

    def __init__(self, mpi_comm=None, timeout=60.0, debug=False):
        _load_mpi()
        self._base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.mpi = self._base.Dup()
        super().__init__(self.mpi.rank, self.mpi.size, timeout, debug)
        self.status = "starting"
        node = self._base.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self._crowded = node.size > cores()  # more ranks than cores
        node.Free()
        self._sends = []  # requests of sends not yet known to be complete
        self._stash = {}  # (src, wire tag) -> arrays that came before they were asked for

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
            now = time.monotonic()
            if now > deadline:
                raise deadline_error(f"rank {self.rank}: {what}", timeout)
            if now - start > YIELD_S:
                time.sleep(pause)
                pause = min(2 * pause, MAX_PAUSE_S)
            elif self._crowded:
                time.sleep(NAP_S)
            else:
                os.sched_yield()
        return got

    def _transport_send(self, array, dst, tag):
        """Isend a private packed copy; completed requests are dropped from time to time."""
        self._sends.append(self.mpi.Isend(_pack(array, tag), dst, P2P_TAG))
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
            wire, array = _unpack(buf)
            self._stash.setdefault((src, wire), []).append(array)
        queue = self._stash[(src, tag)]
        if len(queue) == 1:
            del self._stash[(src, tag)]
        return queue.pop(0)

    def _wait(self, request):
        self._poll(request.Test, time.monotonic() + self.timeout, self.timeout,
                   f"{self._op}: MPI did not complete it")

    def _agree(self, call, array):
        """MPI gives wrong numbers, not an error, when ranks pass different sizes or call
        different collectives; so each native call first checks that all ranks made the same
        call (one small all-reduce of a checksum of it: max(x) = -max(-x) iff all agree)."""
        call = f"{call} on a {array.dtype} array of shape {array.shape}"
        mine = zlib.crc32(f"{call} {array.dtype.str}".encode())
        both = np.array([mine, -mine], dtype=np.int64)
        self._wait(self.mpi.Iallreduce(MPI.IN_PLACE, both, MPI.MAX))
        if both[0] != -both[1]:
            raise CollectiveMismatchError(f"rank {self.rank} called {call}, other ranks called "
                                          f"something else; run(..., debug=True) shows each call")

    # ---- native collectives: MPI's own, non-blocking and polled, so they time out too ---------
    # MPI does not report the bytes it moves; stats get the ring model's count for this rank
    # (the bytes algorithm="ring" would move here), or, for broadcast, n bytes out of the root
    # and n bytes into every other rank.
    def _count(self, name, sent, received, messages):
        op = self.stats[name]
        op.bytes_sent, op.bytes_received = op.bytes_sent + sent, op.bytes_received + received
        op.messages += messages

    def _native_all_reduce(self, array, op):
        mpi_op = _mpi_op(array.dtype, op)
        if mpi_op is None:  # complex max/min, non-native byte order: the ring does it
            return collectives.all_reduce_ring(self, array, op)
        self._set_status(f"all_reduce: MPI Iallreduce over {self.world_size} ranks")
        self._agree(f"all_reduce(op={op!r})", array)
        self._wait(self.mpi.Iallreduce(MPI.IN_PLACE, array, mpi_op))
        if op == "mean":
            array /= self.world_size
        # the ring sends every chunk but r, then every chunk but r+1; it receives every chunk
        # but r-1, then every chunk but r (chunk c has n // p elements, + 1 if c < n mod p)
        p, r, n = self.world_size, self.rank, array.size
        before, mine, after = (n // p + ((r + k) % p < n % p) for k in (-1, 0, 1))
        self._count("all_reduce", (2 * n - mine - after) * array.itemsize,
                    (2 * n - before - mine) * array.itemsize, 2 * (p - 1))
        return array

    def _native_broadcast(self, array, src):
        self._set_status(f"broadcast: MPI Ibcast from rank {src}")
        self._agree(f"broadcast(src={src})", array)
        self._wait(self.mpi.Ibcast(_as_bytes(array), root=src))
        if self.world_size > 1:
            root = self.rank == src
            self._count("broadcast", array.nbytes * root, array.nbytes * (not root), int(root))
        return array

    def _native_all_gather(self, array):
        out = np.empty((self.world_size, *array.shape), dtype=array.dtype)
        self._set_status(f"all_gather: MPI Iallgather over {self.world_size} ranks")
        self._agree("all_gather", array)
        self._wait(self.mpi.Iallgather(_as_bytes(array), _as_bytes(out)))
        n = (self.world_size - 1) * array.nbytes
        self._count("all_gather", n, n, self.world_size - 1)
        return out

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


# ---- run(fn, world_size, backend="mpi") ----------------------------------------------------------
def run_mpi(fn, world_size, args, kwargs, timeout, debug):
    """Run fn(comm, *args, **kwargs) on `world_size` MPI ranks; results in rank order."""
    if any(name in os.environ for name in MPIEXEC_ENV):  # started by mpiexec: we are one rank
        return _run_this_rank(fn, world_size, args, kwargs, timeout, debug)
    from minidist.comm.mpi_launcher import run_with_mpiexec

    return run_with_mpiexec(fn, world_size, args, kwargs, timeout, debug)


def _run_this_rank(fn, world_size, args, kwargs, timeout, debug):
    """Under mpiexec: fn on this rank, then every rank gets every result. On a failure this rank
    prints its traceback and calls MPI_Abort, which ends the whole job."""
    world = _load_mpi().COMM_WORLD
    if world.size != world_size:
        raise ValueError(f"run(..., world_size={world_size}) inside an MPI job of {world.size} "
                         f"ranks; start it with mpiexec -n {world_size} or pass "
                         f"world_size={world.size}")
    try:
        comm = MPICommunicator(world, timeout, debug)
        with threadpool_limits(limits=1):
            blob = cloudpickle.dumps(fn(comm, *args, **kwargs))
        comm.finish()
        return [cloudpickle.loads(b) for b in world.allgather(blob)]
    except BaseException:  # noqa: BLE001 - under mpiexec a failed rank ends the job
        sys.stderr.write(f"minidist: rank {world.rank} failed\n{traceback.format_exc()}")
        sys.stderr.flush()
        abort(world)
