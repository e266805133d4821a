"""The native (shared-memory, MPI) reduce_scatter and all_gather against numpy and against the
ring: the same bits, the same byte counts (cost.bytes_per_rank), the same mismatch errors, on
small slots and large published buffers, blocking and async, in debug mode too."""

import importlib.util
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from minidist import CollectiveMismatchError, cost, run
from minidist.comm.process import SMALL
from minidist.data import shard_bounds

BACKENDS = ["thread", "process"]
SHAPES = [(0,), (1,), (7,), (7, 3), (3, 0), (5, 2, 3)]  # empty, uneven rows, extra axes
LARGE = (SMALL // 8 + 5, 3)  # float64 rows over the small slot: the published-buffer path
DTYPES = [np.float64, np.float32, np.int64, ml_dtypes.bfloat16]
OPS = ["sum", "mean", "max", "min"]
TOLERANCE = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5,  # against float64 numpy
             np.dtype(ml_dtypes.bfloat16): 2e-2}
MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and (
    MPIEXEC.exists() or shutil.which("mpiexec") is not None)


def inputs(rank, shape, dtype):
    """Rank `rank`'s array: random floats (rounding differs with the order of a sum) or
    integers, different on every rank, reproducible on every rank."""
    x = np.random.default_rng([rank, *shape]).standard_normal(shape) * 100
    return x.astype(dtype)


def reference(op, stack):
    """The op over ranks, in float64 (the native result of a float sum matches it to rounding)."""
    wide = stack.astype(np.float64)
    return {"sum": wide.sum(0), "mean": wide.mean(0), "max": wide.max(0),
            "min": wide.min(0)}[op]


def counted(comm, name, *args, **kwargs):
    """comm.<name>(*args, **kwargs) and the (bytes sent, bytes received, messages) it counted."""
    comm.stats.reset()
    out = getattr(comm, name)(*args, **kwargs)
    s = comm.stats[name]
    return out, (s.bytes_sent, s.bytes_received, s.messages)


def compare(comm, shapes, dtypes, use_alloc=False):
    """In every rank: native against ring (bits, bytes) and against numpy; the failures."""
    p, r, bad = comm.world_size, comm.rank, []
    for shape in shapes:
        for dtype in dtypes:
            stack = np.stack([inputs(s, shape, dtype) for s in range(p)])
            mine = stack[r].copy()
            if use_alloc:  # already in shared memory: published where it lies, no copy
                mine = comm.alloc(shape, dtype)
                mine[...] = stack[r]
            case = f"{np.dtype(dtype)} {shape}"
            lo, hi = shard_bounds(shape[0], r, p)
            for op in OPS:
                if op == "mean" and np.dtype(dtype).kind == "i":
                    continue
                ring, rs = counted(comm, "reduce_scatter", mine, op, algorithm="ring")
                native, ns = counted(comm, "reduce_scatter", mine, op, algorithm="native")
                if native.dtype != ring.dtype or native.tobytes() != ring.tobytes() \
                        or native.shape != (hi - lo, *shape[1:]):
                    bad.append(f"rank {r}: reduce_scatter {op} {case}: native != ring")
                if ns != rs[:2] + (0,):
                    bad.append(f"rank {r}: reduce_scatter {op} {case}: counted {ns}, ring {rs}")
                tol = TOLERANCE.get(np.dtype(dtype), 0.0)
                want = reference(op, stack)[lo:hi]
                if not np.allclose(native.astype(np.float64), want, rtol=tol, atol=tol * 400):
                    bad.append(f"rank {r}: reduce_scatter {op} {case}: wrong values")
            if not np.array_equal(mine, stack[r]):
                bad.append(f"rank {r}: reduce_scatter {case} changed its input")
            gathered, gs = counted(comm, "all_gather", mine, "native")
            if gathered.tobytes() != stack.tobytes() or gathered.shape != stack.shape:
                bad.append(f"rank {r}: all_gather {case}: wrong result")
            if gs != ((p - 1) * mine.nbytes,) * 2 + (0,):
                bad.append(f"rank {r}: all_gather {case}: counted {gs}")
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_native_equals_ring_and_numpy(backend, p):
    failures = run(compare, p, args=(SHAPES, DTYPES), backend=backend, timeout=60)
    assert not sum(failures, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_on_large_and_shared_buffers(backend):
    for use_alloc in (False, True):
        failures = run(compare, 3, args=([LARGE], [np.float64, np.int64], use_alloc),
                       backend=backend, timeout=60)
        assert not sum(failures, []), use_alloc


def _model_bytes(comm, shape, dtype):
    """What comm.stats counts for auto (native) reduce_scatter and all_gather, per rank."""
    x = np.ones(shape, dtype)
    _, rs = counted(comm, "reduce_scatter", x)
    _, ag = counted(comm, "all_gather", x)
    return rs[:2], ag[:2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_counts_equal_the_cost_model(backend):
    p = 3
    for shape in [(7,), (8, 5), (1,), LARGE]:
        got = run(_model_bytes, p, args=(shape, np.float32), backend=backend, timeout=60)
        rs = cost.bytes_per_rank("reduce_scatter", "ring", shape, 4, p)
        ag = cost.bytes_per_rank("all_gather", "ring", shape, 4, p)
        assert [g[0] for g in got] == [tuple(b) for b in rs], shape
        assert [g[1] for g in got] == [tuple(b) for b in ag], shape


def _async_and_debug(comm, shape):
    """The same ops issued async, then blocking: results and counts must agree."""
    x = inputs(comm.rank, shape, np.float64)
    works = [comm.reduce_scatter(x, async_op=True), comm.all_gather(x, async_op=True)]
    later = [w.wait(timeout=30) for w in works]
    comm.stats.reset()
    now = [comm.reduce_scatter(x), comm.all_gather(x)]
    messages = comm.stats.messages
    return all(a.tobytes() == b.tobytes() for a, b in zip(later, now, strict=True)), messages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("debug", [False, True])
def test_async_ops_and_debug_mode_take_the_native_path(backend, debug):
    for shape in [(9,), LARGE]:
        got = run(_async_and_debug, 2, args=(shape,), backend=backend, timeout=60, debug=debug)
        assert got == [(True, 0)] * 2, (shape, got)  # no messages: the native path ran


MISMATCHES = {  # (rank 0's call, the text naming it, rank 1's, its text)
    "reduce_scatter (4,) vs (2, 2), small slots": (
        lambda c: c.reduce_scatter(np.ones(4)), "float64 array of shape (4,)",
        lambda c: c.reduce_scatter(np.ones((2, 2))), "float64 array of shape (2, 2)"),
    "reduce_scatter of float64 vs int64, published buffers": (
        lambda c: c.reduce_scatter(np.ones(LARGE)), f"float64 array of shape {LARGE}",
        lambda c: c.reduce_scatter(np.ones(LARGE, np.int64)), f"int64 array of shape {LARGE}"),
    "reduce_scatter small on rank 0, large on rank 1": (
        lambda c: c.reduce_scatter(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.reduce_scatter(np.ones(LARGE)), f"float64 array of shape {LARGE}"),
    "reduce_scatter with op sum vs max": (
        lambda c: c.reduce_scatter(np.ones(4)), "reduce_scatter(op=sum",
        lambda c: c.reduce_scatter(np.ones(4), "max"), "reduce_scatter(op=max"),
    "all_gather (10,) vs (2, 5), small slots": (
        lambda c: c.all_gather(np.ones(10)), "float64 array of shape (10,)",
        lambda c: c.all_gather(np.ones((2, 5))), "float64 array of shape (2, 5)"),
    "all_gather of float32 vs int32, published buffers": (
        lambda c: c.all_gather(np.ones(LARGE, np.float32)), f"float32 array of shape {LARGE}",
        lambda c: c.all_gather(np.ones(LARGE, np.int32)), f"int32 array of shape {LARGE}"),
    "reduce_scatter on rank 0, all_gather on rank 1": (
        lambda c: c.reduce_scatter(np.ones(4)), "reduce_scatter(",
        lambda c: c.all_gather(np.ones(4)), "all_gather("),
}


def _mismatched(comm, case):
    try:
        MISMATCHES[case][2 * comm.rank](comm)
    except CollectiveMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mismatch_names_both_calls_on_every_rank(backend):
    for case, (_, mine, _, theirs) in MISMATCHES.items():
        texts = run(_mismatched, 2, args=(case,), backend=backend, timeout=30)
        for text in texts:  # both ranks read the other's buffer: both must raise
            assert text and "rank 0" in text and "rank 1" in text, (case, text)
            assert mine in text and theirs in text, (case, text)


def _mismatched_async(comm):
    x = np.ones(4 + comm.rank)
    work = comm.all_gather(x, async_op=True) if comm.rank else comm.reduce_scatter(x, async_op=True)
    try:
        work.wait(timeout=30)
    except CollectiveMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_mismatch_names_both_calls(backend):
    for text in run(_mismatched_async, 2, backend=backend, timeout=30):
        assert "reduce_scatter(" in text and "all_gather(" in text, text


def _mpi_native(comm):
    """Under MPI: native (Ireduce_scatter_block, Ireduce_scatter) against numpy and the ring."""
    p, r, bad = comm.world_size, comm.rank, []
    for shape in [(8, 3), (7, 3), (0,), (3, 0), (1,)]:
        stack = np.stack([inputs(s, shape, np.int64) for s in range(p)])
        lo, hi = shard_bounds(shape[0], r, p)
        ring, rs = counted(comm, "reduce_scatter", stack[r], algorithm="ring")
        native, ns = counted(comm, "reduce_scatter", stack[r], algorithm="native")
        if not np.array_equal(native, stack.sum(0)[lo:hi]) or native.tobytes() != ring.tobytes():
            bad.append(f"rank {r}: {shape}: native {native} ring {ring}")
        if ns != rs:
            bad.append(f"rank {r}: {shape}: counted {ns}, ring {rs}")
    x = inputs(r, (5,), np.float64)
    got = comm.reduce_scatter(x, "mean", async_op=True).wait(timeout=30)
    lo, hi = shard_bounds(5, r, p)
    want = np.mean([inputs(s, (5,), np.float64) for s in range(p)], axis=0)[lo:hi]
    if not np.allclose(got, want, rtol=1e-12):
        bad.append(f"rank {r}: async mean {got} != {want}")
    return bad


@pytest.mark.timeout(120)
@pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec")
def test_mpi_native_reduce_scatter_even_and_uneven_rows():
    assert not sum(run(_mpi_native, 3, backend="mpi", timeout=60), [])
