"""Every collective × algorithm × world size × size × dtype, against numpy, on each backend.

Inputs are integer-valued (in every dtype), so sums are exact and every comparison is exact.
Each launch checks many cases inside the ranks and returns the failures, to keep launches few.
"""

import numpy as np
import pytest

from minidist import CollectiveMismatchError, WorkerError, run
from minidist.comm import ALGORITHMS
from minidist.data import shard_bounds

BACKENDS = ["thread", "process"]
WORLD_SIZES = [1, 2, 3, 4, 5, 8]
SIZES = [0, 1, 7, 1000]
BIG = 2**20 + 3
DTYPES = [np.float32, np.float64, np.int64]


def data(rank, n, dtype):
    """Rank `rank`'s input: integers in [−50, 60], different on every rank."""
    return (np.arange(n) % 97 + 13 * rank - 50).astype(dtype)


def reference(op, stack):
    return {"sum": stack.sum(0), "mean": stack.sum(0) / len(stack), "max": stack.max(0),
            "min": stack.min(0)}[op]


def exercise_collectives(comm, sizes, dtypes, big):
    """Run in every rank: returns a list of what came out wrong."""
    p, r, bad = comm.world_size, comm.rank, []

    def expect(what, got, want):
        if got is None or got.shape != want.shape or got.dtype != want.dtype \
                or not np.array_equal(got, want):
            bad.append(f"rank {r}: {what}")

    for n in sizes:
        for dtype in dtypes:
            stack = np.stack([data(s, n, dtype) for s in range(p)])
            mine = stack[r]
            case = f"n={n} {np.dtype(dtype)}"
            for algorithm in ALGORITHMS:
                for op in ["sum", "mean", "max", "min"]:
                    if op == "mean" and np.dtype(dtype).kind != "f":
                        continue
                    x = mine.copy()
                    expect(f"all_reduce {algorithm} {op} {case}",
                           comm.all_reduce(x, op, algorithm), reference(op, stack))
            for root in range(p):
                for algorithm in ["tree", "native", "auto"]:
                    x = mine.copy()
                    expect(f"broadcast {algorithm} root {root} {case}",
                           comm.broadcast(x, root, algorithm), stack[root])
                x = mine.copy()
                comm.reduce(x, root, "max")
                expect(f"reduce root {root} {case}", x, stack.max(0) if r == root else mine)
                got = comm.gather(mine, root)
                if r == root:
                    expect(f"gather root {root} {case}", got, stack)
                elif got is not None:
                    bad.append(f"rank {r}: gather returned data on a non-root rank")
                rows = stack * (root + 1)
                expect(f"scatter root {root} {case}",
                       comm.scatter(rows if r == root else None, root), rows[r])
            expect(f"all_gather {case}", comm.all_gather(mine), stack)
            lo, hi = shard_bounds(n, r, p)
            if n:
                expect(f"reduce_scatter {case}", comm.reduce_scatter(mine), stack.sum(0)[lo:hi])
            comm.barrier()
    if big:
        stack = np.stack([data(s, BIG, np.float64) for s in range(p)])
        for algorithm in ALGORITHMS:
            x = stack[r].copy()
            expect(f"all_reduce {algorithm} n={BIG}", comm.all_reduce(x, algorithm=algorithm),
                   stack.sum(0))
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_collective_matches_numpy(backend, world_size):
    failures = run(exercise_collectives, world_size, args=(SIZES, DTYPES, world_size <= 4),
                   backend=backend, timeout=240)
    assert [f for rank_failures in failures for f in rank_failures] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_to_point_tags_order_and_big_messages(backend):
    def exchange(comm):
        other = 1 - comm.rank
        big = np.arange(3_000_000, dtype=np.float64) + comm.rank  # 24 MB: more than a ring holds
        comm.send(np.array([1]), other, tag=1)
        comm.send(np.array([2]), other, tag=2)
        comm.send(big, other, tag=3)  # both ranks send before either receives: no deadlock
        got_big = comm.recv(other, tag=3)
        second, first = comm.recv(other, tag=2), comm.recv(other, tag=1)
        ordered = [comm.send(np.array([i]), other, tag=5) for i in range(50)]
        received = [int(comm.recv(other, tag=5)[0]) for _ in ordered]
        return int(first[0]), int(second[0]), np.array_equal(got_big, big - comm.rank + other), \
            received, comm.stats["send"].bytes_sent

    for first, second, big_ok, received, sent in run(exchange, 2, backend=backend, timeout=60):
        assert (first, second, big_ok) == (1, 2, True)
        assert received == list(range(50))
        assert sent == 8 + 8 + 24_000_000 + 50 * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_makes_independent_groups(backend):
    def grouped(comm):
        rows = comm.split(color=comm.rank // 2)  # {0, 1}, {2, 3}, {4, 5}
        cols = comm.split(color=comm.rank % 2, key=-comm.rank)  # reversed order
        x = np.array([comm.rank], dtype=np.int64)
        row_sum = rows.all_reduce(x.copy())[0]
        col_ranks = cols.all_gather(x).ravel().tolist()
        inner = cols.split(color=0)
        return rows.rank, rows.world_size, row_sum, cols.rank, col_ranks, \
            inner.all_reduce(x.copy())[0]

    results = run(grouped, 6, backend=backend, timeout=60)
    for rank, (row_rank, row_size, row_sum, col_rank, col_ranks, inner_sum) in enumerate(results):
        assert (row_rank, row_size, row_sum) == (rank % 2, 2, 4 * (rank // 2) + 1)
        assert col_ranks == [r for r in (4, 2, 0) if r % 2 == rank % 2] + \
            [r for r in (5, 3, 1) if r % 2 == rank % 2]
        assert col_rank == col_ranks.index(rank) and inner_sum == sum(col_ranks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_count_bytes_messages_and_reset(backend):
    def counted(comm):
        x = np.ones(1000)
        comm.all_reduce(x, algorithm="ring")
        before = comm.stats["all_reduce"].bytes_sent, comm.stats["all_reduce"].messages, \
            comm.stats["all_reduce"].calls
        comm.stats.reset()
        return before, comm.stats.bytes_sent

    for (sent, messages, calls), after in run(counted, 4, backend=backend):
        assert (sent, messages, calls, after) == (2 * 3 * 250 * 8, 6, 1, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_mismatch_is_an_error_not_a_hang(backend):
    def mismatched(comm):
        comm.all_reduce(np.zeros(10 + comm.rank), algorithm="ring")

    with pytest.raises(CollectiveMismatchError, match="expected"):
        run(mismatched, 2, backend=backend, timeout=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_debug_mode_names_the_ranks_that_differ(backend, monkeypatch):
    def divergent(comm):
        if comm.rank == 2:
            comm.broadcast(np.zeros(3))
        else:
            comm.all_reduce(np.zeros(3))

    with pytest.raises(CollectiveMismatchError, match=r"rank 2: collective #1 broadcast"):
        run(divergent, 3, backend=backend, timeout=20, debug=True)
    monkeypatch.setenv("MINIDIST_DEBUG", "1")
    with pytest.raises(CollectiveMismatchError, match="rank 0: collective #1 all_reduce"):
        run(divergent, 3, backend=backend, timeout=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_named(backend):
    def misuse(comm, case):
        x = np.zeros(4)
        {"dst": lambda: comm.send(x, 5),
         "self": lambda: comm.send(x, comm.rank),
         "tag": lambda: comm.send(x, 1 - comm.rank, tag=-1),
         "contiguous": lambda: comm.all_reduce(np.zeros((4, 4))[:, 0]),
         "dtype": lambda: comm.all_reduce(np.array(["a"], dtype=object)),
         "op": lambda: comm.all_reduce(x, op="prod"),
         "mean": lambda: comm.all_reduce(np.zeros(4, dtype=np.int64), op="mean"),
         "algorithm": lambda: comm.all_reduce(x, algorithm="butterfly"),
         "root": lambda: comm.broadcast(x, src=2),
         "scatter": lambda: comm.scatter(np.zeros(3), src=0)}[case]()

    expected = {"dst": "dst must be a rank in", "self": "itself", "tag": "tag must",
                "contiguous": "C-contiguous", "dtype": "numeric dtype", "op": "unknown op",
                "mean": "float", "algorithm": "unknown algorithm 'butterfly'",
                "root": "src must be a rank", "scatter": "leading axis"}
    for case, message in expected.items():
        with pytest.raises(WorkerError, match=message):
            run(misuse, 2, args=(case,), backend=backend, timeout=20)
    with pytest.raises(ValueError, match="world_size"):
        run(misuse, 0, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        run(misuse, 2, backend="carrier-pigeon")


def _barrier_rounds(comm, folder, algorithm, rounds):
    """Each round, every rank leaves a file, passes the barrier, and must then see every
    rank's file of that round: a barrier that let anyone through early would show up here."""
    import os

    missing = []
    for t in range(rounds):
        open(os.path.join(folder, f"{t}-{comm.rank}"), "w").close()
        comm.barrier(algorithm=algorithm)
        seen = {name for name in os.listdir(folder) if name.startswith(f"{t}-")}
        missing += [f"round {t}: rank {comm.rank} passed before rank {s} arrived"
                    for s in range(comm.world_size) if f"{t}-{s}" not in seen]
    return missing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ["dissemination", "native", "auto"])
def test_barrier_lets_nobody_through_early(backend, algorithm, tmp_path):
    for p in (1, 3, 4):
        folder = tmp_path / f"{p}"
        folder.mkdir()
        assert sum(run(_barrier_rounds, p, args=(str(folder), algorithm, 20),
                       backend=backend), []) == []


def test_barrier_names_an_unknown_algorithm():
    with pytest.raises(WorkerError, match="unknown algorithm 'tree' for barrier"):
        run(lambda comm: comm.barrier(algorithm="tree"), 2, backend="thread")
