"""comm.all_to_all against a numpy reference (rank r's item i is the chunk rank i built for r):
every path (pairwise, native) on every backend, ragged and empty chunks, several dtypes and row
shapes, blocking and async, split groups; comm.stats equal to cost.all_to_all_bytes exactly;
bad arguments named before anything is sent; mismatched calls named on both ranks."""

import re

import numpy as np
import pytest
from ml_dtypes import bfloat16
from test_native_collectives import HAVE_MPI

from minidist import CollectiveMismatchError, cost, run
from minidist.trace import COMM

DTYPES = [np.float64, np.float32, np.int64, np.int8, np.bool_, np.complex128, bfloat16]
ROWS = [(), (3,), (2, 0)]  # a chunk's row shape: 1-D chunks, rows of 3, empty rows


def sizes_for(p, seed):
    """rows[i][j]: the rows rank i sends rank j, 0 … 3 (so some chunks are empty)."""
    return [[(3 * i + 5 * j + i * j + seed) % 4 for j in range(p)] for i in range(p)]


def chunk(src, dst, rows, row, dtype):
    """What rank src sends rank dst: small integers (exact in every dtype), unique per pair."""
    values = np.arange(rows * int(np.prod(row))) % 61 + 5 * src + 17 * dst
    return (values % 2 if np.dtype(dtype) == np.bool_ else values).astype(dtype).reshape(
        rows, *row)


def expected_stats(p, sizes, row, dtype, r):
    """(bytes sent, bytes received) of rank r, from the cost model."""
    elements = [[n * int(np.prod(row)) for n in line] for line in sizes]
    return cost.all_to_all_bytes(elements, np.dtype(dtype).itemsize)[r]


def exercise(comm, cases, algorithms, messages):
    """In every rank: each (sizes seed, row shape, dtype) case with each algorithm, blocking and
    async, against the reference; `messages[algorithm]`: what stats must count. The failures."""
    p, r, bad = comm.world_size, comm.rank, []
    for seed, row, dtype in cases:
        sizes = sizes_for(p, seed)
        mine = [chunk(r, j, sizes[r][j], row, dtype) for j in range(p)]
        before = [c.copy() for c in mine]
        want = [chunk(i, r, sizes[i][r], row, dtype) for i in range(p)]
        case = f"rank {r}: seed {seed} row {row} {np.dtype(dtype)}"
        for algorithm in algorithms:
            for async_op in (False, True):
                comm.stats.reset()
                got = comm.all_to_all(mine, algorithm=algorithm, async_op=async_op)
                got = got.wait(timeout=30) if async_op else got
                s = comm.stats["all_to_all"]
                what = f"{case} {algorithm} async={async_op}"
                if not isinstance(got, list) or len(got) != p:
                    bad.append(f"{what}: returned {type(got).__name__} {got!r}")
                    continue
                for i, (g, w) in enumerate(zip(got, want, strict=True)):
                    if g.dtype != w.dtype or g.shape != w.shape or g.tobytes() != w.tobytes():
                        bad.append(f"{what}: item {i} is {g.dtype} {g.shape}, want {w.shape}")
                if np.shares_memory(got[r], mine[r]):
                    bad.append(f"{what}: item {r} is my own chunk, not a copy")
                counted = (s.bytes_sent, s.bytes_received, s.messages, s.calls)
                model = (*expected_stats(p, sizes, row, dtype, r), messages[algorithm], 1)
                if counted != model:
                    bad.append(f"{what}: stats {counted} != model {model}")
        if any(a.tobytes() != b.tobytes() for a, b in zip(mine, before, strict=True)):
            bad.append(f"{case}: all_to_all changed its input")
    return bad


def all_cases(dtypes, rows=ROWS, seeds=(0, 1)):
    return [(seed, row, dtype) for seed in seeds for row in rows for dtype in dtypes]


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_thread_backend_every_path(p):
    messages = {"pairwise": p - 1, "native": 0, "auto": 0}
    bad = run(exercise, p, args=(all_cases(DTYPES), list(messages), messages),
              backend="thread", timeout=60)
    assert not sum(bad, [])


@pytest.mark.parametrize("p", [2, 3])
def test_process_backend_every_path(p):
    messages = {"pairwise": p - 1, "native": 0}
    cases = all_cases([np.float64, np.int8, bfloat16])
    bad = run(exercise, p, args=(cases, list(messages), messages), backend="process",
              timeout=60)
    assert not sum(bad, [])


def _large(comm):
    """Chunks over the rings' capacity (pairwise streams them) and the first scratch (native
    grows it), then small calls that reuse the grown scratch. Lopsided, back to back, each call
    with new values: rank r sends rank j > r 300 000 rows but j < r a few, so a rank that packed
    its next call before the others had copied this one out would corrupt what they copy."""
    p, r = comm.world_size, comm.rank
    plan = [(300_000, "pairwise")] + [(300_000, "native")] * 4 + [(5, "pairwise"), (5, "native")]

    def chunks(src, dst, call):
        return np.full((plan[call][0] if src < dst else 3 + dst, 2), 3 * src + dst + call, float)

    mine = [[chunks(r, j, call) for j in range(p)] for call in range(len(plan))]  # made first
    got = [comm.all_to_all(mine[call], algorithm=plan[call][1]) for call in range(len(plan))]
    return [f"rank {r}: call {call} {plan[call]}" for call in range(len(plan))
            if any(not np.array_equal(g, chunks(i, r, call)) for i, g in enumerate(got[call]))]


def test_process_backend_large_chunks():
    assert not sum(run(_large, 2, backend="process", timeout=60), [])


def _mpi(comm):
    """Every path on MPI, then mismatched native calls, caught: the error texts."""
    p = comm.world_size
    bad = exercise(comm, all_cases([np.float64, np.int64, bfloat16], seeds=(0, 1, 2)),
                   ["pairwise", "native"], {"pairwise": p - 1, "native": p - 1})
    texts = []
    for call in (lambda c: c.all_to_all([np.ones(2, np.int64 if c.rank else np.float64)] * p),
                 lambda c: c.all_to_all([np.ones(2)] * p) if c.rank else c.all_reduce(np.ones(2))):
        try:
            call(comm)
        except CollectiveMismatchError as exc:
            texts.append(str(exc))
    return bad, texts


@pytest.mark.timeout(120)
@pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec")
@pytest.mark.parametrize("p", [2, 3])
def test_mpi_backend_every_path_and_mismatches(p):
    for bad, texts in run(_mpi, p, backend="mpi", timeout=60):
        assert not bad
        assert len(texts) == 2, texts
        assert "float64 of shape (*)" in texts[0] and "int64 of shape (*)" in texts[0], texts
        assert "all_to_all(" in texts[1] and "all_reduce(" in texts[1], texts


def _groups(comm):
    """all_to_all inside split groups (pairwise: groups have no native path) against the
    reference in group ranks, and the group's stats against the model."""
    group = comm.split(color=comm.rank % 2)
    q = group.world_size
    messages = {"auto": q - 1, "pairwise": q - 1}
    bad = exercise(group, all_cases([np.float64, np.int8], rows=[(), (3,)]), list(messages),
                   messages)
    with pytest.raises(ValueError, match="no native all_to_all"):
        group.all_to_all([np.ones(1)] * q, algorithm="native")
    return bad


@pytest.mark.parametrize("backend, p", [("thread", 4), ("process", 3)])
def test_split_groups(backend, p):
    assert not sum(run(_groups, p, backend=backend, timeout=60), [])


def _ordered_async(comm):
    """An async all_to_all queued between two async all_reduces, in debug mode."""
    p, r = comm.world_size, comm.rank
    x = np.full(3, r + 1.0)
    works = [comm.all_reduce(x, async_op=True),
             comm.all_to_all([np.full(j + 1, 10.0 * r + j) for j in range(p)], async_op=True),
             comm.all_reduce(np.ones(2), async_op=True)]
    reduced, exchanged, ones = (w.wait(timeout=30) for w in works)
    return reduced.tolist(), [e.tolist() for e in exchanged], ones.tolist()


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_async_ops_complete_in_order_in_debug_mode(backend):
    p = 3
    for r, (reduced, exchanged, ones) in enumerate(run(_ordered_async, p, backend=backend,
                                                      timeout=60, debug=True)):
        assert reduced == [6.0] * 3 and ones == [3.0] * 2
        assert exchanged == [[10.0 * i + r] * (r + 1) for i in range(p)]


# ---- bad arguments: named before anything is sent ---------------------------------------------
BAD = [
    (lambda p: np.ones((p, 2)), TypeError,
     r"needs a list of world_size=2 arrays \(chunk j goes to rank j\), got ndarray"),
    (lambda p: [np.ones(2)] * (p + 1), ValueError, "one chunk per rank, world_size=2, got 3"),
    (lambda p: [np.ones(2), [1.0, 2.0]], ValueError, "chunk 1 needs a numpy array, got list"),
    (lambda p: [np.array(["a"])] * p, ValueError, "chunk 0 needs a numeric dtype, got <U1"),
    (lambda p: [np.ones(2), np.ones(2, np.int64)], ValueError,
     r"one dtype and row shape .* chunk 0 is float64 \(2,\), chunk 1 is int64 \(2,\)"),
    (lambda p: [np.ones((2, 3)), np.ones((2, 4))], ValueError,
     r"only the first axis may differ.*chunk 1 is float64 \(2, 4\)"),
    (lambda p: [np.float64(1.0)] * p, ValueError, "needs a numpy array, got float64"),
    (lambda p: [np.ones(())] * p, ValueError, "chunk 0 needs at least one axis"),
    (lambda p: [np.ones((3, 2))[:, 0]] * p, ValueError, "chunk 0 needs a C-contiguous array"),
]


def _bad_calls(comm):
    """Each bad call's error, raised in the caller: nothing may have been sent."""
    out = []
    for make, _, _ in BAD:
        try:
            comm.all_to_all(make(comm.world_size), async_op=comm.rank == 1)
        except (TypeError, ValueError) as exc:
            out.append((type(exc), str(exc)))
    for kwargs in ({"algorithm": "ring"}, {"async_op": 1}):
        try:
            comm.all_to_all([np.ones(1)] * comm.world_size, **kwargs)
        except (TypeError, ValueError) as exc:
            out.append((type(exc), str(exc)))
    return out, comm.stats.messages, comm.stats.bytes_sent


def test_bad_arguments_are_named_before_anything_is_sent():
    for errors, messages, sent in run(_bad_calls, 2, backend="thread", timeout=30):
        assert (messages, sent) == (0, 0)
        assert len(errors) == len(BAD) + 2, errors
        for (kind, text), (_, want_kind, pattern) in zip(errors, BAD, strict=False):
            assert kind is want_kind and re.search(pattern, text), (text, pattern)
        assert "unknown algorithm 'ring' for all_to_all; allowed: pairwise, native, auto" in \
            errors[-2][1]
        assert errors[-1][0] is TypeError and "async_op must be True or False" in errors[-1][1]


MISMATCHES = {  # rank 0's call, rank 1's call, what the error must quote for each
    "dtypes differ (native)": (
        lambda c: c.all_to_all([np.ones(2)] * 2), lambda c: c.all_to_all([np.ones(2, "f4")] * 2),
        "chunks=float64 of shape (*)", "chunks=float32 of shape (*)"),
    "row shapes differ (pairwise)": (
        lambda c: c.all_to_all([np.ones((1, 3))] * 2, "pairwise"),
        lambda c: c.all_to_all([np.ones((1, 2))] * 2, "pairwise"),
        "float64 of shape (*, 3)", "float64 of shape (*, 2)"),
    "all_to_all vs all_reduce (native)": (
        lambda c: c.all_to_all([np.ones(2)] * 2), lambda c: c.all_reduce(np.ones(2)),
        "all_to_all(algorithm=native", "all_reduce(op=sum, algorithm=native"),
    "all_to_all vs all_reduce (messages)": (
        lambda c: c.all_to_all([np.ones(2)] * 2, "pairwise"),
        lambda c: c.all_reduce(np.ones(2), algorithm="ring"),
        "all_to_all(algorithm=pairwise", "all_reduce(op=sum, algorithm=ring"),
    "all_to_all vs all_reduce in a split group": (
        lambda c: c.split(0).all_to_all([np.ones(2)] * 2),
        lambda c: c.split(0).all_reduce(np.ones(2)), "all_to_all(", "all_reduce("),
}


def _mismatched(comm, case):
    try:
        MISMATCHES[case][comm.rank](comm)
    except CollectiveMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_mismatched_call_is_named_on_both_ranks(backend):
    for case, (_, _, mine, theirs) in MISMATCHES.items():
        for text in run(_mismatched, 2, args=(case,), backend=backend, timeout=20):
            assert text and "rank 0" in text and "rank 1" in text, (case, text)
            assert mine in text and theirs in text, (case, text)


# ---- the cost model ----------------------------------------------------------------------------
def test_all_to_all_bytes_by_hand():
    # rank 0 sends 1 to rank 1 and 2 to rank 2; rank 1 sends 3 to rank 0; rank 2 sends 4 to 1
    sizes = [[9, 1, 2], [3, 9, 0], [0, 4, 9]]
    assert cost.all_to_all_bytes(sizes, 8) == [(24, 24), (24, 40), (32, 16)]
    assert cost.all_to_all_bytes([[5]], 4) == [(0, 0)]
    for bad in ([[1, 2]], [[1, 2], [3]], [[1, -1], [0, 0]], [[0.5, 1], [1, 1]], []):
        with pytest.raises(ValueError, match="sizes must be a p × p matrix"):
            cost.all_to_all_bytes(bad, 8)
    with pytest.raises(ValueError, match="itemsize"):
        cost.all_to_all_bytes([[1]], -1)


def test_even_chunks_follow_bytes_per_rank_time_and_bus_bandwidth():
    # 7 rows of 3 float64 over 3 ranks: chunks of c = 3, 2, 2 rows (data.shard_bounds), 24 B a
    # row; rank r sends all but chunk r (7 − c_r rows) and gets chunk r from the 2 others
    got = cost.bytes_per_rank("all_to_all", "pairwise", (7, 3), 8, 3)
    assert got == [(4 * 24, 6 * 24), (5 * 24, 4 * 24), (5 * 24, 4 * 24)]
    assert cost.bytes_per_rank("all_to_all", None, 7, 8, 3) == [(32, 48), (40, 32), (40, 32)]
    assert cost.messages_per_rank("all_to_all", None, (7, 3), 8, 3) == [2, 2, 2]
    a, b, n = 1e-5, 1e-9, 8e6
    assert cost.time("all_to_all", "pairwise", n, 4, a, b) == pytest.approx(3 * a + n * 3 / 4 * b)
    assert cost.bus_bandwidth("all_to_all", 1e9, 0.5, 4) == pytest.approx(1.5e9)
    with pytest.raises(ValueError, match="at least one axis"):
        cost.bytes_per_rank("all_to_all", None, (), 8, 3)


def _even(comm, shape):
    comm.all_to_all(np.array_split(np.ones(shape), comm.world_size))
    s = comm.stats["all_to_all"]
    return s.bytes_sent, s.bytes_received


def test_stats_of_even_chunks_equal_bytes_per_rank():
    for shape in [(7, 3), (2,), (0, 4)]:
        got = run(_even, 3, args=(shape,), backend="thread", timeout=20)
        assert got == cost.bytes_per_rank("all_to_all", None, shape, 8, 3), shape


def test_timelines_draw_all_to_all_as_communication():
    assert "all_to_all" in COMM
