"""MPI failures, both ways of starting: run() from a plain process (it starts mpiexec itself) and
a script under `mpiexec -n 3` (run here in a subprocess). A rank that raises makes every rank
raise WorkerError naming it; a rank that dies is named whenever MPI can tell which; nothing is
left behind: no process, no MPICH shared memory. Each test adds its row to the fault matrix.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_mpi import MPIEXEC, pytestmark  # noqa: F401 (pytestmark: the skip without MPI)

from minidist import WorkerError, run

WORLD, TIMEOUT = 3, 5


def _fail(comm, how):
    """Rank 1 fails as `how` says; the others wait for it in an all-reduce."""
    if comm.rank == 1:
        if how == "raise":
            raise KeyError("rank 1 lost its key")
        if how.startswith("exit"):
            os._exit(int(how[4:]))
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    return comm.all_reduce(np.ones(4), algorithm="native")


FAULTS = {"raise": "rank 1 raises KeyError in fn", "exit3": "rank 1 calls os._exit(3) in fn",
          "exit0": "rank 1 calls os._exit(0) in fn", "kill": "rank 1 is killed by SIGKILL in fn"}


# ---- run() from a plain process: mpiexec started for us ------------------------------------------
@pytest.mark.fault
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, said, code, sig", [
    ("exit3", "exited with code 3", 3, None), ("exit0", "exited with code 0", 0, None),
    ("kill", "killed by SIGKILL", None, "SIGKILL")])
def test_a_rank_that_dies_is_named(how, said, code, sig, fault_matrix):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="while running fn, without raising") as caught:
        run(_fail, WORLD, args=(how,), backend="mpi", timeout=TIMEOUT)
    seconds, err = time.monotonic() - start, caught.value
    text = str(err)
    if "did not say how" not in text:  # (once in a while hydra's proxy dies in the clean-up)
        assert said in text and (err.exitcode, err.signal) == (code, sig), text
    if how == "kill" and err.rank is None:  # MPICH SIGKILLs the others at once: if they were
        together = re.search(r"\(one of ranks \[([\d, ]+)\]\)", text)  # seen dead together,
        assert together and 1 in map(int, together.group(1).split(",")), text  # none named
    else:
        assert err.rank == 1 and text.startswith("rank 1 failed: "), text
    assert seconds < TIMEOUT + 15
    fault_matrix.record(FAULTS[how], "mpi (run starts mpiexec)",
                        f"WorkerError naming rank 1: {said}" +
                        (" (or 'one of ranks [...]' if seen dead together)" if how == "kill"
                         else ""), seconds)


# ---- a script under `mpiexec -n 3` -------------------------------------------------------------
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from mpi4py import MPI
from minidist import run
from test_mpi_faults import _fail
outdir, how = sys.argv[1], sys.argv[2]
rank = MPI.COMM_WORLD.rank
try:
    run(_fail, {world}, args=(how,), backend="mpi", timeout={timeout})
    outcome = {{"returned": True}}
except Exception as e:
    outcome = {{"type": type(e).__name__, "rank": e.rank, "exc_type": e.exc_type,
               "message": str(e)}}
    raise
finally:
    with open(f"{{outdir}}/rank-{{rank}}.json", "w") as out:
        json.dump(outcome, out)
"""


def _processes(needle):
    """Pids of the processes whose command line holds needle."""
    found = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if needle.encode() in Path(cmdline).read_bytes():
                found.add(cmdline)
        except OSError:
            pass
    return found


def _under_mpiexec(tmp_path, how, attempt=0):
    """Run the script under mpiexec -n 3: (return code, stderr, seconds, each rank's outcome),
    having checked that no rank and no watcher (minidist/comm/mpi_watch.py) is left."""
    script, outdir = tmp_path / "script.py", tmp_path / f"{how}-{attempt}"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), world=WORLD,
                                    timeout=TIMEOUT))
    outdir.mkdir()
    watchers = _processes("mpi_watch.py")
    start = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", str(WORLD), sys.executable, str(script), str(outdir),
                           how], capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 5
    while (_processes(str(script)) or _processes("mpi_watch.py") - watchers) and \
            time.monotonic() < deadline:
        time.sleep(0.05)  # killed ranks are reaped by init, a moment later
    assert _processes(str(script)) == set() and _processes("mpi_watch.py") - watchers == set()
    outcomes = {int(p.stem.split("-")[1]): json.loads(p.read_text())
                for p in outdir.glob("rank-*.json")}
    return done.returncode, done.stderr, seconds, outcomes


@pytest.mark.fault
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.timeout(90)
def test_under_mpiexec_a_rank_that_raises_makes_every_rank_raise(tmp_path, fault_matrix):
    for attempt in range(3):  # every time (it used to return None on the failed rank, at times)
        rc, stderr, seconds, outcomes = _under_mpiexec(tmp_path, "raise", attempt)
        assert rc == 1, stderr[-3000:]
        assert sorted(outcomes) == list(range(WORLD)), stderr[-3000:]
        for rank, outcome in outcomes.items():
            assert outcome["type"] == "WorkerError", (rank, outcome)
            assert (outcome["rank"], outcome["exc_type"]) == (1, "KeyError"), (rank, outcome)
            assert outcome["message"].startswith("rank 1 failed: KeyError: 'rank 1 lost its key'")
            assert "--- traceback of rank 1 ---" in outcome["message"]
        assert "minidist: rank 1 failed: KeyError" in stderr
        assert seconds < TIMEOUT + 25
    fault_matrix.record(FAULTS["raise"], "mpi (script under mpiexec -n 3)",
                        "WorkerError naming rank 1 and its traceback on every rank, 3 runs of 3; "
                        "mpiexec exits with 1", seconds)


@pytest.mark.fault
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, said", [("exit3", "exited with code 3"),
                                       ("exit0", "exited with code 0"), ("kill", None)])
def test_under_mpiexec_a_rank_that_dies_ends_the_job_and_leaves_nothing(
        how, said, tmp_path, fault_matrix):
    rc, stderr, seconds, outcomes = _under_mpiexec(tmp_path, how)
    assert outcomes == {}, outcomes  # no rank carried on: mpiexec killed them all
    if how != "exit0":  # (an os._exit(0) can end the job with 0: mpiexec takes the first status)
        assert rc != 0
    told = [line for line in stderr.splitlines() if line.startswith("minidist: rank")]
    # MPICH SIGKILLs the other ranks at once, so no rank is left to tell; the rank's watcher
    # tells if the kernel still shows its exit status when it looks (a race it often loses),
    # and never names a rank that MPI killed
    allowed = [[]] + [[f"minidist: rank 1 {said} inside run(), without raising; MPI then ended "
                        f"the job"]] * bool(said)
    assert told in allowed, stderr[-3000:]
    assert seconds < TIMEOUT + 25
    named = ("rank 1 named on stderr if its exit status could still be read" if said else
             "no rank named: MPI cannot tell which one died")
    fault_matrix.record(FAULTS[how], "mpi (script under mpiexec -n 3)",
                        f"the job ends (mpiexec exits with {rc}), no MPICH shared memory left; "
                        f"{named}", seconds)
