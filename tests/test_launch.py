"""The launcher: start methods, functions from notebooks, BLAS limits, and failures that end
quickly with the right error, leaving no process and no shared memory behind."""

import os
import signal
import time

import numpy as np
import pytest

from minidist import CommTimeout, WorkerError, run

NOTEBOOK_CELL = '''
import numpy as np

def train_step(comm, scale):
    grad = np.full(4, float(comm.rank + 1) * scale)
    return comm.all_reduce(grad, op="mean")
'''


def notebook_function():
    """A function as a notebook cell defines it: in __main__, not importable by a child."""
    namespace = {"__name__": "__main__"}
    exec(compile(NOTEBOOK_CELL, "<notebook cell>", "exec"), namespace)
    return namespace["train_step"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver", "fork"])
def test_notebook_functions_run_under_every_start_method(start_method, leaves_nothing_behind):
    results = run(notebook_function(), 3, args=(2.0,), backend="process",
                  start_method=start_method, timeout=60)
    for result in results:
        np.testing.assert_array_equal(result, np.full(4, 4.0))
    closure_scale = 10
    lambda_results = run(lambda comm: comm.rank * closure_scale, 2, start_method=start_method)
    assert lambda_results == [0, 10]


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_each_rank_limits_blas_threads_to_one(backend, leaves_nothing_behind):
    def blas_threads(comm):
        from threadpoolctl import threadpool_info

        return [pool["num_threads"] for pool in threadpool_info()]

    import sklearn.ensemble  # noqa: F401 - loads an OpenMP pool, whose limit is per thread

    for threads in run(blas_threads, 2, backend=backend):
        assert threads and set(threads) == {1}
    assert run(blas_threads, 1, backend=backend, threads_per_rank=2)[0][0] == min(2, os.cpu_count())


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_raising_rank_stops_the_run_quickly(backend, leaves_nothing_behind, fault_matrix):
    def fails_on_rank_2(comm):
        if comm.rank == 2:
            raise KeyError("missing shard")
        comm.all_reduce(np.ones(3))  # the others block here until stopped

    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 2 failed: KeyError") as info:
        run(fails_on_rank_2, 4, backend=backend, timeout=30)
    seconds = time.monotonic() - start
    assert seconds < 5
    assert info.value.rank == 2 and info.value.exc_type == "KeyError"
    assert "fails_on_rank_2" in info.value.remote_traceback
    fault_matrix.record("rank 2 of 4 raises KeyError while the others wait in all_reduce", backend,
                        "WorkerError naming rank 2, the exception and its traceback", seconds)


@pytest.mark.fault
@pytest.mark.parametrize("how, match", [
    (lambda: os._exit(3), "exited with code 3"),
    (lambda: os.kill(os.getpid(), signal.SIGKILL), "killed by signal SIGKILL"),
], ids=["exit3", "sigkill"])
def test_a_dying_rank_is_named(how, match, leaves_nothing_behind, fault_matrix):
    def dies_on_rank_1(comm):
        if comm.rank == 1:
            how()
        comm.barrier()

    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"rank 1 failed: .*{match}") as info:
        run(dies_on_rank_1, 3, backend="process", timeout=30)
    seconds = time.monotonic() - start
    assert seconds < 5
    assert info.value.rank == 1
    fault = "calls os._exit(3)" if "code 3" in match else "is killed by SIGKILL"
    fault_matrix.record(f"rank 1 of 3 {fault} while the others wait in a barrier", "process",
                        f"WorkerError naming rank 1: {match}", seconds)


@pytest.mark.fault
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_rank_that_never_joins_times_out_naming_who_waits_where(backend, leaves_nothing_behind,
                                                                  fault_matrix):
    def rank_1_skips(comm):
        if comm.rank != 1:
            comm.all_reduce(np.ones(3), algorithm="ring")

    start = time.monotonic()
    with pytest.raises(CommTimeout, match=r"rank 0: all_reduce: recv from rank") as info:
        run(rank_1_skips, 3, backend=backend, timeout=2)
    seconds = time.monotonic() - start
    assert 1.5 < seconds < 8
    assert isinstance(info.value, TimeoutError) and 1 not in info.value.pending
    fault_matrix.record("rank 1 of 3 never joins a ring all_reduce (timeout=2 s)", backend,
                        "CommTimeout naming ranks 0 and 2 and the recv each waits in", seconds)


@pytest.mark.fault
def test_a_stuck_rank_times_out(leaves_nothing_behind, fault_matrix):
    def stuck(comm):
        if comm.rank == 0:
            time.sleep(60)

    start = time.monotonic()
    with pytest.raises(CommTimeout, match="1 of 2 ranks did not finish within 1.5 s") as info:
        run(stuck, 2, backend="process", timeout=1.5)
    assert list(info.value.pending) == [0]
    fault_matrix.record("rank 0 of 2 computes for 60 s (timeout=1.5 s)", "process",
                        "CommTimeout naming rank 0, running user code", time.monotonic() - start)


def test_results_come_back_in_rank_order_with_any_picklable_value(leaves_nothing_behind):
    def result(comm):
        return {"rank": comm.rank, "array": np.arange(comm.rank + 1), "none": None}

    out = run(result, 4, backend="process")
    assert [r["rank"] for r in out] == [0, 1, 2, 3]
    np.testing.assert_array_equal(out[3]["array"], [0, 1, 2, 3])


def test_a_failed_process_run_leaves_no_view_of_unmapped_memory_in_its_traceback(
        leaves_nothing_behind):
    """The launcher unmaps its control segment while the error propagates: every local of every
    frame of the traceback can still be printed, and the rank-status reader the supervisor kept
    fails cleanly (a numpy view of the unmapped segment would crash the interpreter instead)."""
    def fails(comm):
        raise ValueError("rank failure")

    with pytest.raises(WorkerError) as caught:
        run(fails, 2, backend="process")
    tb, readers = caught.value.__traceback__, []
    while tb is not None:
        local = dict(tb.tb_frame.f_locals)
        for value in local.values():
            repr(value)
        if tb.tb_frame.f_code.co_name == "_supervise":
            readers.append(local["status"])
        tb = tb.tb_next
    assert len(readers) == 1
    with pytest.raises(ValueError, match="released"):
        readers[0]()
