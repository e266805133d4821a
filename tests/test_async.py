"""Async collectives (async_op=True) on every backend: results equal the blocking ops' and numpy's
exactly (integer-valued inputs), several in flight complete in issue order, blocking calls wait
for them, stats are the blocking ops' to the byte, and failures end in the right error, in time,
leaving no thread behind.

Each launch checks many things inside the ranks and returns what came out wrong (or the facts
to assert), to keep launches (an mpiexec job costs seconds) few.
"""

import contextlib
import importlib.util
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minidist import CollectiveMismatchError, CommTimeout, WorkerError, run
from minidist.data import shard_bounds

HAS_MPI = importlib.util.find_spec("mpi4py") is not None and bool(
    (Path(sys.executable).parent / "mpiexec").exists() or shutil.which("mpiexec"))
MPI = pytest.param("mpi", marks=pytest.mark.skipif(not HAS_MPI, reason="needs mpi4py, mpiexec"))
BACKENDS = ["thread", "process", MPI]
CASES = [("thread", p) for p in (1, 2, 3, 4)] + [("process", p) for p in (1, 2, 3)] + \
    [pytest.param("mpi", p, marks=MPI.marks) for p in (2, 3)]


def data(rank, n, dtype):
    """Rank `rank`'s input: integers, different on every rank (sums are exact)."""
    return (np.arange(n) % 97 + 13 * rank - 50).astype(dtype)


def ops(comm, n, dtype):
    """(name, issue(async_op) -> result or Work, numpy's answer) for each async collective."""
    p, r = comm.world_size, comm.rank
    stack = np.stack([data(s, n, dtype) for s in range(p)])
    lo, hi = shard_bounds(n, r, p)
    cases = [(f"all_reduce {how}", lambda a, how=how: comm.all_reduce(
        stack[r].copy(), "sum", how, async_op=a), stack.sum(0)) for how in ("auto", "ring")]
    cases += [(f"broadcast from {root}", lambda a, root=root: comm.broadcast(
        stack[r].copy(), root, async_op=a), stack[root]) for root in range(p)]
    cases.append(("all_gather", lambda a: comm.all_gather(stack[r], async_op=a), stack))
    cases.append(("reduce_scatter", lambda a: comm.reduce_scatter(stack[r], async_op=a),
                  stack.sum(0)[lo:hi]))
    return cases


def exercise(comm):
    """Runs in every rank; returns what came out wrong."""
    bad = []

    def expect(what, got, want):
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
            bad.append(f"rank {comm.rank}: {what}")

    for dtype in (np.int64, np.float64):
        for name, issue, want in ops(comm, 1001, dtype):
            expect(f"blocking {name} {np.dtype(dtype)}", issue(False), want)
            work = issue(True)
            expect(f"async {name} {np.dtype(dtype)}", work.wait(), want)
            if not work.issued <= work.started <= work.finished or work.name != name.split()[0]:
                bad.append(f"rank {comm.rank}: stamps or name of {name}: {work!r}")
    # five buckets in flight at once, waited for in reverse order; issue order is finish order
    p, r = comm.world_size, comm.rank
    buckets = [data(r, 300, np.float64) * (k + 1) for k in range(5)]
    works = [comm.all_reduce(b, async_op=True) for b in buckets]
    for k in reversed(range(5)):
        expect(f"bucket {k}", works[k].wait(), sum(data(s, 300, np.float64) for s in range(p))
               * (k + 1))
    if any(a.finished > b.started for a, b in zip(works, works[1:], strict=False)):
        bad.append(f"rank {r}: buckets did not run one after another in issue order")
    # a blocking collective runs after the pending ops, also those issued on a sub-group: three
    # all-reduces of one array, x -> T (the sum over ranks) -> p·T -> p²·T, in that order
    group = comm.split(0)
    x = data(r, 50, np.int64)
    first, second = comm.all_reduce(x, async_op=True), group.all_reduce(x, async_op=True)
    expect("blocking all_reduce after async ones", comm.all_reduce(x),
           sum(data(s, 50, np.int64) for s in range(p)) * p * p)
    if not (first.is_completed() and second.is_completed()) or first.finished > second.started:
        bad.append(f"rank {r}: the blocking call did not wait for the async ops in order")
    # stats: the same ops, async, count what the blocking ones count, to the byte
    counts = []
    for async_op in (False, True):
        comm.stats.reset()
        results = [issue(async_op) for _, issue, _ in ops(comm, 77, np.float64)]
        if async_op:
            comm.wait_pending()
            results = [w.wait() for w in results]
        counts.append({op: (s.bytes_sent, s.bytes_received, s.messages, s.calls)
                       for op, s in comm.stats.ops.items()})
    if counts[0] != counts[1]:
        bad.append(f"rank {r}: stats blocking {counts[0]} != async {counts[1]}")
    return bad


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend, world_size", CASES)
def test_async_ops_equal_blocking_ones_and_complete_in_order(backend, world_size):
    failures = run(exercise, world_size, backend=backend, timeout=40)
    assert [f for rank_failures in failures for f in rank_failures] == []


def _go_when_told(comm, folder):
    """Rank 0 issues an all_reduce that rank 1 joins only once rank 0 has written a file (no
    message: a send would wait for rank 0's pending op): until then it cannot complete."""
    go = Path(folder) / "go"
    if comm.rank == 0:
        work = comm.all_reduce(np.arange(4.0), async_op=True)
        before = work.is_completed()
        try:
            work.wait(timeout=0.5)
            message = None
        except CommTimeout as exc:
            message = str(exc)
        go.write_text("go")
        return before, message, work.wait().tolist(), work.is_completed()
    deadline = time.monotonic() + 20
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return comm.all_reduce(np.arange(4.0) * 2).tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_op_completes_only_once_the_peer_issues_it(backend, tmp_path):
    (before, message, result, after), peer = run(_go_when_told, 2, args=(str(tmp_path),),
                                                 backend=backend, timeout=30)
    assert before is False and after is True
    assert "rank 0 waited 0.5 s for async all_reduce #1, which has not completed" in message
    assert result == peer == [0.0, 3.0, 6.0, 9.0]  # the timed-out wait did not spoil the op


def _errors(comm):
    """Bad arguments raise at once; a mismatch raises from wait, then breaks the communicator."""
    x, said = np.zeros(4), {}
    if comm.backend == "mpi":  # an MPI started without threads cannot run a progress thread
        from minidist.comm import mpi
        real = mpi.MPI
        mpi.MPI = type("FakeMPI", (), {k: getattr(real, k) for k in dir(real) if "THREAD" in k})
        mpi.MPI.Query_thread = staticmethod(lambda: real.THREAD_FUNNELED)
        try:
            comm.all_reduce(x, async_op=True)
        except RuntimeError as exc:
            said["thread level"] = str(exc)
        finally:
            mpi.MPI = real
    for case, call in {"dtype": lambda: comm.all_reduce(x.astype(object), async_op=True),
                       "op": lambda: comm.reduce_scatter(x, op="prod", async_op=True),
                       "root": lambda: comm.broadcast(x, src=5, async_op=True),
                       "algorithm": lambda: comm.all_gather(x, "butterfly", async_op=True),
                       "array": lambda: comm.all_reduce([1.0], async_op=True)}.items():
        try:
            call()
        except ValueError as exc:
            said[case] = str(exc)
    said["issued"] = comm._queue.issued  # none of the bad calls was queued
    mismatched = comm.all_reduce(np.zeros(4 + comm.rank), async_op=True)
    later = comm.all_reduce(np.zeros(3), async_op=True)
    for name, call in [("mismatch", mismatched.wait), ("later", later.wait),
                       ("blocking", comm.barrier)]:
        try:
            call()
        except CollectiveMismatchError as exc:
            said[name] = str(exc)
    return said


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_at_once_and_a_mismatch_raises_from_wait(backend,
                                                                   leaves_nothing_behind):
    for rank, said in enumerate(run(_errors, 2, backend=backend, timeout=20)):
        assert "numeric dtype" in said["dtype"] and "unknown op 'prod'" in said["op"]
        assert "src must be a rank" in said["root"] and "'butterfly'" in said["algorithm"]
        assert "needs a numpy array" in said["array"] and said["issued"] == 0
        assert said["mismatch"].startswith(f"rank {rank} failed in async all_reduce #1: ")
        assert "float64 array of shape (4,)" in said["mismatch"] and "(5,)" in said["mismatch"]
        assert said["later"].startswith(f"rank {rank} could not run async all_reduce #2: "
                                        f"async all_reduce #1 failed before it")
        assert said["blocking"].startswith(f"rank {rank} could not run barrier: async "
                                           f"all_reduce #1 failed before it")
        if backend == "mpi":
            assert "THREAD_FUNNELED" in said["thread level"]


def _leave_pending(comm, how):
    x = data(comm.rank, 10, np.int64)
    if how == "mismatch":
        comm.all_reduce(np.zeros(3 + comm.rank), async_op=True)
    elif how != "absent" or comm.rank == 0:  # "absent": rank 1 never joins
        comm.all_reduce(x, async_op=True)
        comm.broadcast(x, src=1, async_op=True)
    return x  # fn returns before waiting: the launcher waits


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_that_returns_with_pending_ops_has_them_completed(backend, leaves_nothing_behind):
    results = run(_leave_pending, 2, args=("complete",), backend=backend, timeout=20)
    assert [x.tolist() for x in results] == [(data(0, 10, np.int64) +
                                             data(1, 10, np.int64)).tolist()] * 2
    with pytest.raises(CollectiveMismatchError, match="never waited for"):
        run(_leave_pending, 2, args=("mismatch",), backend=backend, timeout=20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_pending_op_that_a_peer_never_joins_times_out(backend, leaves_nothing_behind):
    start = time.monotonic()
    with pytest.raises(CommTimeout, match="rank 0"):
        run(_leave_pending, 2, args=("absent",), backend=backend, timeout=1)
    assert time.monotonic() - start < 1 + 15  # the run's timeout, and the launcher's grace


def _stuck_then(comm, how):
    """Rank 0's progress thread waits in an all_reduce that rank 1 never joins."""
    if comm.rank == 1:
        if how == "raise":
            raise KeyError("rank 1 gave up")
        time.sleep(0.3)
        return None
    work = comm.all_reduce(np.ones(3), async_op=True)
    if how == "raise":
        return work.wait()  # until the run is aborted
    deadline = time.monotonic() + 10
    while comm._queue.running is not work and time.monotonic() < deadline:
        time.sleep(0.001)  # until the progress thread runs the op (it then waits in the transport)
    start = time.monotonic()
    comm._end_async(wait=False)  # what a failing rank's launcher does
    seconds = time.monotonic() - start
    try:
        work.wait(timeout=1)
    except RuntimeError as exc:
        return seconds, comm._queue.thread.is_alive(), str(exc)


@pytest.mark.timeout(60)
def test_an_aborted_thread_run_ends_promptly_and_leaves_no_thread():
    before = set(threading.enumerate())  # (another test's rank stuck in user code may linger)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 failed: KeyError"):
        run(_stuck_then, 2, args=("raise",), backend="thread", timeout=30)
    assert time.monotonic() - start < 15  # prompt: not the run's 30 s timeout
    for how in ("complete", "mismatch", "absent"):
        with pytest.raises((CommTimeout, CollectiveMismatchError)) if how != "complete" \
                else contextlib.nullcontext():
            run(_leave_pending, 2, args=(how,), backend="thread", timeout=1)
    run(exercise, 3, backend="thread", timeout=30)
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("minidist"):
            thread.join(5)  # a stopped thread may still be returning
    assert [t.name for t in set(threading.enumerate()) - before
            if t.name.startswith("minidist")] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", MPI])
def test_ending_a_rank_interrupts_its_progress_thread(backend, leaves_nothing_behind):
    seconds, alive, message = run(_stuck_then, 2, args=("interrupt",), backend=backend,
                                  timeout=20)[0]
    assert seconds < 10 and not alive  # stopped at once, not after the run's 20 s
    assert "rank 0 failed in async all_reduce #1" in message and "interrupted" in message
