"""Ranks that pass one collective different dtypes, shapes or arguments get a
CollectiveMismatchError naming both ranks and what each passed, never wrong numbers, on every
backend and path (messages, shared memory, MPI); and a CommTimeout says what each unfinished
rank is really doing, "running user code" included."""

import os
import time

import numpy as np
import pytest
from test_mpi import MPIEXEC

from minidist import CollectiveMismatchError, CommTimeout, run

# case: (rank 0's call, what the error quotes for it, rank 1's call, what it quotes for that,
#        the ranks that receive something in the call and so must see the mismatch)
CASES = {
    "all_reduce of float64 vs int64, 10 elements (native small)": (
        lambda c: c.all_reduce(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.all_reduce(np.ones(10, np.int64)), "int64 array of shape (10,)", {0, 1}),
    "all_reduce of float32 vs int32, 100 000 elements (native large)": (
        lambda c: c.all_reduce(np.ones(100_000, np.float32)), "float32 array of shape (100000,)",
        lambda c: c.all_reduce(np.ones(100_000, np.int32)), "int32 array of shape (100000,)",
        {0, 1}),
    "broadcast of 4 float64 into 8 float32 (native)": (
        lambda c: c.broadcast(np.arange(4.0)), "float64 array of shape (4,)",
        lambda c: c.broadcast(np.zeros(8, np.float32)), "float32 array of shape (8,)", {0, 1}),
    "all_reduce of shape (10,) vs (2, 5) (native)": (
        lambda c: c.all_reduce(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.all_reduce(np.ones((2, 5))), "float64 array of shape (2, 5)", {0, 1}),
    "all_reduce of shape (10,) vs (2, 5) (ring, messages)": (
        lambda c: c.all_reduce(np.ones(10), algorithm="ring"), "float64 array of shape (10,)",
        lambda c: c.all_reduce(np.ones((2, 5)), algorithm="ring"),
        "float64 array of shape (2, 5)", {0, 1}),
    "all_reduce with op sum vs max (native)": (
        lambda c: c.all_reduce(np.ones(3)), "all_reduce(op=sum",
        lambda c: c.all_reduce(np.ones(3), op="max"), "all_reduce(op=max", {0, 1}),
    "broadcast of 4 float64 into 8 float32 (tree, messages)": (
        lambda c: c.broadcast(np.arange(4.0), algorithm="tree"), "float64 array of shape (4,)",
        lambda c: c.broadcast(np.zeros(8, np.float32), algorithm="tree"),
        "float32 array of shape (8,)", {1}),
    "reduce of shape (10,) vs (2, 5)": (
        lambda c: c.reduce(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.reduce(np.ones((2, 5))), "float64 array of shape (2, 5)", {0}),
    "all_gather of shape (10,) vs (2, 5)": (
        lambda c: c.all_gather(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.all_gather(np.ones((2, 5))), "float64 array of shape (2, 5)", {0, 1}),
    "reduce_scatter of float64 vs int64": (
        lambda c: c.reduce_scatter(np.ones(4)), "float64 array of shape (4,)",
        lambda c: c.reduce_scatter(np.ones(4, np.int64)), "int64 array of shape (4,)", {0, 1}),
    "gather of shape (10,) vs (2, 5)": (
        lambda c: c.gather(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.gather(np.ones((2, 5))), "float64 array of shape (2, 5)", {0}),
    "scatter on rank 0, broadcast (tree) on rank 1": (
        lambda c: c.scatter(np.ones((2, 4))), "scatter(src=0)",
        lambda c: c.broadcast(np.zeros(4), algorithm="tree"), "broadcast(src=0", {1}),
    "all_reduce in a split group of float64 vs int64 (group, ring)": (
        lambda c: c.split(0).all_reduce(np.ones(3)), "float64 array of shape (3,)",
        lambda c: c.split(0).all_reduce(np.ones(3, np.int64)), "int64 array of shape (3,)",
        {0, 1}),
    "barrier on rank 0, all_reduce on rank 1 (native)": (
        lambda c: c.barrier(), "barrier(",
        lambda c: c.all_reduce(np.ones(1)), "all_reduce(", {0, 1}),
}


def _mismatched(comm, case, catch=False):
    """Rank r makes its call of `case`; with catch, returns the error it raised (or None)."""
    call = CASES[case][2 * comm.rank]
    try:
        call(comm)
    except CollectiveMismatchError as exc:
        if not catch:
            raise
        return str(exc)
    return None


def _check_names_both(text, case):
    _, mine, _, theirs, _ = CASES[case]
    assert "rank 0" in text and "rank 1" in text, text
    assert mine in text and theirs in text, text


@pytest.mark.fault
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_mismatched_collective_fails_naming_both_ranks(case, backend, fault_matrix):
    start = time.monotonic()
    with pytest.raises(CollectiveMismatchError) as caught:
        run(_mismatched, 2, args=(case,), backend=backend, timeout=30)
    seconds = time.monotonic() - start
    _check_names_both(str(caught.value), case)
    assert seconds < 30  # an error, not the run's timeout
    fault_matrix.record(f"ranks 0 and 1 disagree: {case}", backend,
                        "CollectiveMismatchError naming ranks 0 and 1 and what each passed",
                        seconds)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_every_rank_that_receives_a_mismatched_call_raises(backend):
    """Inside the ranks: each rank that receives anything in the call raises (none hangs, none
    computes with the other's bytes); a rank that only sends may return."""
    for case, (*_, detectors) in CASES.items():
        texts = run(_mismatched, 2, args=(case, True), backend=backend, timeout=30)
        for rank in detectors:
            assert texts[rank] is not None, (case, rank)
            _check_names_both(texts[rank], case)


MPI_CASES = [case for case in CASES if "native" in case or "ring" in case or "reduce of" in case]
MPI_CASES.remove("barrier on rank 0, all_reduce on rank 1 (native)")  # MPI has no native barrier


@pytest.mark.fault
@pytest.mark.timeout(120)
@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec")
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.parametrize("case", MPI_CASES)
def test_a_mismatched_collective_fails_under_mpi(case, fault_matrix):
    start = time.monotonic()
    with pytest.raises(CollectiveMismatchError) as caught:
        run(_mismatched, 2, args=(case,), backend="mpi", timeout=30)
    seconds = time.monotonic() - start
    _check_names_both(str(caught.value), case)
    assert seconds < 30 + 15  # mpiexec's start-up, then an error, not the run's timeout
    fault_matrix.record(f"ranks 0 and 1 disagree: {case}", "mpi (run starts mpiexec)",
                        "CollectiveMismatchError naming ranks 0 and 1 and what each passed",
                        seconds)


def test_the_same_call_in_different_words_is_no_mismatch():
    """np.int64 roots, "auto" for "native", uneven ring chunks: all the same call."""
    def same(comm):
        src = np.int64(1) if comm.rank else 1
        x = comm.broadcast(np.arange(7.0) * comm.rank, src, "auto" if comm.rank else "native")
        return x, comm.all_reduce(np.ones(7), algorithm="ring"), comm.reduce_scatter(np.ones(7))

    for backend in ["thread", "process"]:
        for rank, (x, y, z) in enumerate(run(same, 3, backend=backend, timeout=30)):
            assert np.array_equal(x, np.arange(7.0)) and np.array_equal(y, np.full(7, 3.0))
            assert np.array_equal(z, np.full(3 if rank == 0 else 2, 3.0))


def test_long_calls_stay_distinct():
    """A call's text is cut to the CALL_BYTES its header carries, but ends with its digest."""
    from minidist.comm.calls import CALL_BYTES, describe

    a, b = (describe("all_gather", np.dtype(np.complex128), (10**15,) * 8 + (last,),
                     (("algorithm", "ring"),)) for last in (1, 2))
    assert len(a.raw) == len(b.raw) == CALL_BYTES and a.raw != b.raw and a.digest != b.digest


# ---- what a CommTimeout says each rank is doing -------------------------------------------------
def _exchange_then_compute(comm, flag):
    """Ranks 0 and 1 swap a message; then rank 1 computes (until `flag` exists, which is after
    the run timed out) while rank 0 waits for it in a barrier."""
    peer = 1 - comm.rank
    if comm.rank == 0:
        comm.send(np.ones(3), peer)
        comm.recv(peer)
        comm.barrier()
    else:
        comm.recv(peer)
        comm.send(np.ones(3), peer)
        while not os.path.exists(flag):
            time.sleep(0.01)


@pytest.mark.fault
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_timeout_says_which_rank_is_running_user_code(backend, tmp_path, fault_matrix):
    flag = tmp_path / "stop"
    start = time.monotonic()
    try:
        with pytest.raises(CommTimeout) as caught:
            run(_exchange_then_compute, 2, args=(str(flag),), backend=backend, timeout=3)
        seconds = time.monotonic() - start
    finally:
        flag.touch()  # the thread backend's rank 1 cannot be killed: it stops computing now
    pending = caught.value.pending
    assert set(pending) == {0, 1}, pending
    assert pending[1].startswith("running user code since "), pending  # not "recv ..."
    assert pending[1].endswith(", after send to rank 0"), pending
    assert "barrier" in pending[0], pending
    assert "rank 1: running user code since" in str(caught.value)
    assert seconds < 3 + 15
    fault_matrix.record("rank 1 computes after a send/recv while rank 0 waits in a barrier",
                        backend, "CommTimeout: rank 0 in barrier, rank 1 running user code since "
                        "the time its send returned", seconds)
