"""The MPI backend, run for real with mpiexec: every collective against numpy (exact: inputs are
integer-valued in every dtype), both ways of starting (run() from a plain process, and a script
under `mpiexec -n 4`), and failures that end in the right error leaving nothing behind.

Few mpiexec jobs, each checking many cases inside the ranks and returning what came out wrong.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minidist import CollectiveMismatchError, CommTimeout, WorkerError, run
from minidist.comm import ALGORITHMS
from minidist.data import shard_bounds

MPIEXEC = Path(sys.executable).parent / "mpiexec"
MPIEXEC = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec: pip install 'minidist[mpi]' (make test installs them)")

SIZES, DTYPES, BIG = [0, 1, 7, 1000], [np.float32, np.float64, np.int64], 2**20 + 3
TAGS = [0, 2**29 + 5, 2**30 - 1]  # MPICH's own tags stop below 2**29


def data(rank, n, dtype):
    """Rank `rank`'s input: integers in [−50, 150], different on every rank."""
    return (np.arange(n) % 97 + 13 * rank - 50).astype(dtype)


def reference(op, stack):
    return {"sum": stack.sum(0), "mean": stack.sum(0) / len(stack), "max": stack.max(0),
            "min": stack.min(0)}[op]


def exercise(comm, sizes, dtypes, big):
    """Runs in every rank; returns what came out wrong."""
    p, r, bad = comm.world_size, comm.rank, []

    def expect(what, got, want):
        if got is None or got.shape != want.shape or got.dtype != want.dtype \
                or not np.array_equal(got, want):
            bad.append(f"rank {r}: {what}")

    for n in sizes:
        for dtype in dtypes:
            stack = np.stack([data(s, n, dtype) for s in range(p)])
            mine, case = stack[r], f"n={n} {np.dtype(dtype)}"
            if p > 1:  # around the ring, three tags at once, received in reverse order
                for tag in TAGS:
                    comm.send(mine * (tag % 7), (r + 1) % p, tag)
                for tag in reversed(TAGS):
                    expect(f"recv tag {tag} {case}", comm.recv((r - 1) % p, tag),
                           stack[(r - 1) % p] * (tag % 7))
            ops = ["sum", "max", "min"] + ["mean"] * (np.dtype(dtype).kind == "f")
            for algorithm in ALGORITHMS:
                for op in ops:
                    expect(f"all_reduce {algorithm} {op} {case}",
                           comm.all_reduce(mine.copy(), op, algorithm), reference(op, stack))
            for root in range(p):
                for algorithm in ["tree", "native", "auto"]:
                    expect(f"broadcast {algorithm} root {root} {case}",
                           comm.broadcast(mine.copy(), root, algorithm), stack[root])
                for op in ops:
                    x = comm.reduce(mine.copy(), root, op)
                    expect(f"reduce {op} root {root} {case}", x,
                           reference(op, stack) if r == root else mine)
                got = comm.gather(mine, root)
                if r == root:
                    expect(f"gather root {root} {case}", got, stack)
                elif got is not None:
                    bad.append(f"rank {r}: gather root {root} returned data on a non-root rank")
                rows = stack * (root + 1)
                expect(f"scatter root {root} {case}",
                       comm.scatter(rows if r == root else None, root), rows[r])
            for algorithm in ["ring", "native", "auto"]:
                expect(f"all_gather {algorithm} {case}", comm.all_gather(mine, algorithm), stack)
            if n:
                lo, hi = shard_bounds(n, r, p)
                for op in ops:
                    expect(f"reduce_scatter {op} {case}", comm.reduce_scatter(mine.copy(), op),
                           reference(op, stack)[lo:hi])
            comm.barrier()
    # other shapes and dtypes on the native path (bool and complex max fall back to the ring)
    for x in [np.arange(12.0).reshape(3, 4) + r, np.array(r + 0.5), np.array([r % 2 == 0, False]),
              np.array([1 + 2j * r, -r])]:
        stack = comm.all_gather(x, "ring")
        expect(f"native all_reduce max {x.dtype} {x.shape}", comm.all_reduce(x.copy(), "max"),
               reference("max", stack))
        expect(f"native all_gather {x.dtype} {x.shape}", comm.all_gather(x), stack)
    # split: groups of even and odd ranks, ordered backwards; they reduce independently
    group = comm.split(r % 2, key=-r)
    members = [s for s in range(p - 1, -1, -1) if s % 2 == r % 2]
    expect("split", np.array([group.rank, group.world_size]),
           np.array([members.index(r), len(members)]))
    expect("split all_reduce", group.all_reduce(np.array([r])), np.array([sum(members)]))
    # stats: the native all-reduce counts the bytes the ring moves, exactly
    counts = []
    for algorithm in ["ring", "native"]:
        comm.stats.reset()
        comm.all_reduce(np.ones(1003), algorithm=algorithm)
        s = comm.stats["all_reduce"]
        counts.append(np.array([s.bytes_sent, s.bytes_received, s.messages, s.calls]))
    expect("native stats", counts[1], counts[0])
    if big:
        stack = np.stack([data(s, BIG, np.float64) for s in range(p)])
        for algorithm in ["ring", "native"]:
            expect(f"all_reduce {algorithm} n={BIG}",
                   comm.all_reduce(stack[r].copy(), algorithm=algorithm), stack.sum(0))
        if p > 1:
            comm.send(stack[r], (r + 1) % p, tag=2**30 - 1)
            expect(f"send/recv n={BIG}", comm.recv((r - 1) % p, tag=2**30 - 1), stack[r - 1])
    if p > 1:  # sent, never received: MPICH would crash in MPI_Finalize if it were left pending
        comm.send(np.ones(2**20), (r + 1) % p, tag=99)
    return bad


# ---- what a test may leave behind ---------------------------------------------------------------
# ---- run() from a plain process: mpiexec started for us ------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_every_collective_matches_numpy(world_size, leaves_no_mpi_job_behind):
    full = world_size <= 3  # 5 and 8 ranks on 2 cores: fewer sizes and dtypes
    failures = run(exercise, world_size, backend="mpi", timeout=100,
                   args=(SIZES if full else [0, 7], DTYPES if full else [np.int64], full))
    assert [f for rank_failures in failures for f in rank_failures] == []


@pytest.mark.timeout(60)
def test_lambdas_and_closures_ship_by_value(leaves_no_mpi_job_behind):
    scale = 3.0

    def step(comm):  # a closure, as in a notebook cell
        return comm.all_reduce(np.full(4, comm.rank * scale), op="mean")

    assert all(np.array_equal(x, np.full(4, 4.5)) for x in run(step, 4, backend="mpi"))
    assert run(lambda comm, k: comm.rank * k, 4, args=(2,), backend="mpi") == [0, 2, 4, 6]


# ---- a script under `mpiexec -n 4` ---------------------------------------------------------------
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from mpi4py import MPI
from minidist import run
from test_mpi import SIZES, exercise
import numpy as np
if {fail}:
    run(lambda comm: 1 / (comm.rank - 1), 4, backend="mpi")
failures = run(exercise, 4, args=(SIZES, [np.float32, np.float64, np.int64], True),
               backend="mpi", timeout=100)
results = run(lambda comm: comm.rank ** 2, 4, backend="mpi")
try:
    run(exercise, 3, backend="mpi")
except ValueError as e:
    mismatch = str(e)
with open(f"{{sys.argv[1]}}/rank-{{MPI.COMM_WORLD.rank}}.json", "w") as out:
    json.dump([sum(failures, []), results, mismatch], out)
"""


def _script(tmp_path, fail):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent), fail=fail))
    return subprocess.run([MPIEXEC, "-n", "4", sys.executable, str(path), str(tmp_path)],
                          capture_output=True, text=True, timeout=110)


@pytest.mark.timeout(120)
def test_a_script_under_mpiexec_gets_every_result_on_every_rank(tmp_path, leaves_no_mpi_job_behind):
    import json
    done = _script(tmp_path, fail=False)
    assert done.returncode == 0, done.stderr
    for rank in range(4):
        failures, results, mismatch = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert failures == [] and results == [0, 1, 4, 9]
        assert "world_size=3" in mismatch and "4 ranks" in mismatch


@pytest.mark.timeout(120)
def test_a_failing_rank_aborts_the_mpiexec_job(tmp_path, leaves_no_mpi_job_behind):
    done = _script(tmp_path, fail=True)
    assert done.returncode != 0
    assert "minidist: rank 1 failed" in done.stderr and "ZeroDivisionError" in done.stderr


# ---- failures end in the right error, in time, leaving nothing behind --------------------------
def _misbehave(comm, how):
    if comm.rank == 1:
        if how == "raise":
            raise KeyError("rank 1 lost its key")
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "absent":
            return "never joined"
        if how == "shape":
            return comm.all_reduce(np.zeros(5))
    return comm.all_reduce(np.ones(4), algorithm="native")


MISBEHAVIOUR = {"raise": "rank 1 of 3 raises KeyError", "exit": "rank 1 of 3 calls os._exit(3)",
                "kill": "rank 1 of 3 is killed by SIGKILL",
                "shape": "rank 1 passes another shape to all_reduce",
                "absent": "rank 1 of 3 skips an all_reduce (timeout=3 s)"}


@pytest.mark.fault
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, error, match", [
    ("raise", WorkerError, r"rank 1 failed: KeyError(.|\n)*--- traceback of rank 1(.|\n)*lost"),
    # under load MPICH's proxy may lose the exit codes (a broken pipe): it cannot say how
    ("exit", WorkerError, r"rank 1 failed: (exited with code 3|died \(mpiexec did not say how\))"),
    ("kill", WorkerError, r"rank 1 failed: (killed by SIGKILL|died \(mpiexec did not say how\))"),
    ("shape", CollectiveMismatchError, "float64 array of shape"),
    ("absent", CommTimeout, r"rank [02]: all_reduce"),
])
def test_failures_end_in_the_right_error(how, error, match, leaves_no_mpi_job_behind,
                                        fault_matrix):
    start = time.monotonic()
    with pytest.raises(error, match=match) as caught:
        run(_misbehave, 3, args=(how,), backend="mpi", timeout=3)
    seconds = time.monotonic() - start
    assert seconds < 3 + 10
    if how == "raise":
        assert caught.value.rank == 1 and caught.value.exc_type == "KeyError"
    if how == "absent":
        assert set(caught.value.pending) == {0, 2}  # rank 1 returned; 0 and 2 were stuck in:
        assert "all_reduce" in " ".join(caught.value.pending.values())
    fault_matrix.record(MISBEHAVIOUR[how], "mpi (run starts mpiexec)",
                        f"{error.__name__} matching {match!r}", seconds)


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_rank_stuck_outside_minidist_is_killed_at_the_timeout(leaves_no_mpi_job_behind,
                                                                fault_matrix):
    start = time.monotonic()
    with pytest.raises(CommTimeout, match="did not finish within 1 s"):
        run(lambda comm: time.sleep(60), 2, backend="mpi", timeout=1)
    seconds = time.monotonic() - start
    assert seconds < 1 + 5
    fault_matrix.record("both ranks compute for 60 s (timeout=1 s)", "mpi (run starts mpiexec)",
                        "CommTimeout; the ranks are killed", seconds)


# ---- pieces that need no mpiexec -----------------------------------------------------------------
def test_messages_pack_and_unpack_any_array():
    from minidist.comm.calls import describe
    from minidist.comm.mpi import _pack, _unpack
    for x in [np.arange(7, dtype=np.float32), np.zeros((0, 3)), np.array(2.5), np.ones((2, 3, 4)),
              np.array([True, False]), np.arange(3, dtype=">i4"), np.array([1 + 2j])]:
        call = describe("all_gather", x.dtype, x.shape, (("algorithm", "ring"),))
        wire, y, raw = _unpack(_pack(x, (2**31 - 1 << 32) | 2**30 + 2**20, call))
        assert wire == (2**31 - 1 << 32) | 2**30 + 2**20 and raw == call.raw
        assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(x, y)
        assert y.flags.writeable and y.ctypes.data % 16 == 0


def test_which_rank_died_is_read_from_mpiexec():
    from minidist.comm.mpi_launcher import _crash_error
    err = _crash_error("[mpiexec@vm] Exit codes: [vm] 0,768,9,0\n", 9)
    assert (err.rank, err.exitcode, err.signal) == (1, 3, None)
    err = _crash_error("[mpiexec@vm] Exit codes: [vm] 0,11,9\n... (signal 11)", 11)
    assert (err.rank, err.signal) == (1, "SIGSEGV")
    err = _crash_error("[mpiexec@vm] Exit codes: [vm] 9,9,0\n... Killed (signal 9)", 9)
    assert err.rank is None and err.signal == "SIGKILL" and "one of ranks [0, 1]" in str(err)


def test_without_mpiexec_the_error_says_what_to_install(monkeypatch):
    from minidist.comm import mpi_launcher
    monkeypatch.setattr(mpi_launcher.sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(mpi_launcher.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'minidist\[mpi\]'"):
        run(lambda comm: None, 2, backend="mpi")


# ---- the tour under `mpiexec -n 2` ---------------------------------------------------------------
@pytest.mark.timeout(240)
def test_the_tour_under_mpiexec_prints_one_table(tmp_path):
    from minidist import cli

    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "minidist", "tour",
                           "--backend", "mpi", "--workers", "2", "--steps", "20", "--outdir",
                           str(tmp_path)], capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("the tour:") == 1 and out.count("same as single") == 1  # rank 0 only
    table = out[out.index("same as single"):out.index("figures saved")]
    for label, _, options in cli.TOUR:
        line = next(row for row in table.splitlines() if row.strip().startswith(label))
        backend = {"ps": "process", "single": "none"}.get(label.split()[0], "mpi")
        assert f" {backend} " in line, line
        asynchronous = options.get("consistency") in ("asp", "ssp")
        assert ("differs" if asynchronous else "yes (") in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytes_per_strategy.png",
                                                          "loss_curves.png", "timelines.png"]
