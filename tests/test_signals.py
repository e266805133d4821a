"""Signals during a run: SIGTERM to the caller of a process-backend run (what a batch scheduler or
a Jupyter kernel shutdown sends) and Ctrl-C during a thread-backend run must stop every rank and
free every shared-memory segment, and leave the caller's signal handlers as they were."""

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import rank_threads_left

from minidist import run

JOB = '''
import os, signal, sys
from pathlib import Path
import numpy as np
from minidist import run

out = Path(sys.argv[1])

def publish(name, text):  # whole or not at all: the test polls for these files
    (out / f"{name}.tmp").write_text(text)
    os.replace(out / f"{name}.tmp", out / name)

if sys.argv[2] == "handler":  # a handler of the job's own: it must still be called
    def on_term(signum, frame):
        publish("handled", "yes")
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)

def train_forever(comm):
    publish(f"rank{comm.rank}.pid", str(os.getpid()))
    comm.barrier()
    if comm.rank == 0:
        publish("ready", "every rank is training")
    while True:
        comm.all_reduce(np.ones(4))

def push_forever(client):  # a parameter-server worker
    publish(f"rank{client.rank}.pid", str(os.getpid()))
    client.pull()
    client.push(np.ones(client.n))
    client.pull()  # BSP: returns once every worker has pushed clock 0, so both pids are out
    if client.rank == 0:
        publish("ready", "every worker is training")
    while True:
        client.push(np.ones(client.n))
        client.pull()

if __name__ == "__main__":  # spawn imports this file again in each rank
    if sys.argv[4] == "ps":
        from minidist import ps
        ps.run(push_forever, 2, np.zeros(8), timeout=120, start_method=sys.argv[3])
    else:
        run(train_forever, 2, backend="process", timeout=120, start_method=sys.argv[3])
'''


def wait_for(path, proc, seconds):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the job ended early with code {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds} s"
        time.sleep(0.02)


def running(pid):
    """True while `pid` exists and is not a zombie (a dead process nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in "ZX"


@pytest.mark.fault
@pytest.mark.parametrize("previous, returncode, start_method, launcher", [
    ("default", -signal.SIGTERM, "fork", "run"), ("handler", 7, "fork", "run"),
    ("default", -signal.SIGTERM, "spawn", "run"), ("default", -signal.SIGTERM, "fork", "ps"),
])
def test_sigterm_to_the_caller_stops_the_ranks_and_frees_shared_memory(
        previous, returncode, start_method, launcher, tmp_path, fault_matrix):
    (tmp_path / "job.py").write_text(JOB)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        job = subprocess.Popen([sys.executable, str(tmp_path / "job.py"), str(tmp_path),
                                previous, start_method, launcher], stderr=stderr)
    pids = []
    try:
        wait_for(tmp_path / "ready", job, 90)
        for r in range(2):  # "ready" already implies them; waiting too costs nothing
            wait_for(tmp_path / f"rank{r}.pid", job, 30)
        pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(2)]
        start = time.monotonic()
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == returncode, (tmp_path / "stderr.txt").read_text()
        seconds = time.monotonic() - start
        assert seconds < 20
        assert [pid for pid in pids if running(pid)] == []  # reaped before the job exited
        assert glob.glob(f"/dev/shm/md{job.pid}_*") == []  # the _ctl segment included
        assert (tmp_path / "handled").exists() == (previous == "handler")
        assert "leaked" not in (tmp_path / "stderr.txt").read_text()  # spawn's named semaphores
    finally:
        for pid in [job.pid, *pids]:  # whatever a failed assert left running
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        job.wait(10)
        for path in glob.glob(f"/dev/shm/md{job.pid}_*"):
            os.unlink(path)
    handler, outcome = ("the default", "the job ends by SIGTERM") if previous == "default" \
        else ("its own", "the job's own handler runs (sys.exit(7))")
    what = "2 ranks train" if launcher == "run" else "a parameter server and 2 workers train"
    fault_matrix.record(f"SIGTERM to the caller ({handler} SIGTERM handler, {start_method}) "
                        f"while {what}", "process", f"{outcome} after every process is stopped "
                        "and reaped; no /dev/shm segment left", seconds)


def test_the_sigterm_handler_is_set_only_while_a_run_is_in_progress(tmp_path,
                                                                    leaves_nothing_behind):
    before = signal.getsignal(signal.SIGTERM)
    ready, go, seen = tmp_path / "ready", tmp_path / "go", []

    def watch():  # the caller's handler while rank 0 waits (for at most 60 s) for "go"
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(signal.getsignal(signal.SIGTERM))
        go.write_text("go")

    def wait_for_go(comm):
        if comm.rank == 0:
            ready.write_text("ready")
            deadline = time.monotonic() + 60
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        comm.barrier()

    watcher = threading.Thread(target=watch)
    watcher.start()
    run(wait_for_go, 2, backend="process", timeout=90)
    watcher.join(60)
    assert seen and seen[0] not in (before, signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.fault
def test_ctrl_c_stops_every_rank_thread(fault_matrix):
    """Ranks 0 and 1 keep exchanging messages, rank 2 waits for one that never comes: Ctrl-C in
    the caller must end all three threads, not only the caller's wait."""
    before = set(threading.enumerate())
    started, ended = threading.Semaphore(0), []

    def train_or_wait(comm):
        started.release()
        try:
            if comm.rank == 2:
                comm.recv(0, tag=5, timeout=600)
            while True:
                comm.send(np.ones(8), 1 - comm.rank)
                comm.recv(1 - comm.rank)
        finally:
            ended.append(comm.rank)

    def interrupt():
        if all(started.acquire(timeout=60) for _ in range(3)):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # Python's own Ctrl-C handler, as in a terminal or a Jupyter kernel: a process started in
    # the background by a non-interactive shell (a CI runner) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    helper = threading.Thread(target=interrupt)
    try:
        helper.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run(train_or_wait, 3, backend="thread", timeout=120)
        seconds = time.monotonic() - start
        helper.join(10)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rank_threads_left(before) == []
    assert sorted(ended) == [0, 1, 2]  # rank 2's recv ended too
    assert seconds < 30
    fault_matrix.record("Ctrl-C (SIGINT) in the caller while 2 ranks exchange messages and one "
                        "waits in recv", "thread", "KeyboardInterrupt; every rank thread ends, "
                        "the one blocked in recv included", seconds)


def test_a_rank_terminated_before_it_reset_the_handler_just_ends():
    """A fork inherits the launcher's SIGTERM handler until _rank_main resets it, and _stop
    terminates ranks that may have started a moment ago: in that window the rank must end by
    SIGTERM, not unwind into the launcher's frames (it once joined its siblings from there:
    'AssertionError: can only join a child process')."""
    import functools

    from minidist.comm.process_launcher import _unwind

    previous = signal.signal(signal.SIGTERM, functools.partial(_unwind, os.getpid()))
    try:
        pid = os.fork()
        if pid == 0:  # the child: as a rank just forked, the launcher's handler still set
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                os._exit(3)  # reached only if the handler returned or raised
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
