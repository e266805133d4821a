"""Runs side by side in one process: two process-backend runs from two threads must not disturb
each other or the standard library, and a thread-backend run that failed must stop its ranks."""

import glob
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import rank_threads_left

from minidist import CommTimeout, run

TRIALS = 40  # the old patch of resource_tracker.register stuck in 6 to 13 of 50 trials

SIDE_BY_SIDE = f'''
import sys, threading, time
from multiprocessing import resource_tracker
from minidist import run

def all_reduce_shared(comm):
    a = comm.alloc(100_000)
    a[:] = comm.rank
    comm.all_reduce(a)
    return float(a[0])

sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
register, replaced, start = resource_tracker.register, 0, time.monotonic()
for trial in range({TRIALS}):
    results, gate = [], threading.Barrier(2)
    def one_run():
        gate.wait()
        results.append(run(all_reduce_shared, 2, backend="process", timeout=60))
    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [[1.0, 1.0]] * 2, results
    if resource_tracker.register is not register:
        replaced += 1
        resource_tracker.register = register
print(f"register replaced in {{replaced}} of {TRIALS} trials; {{time.monotonic() - start:.3f}} s")
'''


@pytest.mark.fault
def test_two_process_runs_from_two_threads_leave_the_resource_tracker_alone(fault_matrix):
    job = subprocess.Popen([sys.executable, "-c", SIDE_BY_SIDE], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:  # stderr is read to its end: the resource tracker's too, which outlives the job
        stdout, stderr = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    assert stdout.startswith(f"register replaced in 0 of {TRIALS} trials"), stdout
    for noise in ("resource_tracker", "leaked", "Traceback"):
        assert noise not in stderr, stderr
    assert glob.glob(f"/dev/shm/md{job.pid}_*") == []
    fault_matrix.record(f"two process-backend runs at once from two threads of one process "
                        f"({TRIALS} trials)", "process", "both succeed; "
                        "resource_tracker.register untouched; no leak warning; no /dev/shm "
                        "segment left", float(stdout.rsplit(";", 1)[1].split()[0]))


@pytest.mark.fault
def test_after_a_comm_timeout_no_rank_thread_keeps_running(fault_matrix):
    """Ranks 0 and 2 wait (with long timeouts of their own) for messages rank 1 never sends;
    rank 1 keeps sending others. The run's CommTimeout must end all three threads."""
    before = set(threading.enumerate())
    ended = []

    def rank_1_is_busy(comm):
        try:
            if comm.rank == 0:
                comm.recv(1, timeout=600)
            elif comm.rank == 1:
                while True:
                    comm.send(np.ones(1), 0, tag=7)
                    time.sleep(0.005)
            else:
                comm.recv(1, tag=3, timeout=600)
        finally:
            ended.append(comm.rank)

    start = time.monotonic()
    with pytest.raises(CommTimeout, match="3 of 3 ranks did not finish within 2 s") as info:
        run(rank_1_is_busy, 3, backend="thread", timeout=2)
    seconds = time.monotonic() - start
    assert "recv from rank 1" in info.value.pending[0]
    assert "send to rank 0" in info.value.pending[1]
    assert 1.5 < seconds < 30
    assert rank_threads_left(before) == []
    assert sorted(ended) == [0, 1, 2]  # rank 2's recv ended too
    fault_matrix.record("ranks 0 and 2 wait for messages rank 1 never sends, while rank 1 "
                        "keeps sending others", "thread", "CommTimeout naming each rank's "
                        "operation; then every rank thread ends (the busy sender and the ranks "
                        "blocked in recv included)", seconds)
