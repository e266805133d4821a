"""The thread backend: every rank is a thread of this process; messages are arrays in mailboxes.

Deterministic and quick to start, so notebooks and most tests use it. numpy releases the GIL in
its large loops, so ranks do overlap in the heavy parts.
"""

import threading
import time
import traceback
from collections import defaultdict, deque

from threadpoolctl import threadpool_limits

from minidist.comm.collectives import UFUNCS
from minidist.comm.communicator import Communicator, deadline_error
from minidist.data import shard_bounds
from minidist.errors import CollectiveMismatchError, CommTimeout, remote_failure


class Aborted(Exception):
    """Raised in ranks blocked on a message when another rank failed."""


class ThreadWorld:
    """What the ranks of one run share: mailboxes, a status board and an abort flag."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.mailboxes = [defaultdict(deque) for _ in range(world_size)]  # [dst][(src, tag)]
        self.conditions = [threading.Condition() for _ in range(world_size)]
        self.status = ["starting"] * world_size
        self.aborted = False
        self.slots = [None] * world_size  # for the native all-reduce
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

    def _set_status(self, text):
        self.world.status[self.rank] = text

    def _transport_send(self, array, dst, tag):
        cond = self.world.conditions[dst]
        with cond:
            self.world.mailboxes[dst][(self.rank, tag)].append(array.copy())
            cond.notify_all()

    def _transport_recv(self, src, tag, timeout):
        cond, box = self.world.conditions[self.rank], self.world.mailboxes[self.rank]
        deadline = time.monotonic() + timeout
        with cond:
            while not box[(src, tag)]:
                if self.world.aborted:
                    raise Aborted(f"rank {self.rank}: the run was aborted")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise deadline_error(f"rank {self.rank}: recv from rank {src}", timeout)
                cond.wait(left)
            return box[(src, tag)].popleft()

    def _wait_all(self):
        try:
            self.world.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self.world.aborted:
                raise Aborted(f"rank {self.rank}: the run was aborted") from None
            raise deadline_error(f"rank {self.rank}: {self._op} waiting for all ranks",
                                 self.timeout) from None

    def _native_barrier(self):
        self._wait_all()

    def _native_all_reduce(self, array, op):
        """Every rank reduces its own chunk straight out of all ranks' arrays (no messages), then
        copies the other chunks from their owners. Three barriers keep the phases apart."""
        p, r, slots = self.world_size, self.rank, self.world.slots
        slots[r] = array.reshape(-1)
        self._wait_all()
        shapes = {(a.size, a.dtype) for a in slots}
        if len(shapes) != 1:
            raise CollectiveMismatchError(f"all_reduce: ranks passed different sizes/dtypes: "
                                          f"{[(a.size, str(a.dtype)) for a in slots]}")
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
        mine = bounds[r][1] - bounds[r][0]
        moved = ((p - 1) * mine + array.size - mine) * array.itemsize
        self._count_native(sent=moved, received=moved)
        return array



    def _native_broadcast(self, array, src):
        """The root lends its array; every other rank copies it directly."""
        self.world.slots[self.rank] = array
        self._wait_all()
        source = self.world.slots[src]
        if source.shape != array.shape or source.dtype != array.dtype:
            raise CollectiveMismatchError(f"broadcast: rank {src} has {source.dtype} "
                                          f"{source.shape}, rank {self.rank} {array.dtype} "
                                          f"{array.shape}")
        if self.rank != src:
            array[...] = source
        self._wait_all()
        root = self.rank == src
        self._count_native(sent=(self.world_size - 1) * array.nbytes if root else 0,
                           received=0 if root else array.nbytes)
        return array

def run_threads(fn, world_size, args, kwargs, timeout, debug, threads=1):
    """Run fn(comm, *args, **kwargs) on `world_size` threads; results in rank order.

    BLAS may use `threads` threads per call while the ranks run (the limit is process-wide and
    restored afterwards): p ranks each starting a BLAS pool would oversubscribe the cores.
    OpenMP keeps its thread count per thread, so each rank's thread sets it again.
    """
    with threadpool_limits(limits=threads):
        return _run_threads(fn, world_size, args, kwargs, timeout, debug, threads)


def _run_threads(fn, world_size, args, kwargs, timeout, debug, pool_threads):
    world = ThreadWorld(world_size)
    results, failures, lock = [None] * world_size, [], threading.Lock()
    snapshot = {}

    def main(rank):
        comm = ThreadCommunicator(world, rank, timeout, debug)
        try:
            with threadpool_limits(limits=pool_threads, user_api="openmp"):
                results[rank] = fn(comm, *args, **kwargs)
            world.status[rank] = "finished"
        except Aborted:
            world.status[rank] = "aborted"
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the caller
            with lock:
                if not failures:
                    snapshot.update(enumerate(world.status))
                failures.append((rank, exc, traceback.format_exc()))
            world.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"minidist-rank-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, t in enumerate(threads) if t.is_alive()]
    if failures:
        rank, exc, tb = failures[0]
        if isinstance(exc, CommTimeout):
            pending = {r: s for r, s in snapshot.items() if s != "finished"}
            raise CommTimeout(f"rank {rank} waited {timeout} s for a message", pending)
        raise remote_failure(rank, type(exc).__name__, str(exc), tb) from exc
    if alive:
        pending = {r: world.status[r] for r in alive}
        world.abort()
        raise CommTimeout(f"{len(alive)} of {world_size} ranks did not finish within "
                          f"{timeout} s", pending)
    return results
