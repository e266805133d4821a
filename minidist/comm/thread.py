"""The thread backend: every rank is a thread of this process; messages are arrays in mailboxes.

Deterministic and quick to start, so notebooks and most tests use it. numpy releases the GIL in
its large loops, so ranks do overlap in the heavy parts.
"""

import threading
import time
import traceback
from collections import defaultdict, deque

import numpy as np
from threadpoolctl import threadpool_limits

from minidist.comm.collectives import UFUNCS, exchanged_bytes, reduce_chunk
from minidist.comm.communicator import Communicator, deadline_error
from minidist.data import shard_bounds
from minidist.errors import CollectiveMismatchError, CommTimeout, remote_failure

STOP_GRACE = 1.0  # seconds the launcher waits for aborted ranks to stop before it returns


class Aborted(BaseException):
    """The run's cancellation: raised in a rank's thread at its next send, recv or barrier (or
    at once, if it is waiting in one) after a rank failed, the run timed out or the caller was
    interrupted. Threads cannot be killed, so ranks stop here. A BaseException, as
    KeyboardInterrupt is, so that an `except Exception` in user code cannot swallow it."""


class ThreadWorld:
    """What the ranks of one run share: mailboxes, a status board and an abort flag."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.mailboxes = [defaultdict(deque) for _ in range(world_size)]  # [dst][(src, tag)]
        self.conditions = [threading.Condition() for _ in range(world_size)]
        self.status = ["starting"] * world_size
        self.aborted = False
        self.slots = [None] * world_size  # for the native all-reduce
        self.calls = [[None] * world_size, [None] * world_size]  # see ThreadCommunicator._meet
        self.barrier = threading.Barrier(world_size)

    def abort(self):
        self.aborted = True
        self.barrier.abort()
        for cond in self.conditions:
            with cond:
                cond.notify_all()


class ThreadCommunicator(Communicator):
    backend = "thread"

    def __init__(self, world, rank, timeout=60.0, debug=False):
        super().__init__(rank, world.world_size, timeout, debug)
        self.world = world
        self.native_calls = 0
        self._returned()

    def _set_status(self, text):
        self.world.status[self.rank] = text

    def _check_aborted(self):
        if self.world.aborted:
            raise Aborted(f"rank {self.rank}: the run was aborted")

    def _transport_send(self, array, dst, tag, call):
        self._check_aborted()
        cond = self.world.conditions[dst]
        with cond:
            self.world.mailboxes[dst][(self.rank, tag)].append((array.copy(), call.raw))
            cond.notify_all()

    def _transport_recv(self, src, tag, timeout):
        cond, box = self.world.conditions[self.rank], self.world.mailboxes[self.rank]
        deadline = time.monotonic() + timeout
        with cond:
            while True:
                self._check_aborted()  # also when a message is waiting: a cancelled rank stops
                if box[(src, tag)]:
                    return box[(src, tag)].popleft()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise deadline_error(f"rank {self.rank}: recv from rank {src}", timeout)
                cond.wait(left)

    def _wait_all(self):
        self._check_aborted()
        try:
            self.world.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self.world.aborted:
                raise Aborted(f"rank {self.rank}: the run was aborted") from None
            raise deadline_error(f"rank {self.rank}: {self._op} waiting for all ranks",
                                 self.timeout) from None

    def _meet(self):
        """The first barrier of a native collective, which also checks that every rank made the
        same call. Calls alternate between two lists, so a rank's next native call cannot
        overwrite a call that a slower rank still reads (it must pass a barrier first)."""
        calls, mine = self.world.calls[self.native_calls & 1], self._call
        self.native_calls += 1
        calls[self.rank] = mine
        self._wait_all()
        if any(call.raw != mine.raw for call in calls):
            raise CollectiveMismatchError.between(
                self.rank, {r: call.text for r, call in enumerate(calls)})

    def _native_barrier(self):
        self._meet()

    def _native_all_reduce(self, array, op):
        """Every rank reduces its own chunk straight out of all ranks' arrays (no messages), then
        copies the other chunks from their owners. Three barriers keep the phases apart."""
        p, r, slots = self.world_size, self.rank, self.world.slots
        slots[r] = array.reshape(-1)
        self._meet()
        bounds = [shard_bounds(array.size, c, p) for c in range(p)]
        lo, hi = bounds[r]
        ufunc = UFUNCS[op]
        mine = slots[r][lo:hi]
        for src in range(p):
            if src != r:
                ufunc(mine, slots[src][lo:hi], out=mine)
        if op == "mean":
            mine /= p
        self._wait_all()
        for src in range(p):
            if src != r:
                lo, hi = bounds[src]
                slots[r][lo:hi] = slots[src][lo:hi]
        self._wait_all()
        slots[r] = None  # read by nobody now: let the caller's array go
        mine = bounds[r][1] - bounds[r][0]
        moved = ((p - 1) * mine + array.size - mine) * array.itemsize
        self._count_native(sent=moved, received=moved)
        return array

    def _native_broadcast(self, array, src):
        """The root lends its array; every other rank copies it directly."""
        self.world.slots[self.rank] = array
        self._meet()
        source = self.world.slots[src]
        if self.rank != src:
            array[...] = source
        self._wait_all()
        self.world.slots[self.rank] = None
        root = self.rank == src
        self._count_native(sent=(self.world_size - 1) * array.nbytes if root else 0,
                           received=0 if root else array.nbytes)
        return array

    def _native_reduce_scatter(self, array, op):
        """My chunk of rows, reduced straight out of every rank's array."""
        self.world.slots[self.rank] = array
        self._meet()
        chunk = reduce_chunk(self, list(self.world.slots), op)
        self._wait_all()  # nobody may change its array while others still read it
        self.world.slots[self.rank] = None
        return chunk

    def _native_all_gather(self, array):
        """Every rank's array, copied straight out of its owner's."""
        self.world.slots[self.rank] = array
        self._meet()
        out = np.stack(self.world.slots)
        self._wait_all()
        self.world.slots[self.rank] = None
        moved = (self.world_size - 1) * array.nbytes
        self._count_native(sent=moved, received=moved)
        return out

    def _native_all_to_all(self, chunks):
        """Every rank lends its list of chunks; each copies chunk `rank` out of every list."""
        r, slots = self.rank, self.world.slots
        slots[r] = chunks
        self._meet()
        out = [theirs[r].copy() for theirs in slots]
        self._wait_all()  # nobody may change its chunks while others still copy them
        slots[r] = None
        self._count_native(*exchanged_bytes(r, chunks, out))
        return out


def run_threads(fn, world_size, args, kwargs, timeout, debug, threads=1):
    """Run fn(comm, *args, **kwargs) on `world_size` threads; results in rank order.

    BLAS may use `threads` threads per call while the ranks run (the limit is process-wide and
    restored afterwards): p ranks each starting a BLAS pool would oversubscribe the cores.
    OpenMP keeps its thread count per thread, so each rank's thread sets it again.
    """
    with threadpool_limits(limits=threads):
        return _run_threads(fn, world_size, args, kwargs, timeout, debug, threads)


def _run_threads(fn, world_size, args, kwargs, timeout, debug, pool_threads):
    """Wait until every rank returned, one failed, or `timeout` passed; then, however the wait
    ended (Ctrl-C too), abort the world, so that every rank stops at its next communicator call,
    and give the ranks a moment to do so."""
    world = ThreadWorld(world_size)
    results, failures, lock = [None] * world_size, [], threading.Lock()
    snapshot, returned, ended = {}, set(), threading.Event()

    def main(rank):
        comm = ThreadCommunicator(world, rank, timeout, debug)
        try:
            with threadpool_limits(limits=pool_threads, user_api="openmp"):
                results[rank] = fn(comm, *args, **kwargs)
                comm._end_async()  # fn may return with async ops pending: they count too
            world.status[rank] = "finished"
        except Aborted:
            world.status[rank] = "aborted"
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the caller
            with lock:
                if not failures:
                    snapshot.update(enumerate(world.status))
                failures.append((rank, exc, traceback.format_exc()))
            world.abort()
        finally:  # the world is aborted unless fn returned: an async op running ends at once
            comm._end_async(wait=False)
        with lock:
            returned.add(rank)
            if failures or len(returned) == world_size:
                ended.set()

    threads = [threading.Thread(target=main, args=(r,), name=f"minidist-rank-{r}", daemon=True)
               for r in range(world_size)]
    try:
        for t in threads:
            t.start()
        ended.wait(timeout)
        with lock:
            unfinished = [r for r in range(world_size) if r not in returned]
            pending = {r: world.status[r] for r in unfinished}
            first = failures[0] if failures else None
    finally:
        world.abort()
        grace = time.monotonic() + STOP_GRACE
        for t in threads:
            if t.ident is not None:
                t.join(max(0.0, grace - time.monotonic()))
    if first:
        rank, exc, tb = first
        if isinstance(exc, CommTimeout):
            pending = {r: s for r, s in snapshot.items() if s != "finished"}
            raise CommTimeout(f"rank {rank} waited {timeout} s for a message", pending)
        raise remote_failure(rank, type(exc).__name__, str(exc), tb) from exc
    if unfinished:
        raise CommTimeout(f"{len(unfinished)} of {world_size} ranks did not finish within "
                          f"{timeout} s", pending)
    return results
