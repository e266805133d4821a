"""Lesson 3 (collectives): ring all-reduce written over send/recv.

The checker first runs the learner's function on its own on 1 to 5 thread ranks (exact integer
sums, sizes p does not divide), so that a failure names the rank, the element and the traffic;
then it puts it INSIDE minidist, as the all-reduce algorithm of data-parallel training
(`algorithm=fn`, which comm.all_reduce runs: minidist.comm.custom), and compares the training
with strategy="single" (float64, 1e-10) and its gradient traffic with the ring's: 2(p−1)
messages of about n/p elements per all-reduce. During the check minidist's own algorithms
(comm.collectives' all_reduce_*, and the ring's two halves) are watched: a learner's function
that calls them fails.
"""

import contextlib
import functools
import threading

import numpy as np

from minidist.exercises._common import Check, Exercise, _check_timeout, _differs, _train

SIZES = [6, 7, 3]  # the MLP of the training runs: 73 parameters, which 2, 3, 4 do not divide
RUN = {"steps": 3, "batch_size": 12, "lr": 0.1}


def _ring_input(seed, rank, n):
    """Rank `rank`'s array: integers 1..99 as float64: every order of summing is exact, and no
    partial sum can equal the full one."""
    return np.random.default_rng([seed, rank, n]).integers(1, 100, size=n).astype(np.float64)


def _ranks(p):
    return f"{p} rank" + "s" * (p != 1)


def _ring_trial(comm, fn, sizes, seed):
    """On each rank: run fn(comm, array) for every size; keep its answer and the traffic."""
    out = []
    for n in sizes:
        array = _ring_input(seed, comm.rank, n)
        comm.stats.reset()
        got = fn(comm, array)
        dtype = np.asarray(array if got is None else got).dtype
        got = np.array(array if got is None else got, dtype=np.float64, copy=True)
        builtins = sorted(op for op, s in comm.stats.ops.items() if s.calls and op != "barrier")
        out.append((got, comm.stats.bytes_sent, comm.stats["send"].messages, builtins, dtype))
    return out


LIBRARY = ("all_reduce_naive", "all_reduce_tree", "all_reduce_recursive_doubling",
           "all_reduce_ring", "reduce_scatter_ring", "all_gather_ring")


@contextlib.contextmanager
def _library_watched(fn):
    """Inside: (fn watched, calls): every call of one of minidist.comm.collectives' LIBRARY
    functions made from within fn, on any rank, is recorded in `calls` as (rank, name); the
    library's own calls (outside fn) are not. Restored after, even on error."""
    from minidist.comm import collectives

    inside, calls = threading.local(), []

    def spy(name, original):
        @functools.wraps(original)
        def called(comm, *args, **kwargs):
            if getattr(inside, "fn", False):
                calls.append((comm.rank, name))
            return original(comm, *args, **kwargs)
        return called

    @functools.wraps(fn)
    def watched(comm, array):
        inside.fn = True
        try:
            return fn(comm, array)
        finally:
            inside.fn = False

    saved = {name: getattr(collectives, name) for name in LIBRARY}
    for name, original in saved.items():
        setattr(collectives, name, spy(name, original))
    try:
        yield watched, calls
    finally:
        for name, original in saved.items():
            setattr(collectives, name, original)


def _used_library(calls):
    if calls:
        rank, name = calls[0]
        return (f"rank {rank} called minidist's own collectives.{name} (minidist/comm/"
                "collectives.py): the exercise is to write the ring yourself, with comm.send "
                "and comm.recv only")
    return None


def _diagnose_values(p, n, got, inputs, want):
    """Why the ranks' answers differ from the sum: the common mistakes first."""
    where = f"with {_ranks(p)} and n = {n} elements"
    if any(g.shape != want.shape for g in got):
        shapes = sorted({g.shape for g in got})
        return f"{where}, every rank should end with shape {want.shape}; got {shapes}"
    if p > 1 and all(np.array_equal(g, x) for g, x in zip(got, inputs, strict=True)):
        return f"{where}, every rank still holds its own array: nothing was summed"
    if p > 1 and all(np.allclose(g, want / p) for g in got):
        return f"{where}, you computed the mean; the exercise asks for the sum"
    right = [g == want for g in got]
    one_chunk = p > 1 and all(0 < r.sum() <= -(-n // p) for r in right)
    if one_chunk and all(np.all(g >= want) for g in got):  # the rest: partial sum + full sum
        i = int(np.flatnonzero(got[0] > want)[0])
        return (f"{where}, rank 0 holds more than the sum at index {i} (expected {want[i]:g}, "
                f"got {got[0][i]:g}): a chunk was added twice. In the all-gather half the "
                "arriving chunks are already finished sums: copy them in (chunk[...] = "
                "comm.recv(left)), do not add them")
    if one_chunk:
        return (f"{where}, each rank has the full sum in only one chunk (≈ n/p positions): "
                "that is the reduce-scatter half. Now pass the finished chunks around the ring "
                "for p − 1 more steps (the all-gather), copying instead of adding")
    bad = [r for r, ok in enumerate(right) if not ok.all()]
    r = bad[0]
    i = int(np.flatnonzero(~right[r])[0])
    return (f"{where}, rank(s) {bad} end with wrong values; rank {r} is wrong at "
            f"{int((~right[r]).sum())} of {n} positions (first: index {i}, expected "
            f"{want[i]:g}, got {got[r][i]:g}). Check which chunk each step sends and adds")


def _alone(fn, world_sizes, sizes, timeout, seed, calls):
    """The first problem of fn run on its own on p thread ranks for p in world_sizes (a hang,
    an error, a built-in collective or the library's, wrong values or dtype, too many bytes or
    messages, too few bytes: float32), or None; `calls` lists fn's calls of the library."""
    from minidist.errors import CommTimeout, WorkerError
    from minidist.launch import run

    for p in world_sizes:
        try:
            results = run(_ring_trial, p, args=(fn, tuple(sizes), seed), backend="thread",
                          timeout=timeout)
        except CommTimeout as exc:
            return (f"with {_ranks(p)} the run hung until the {timeout} s timeout ({exc}). That "
                    "is a deadlock: some rank waits in recv for a message nobody sends. In each "
                    "step, first send to the right (send never waits), then recv from the left")
        except WorkerError as exc:
            what = str(exc).splitlines()[0].split("failed: ", 1)[-1]
            return f"with {_ranks(p)}, rank {exc.rank} raised {what}"
        except Exception as exc:  # noqa: BLE001 - a checker reports, never raises
            return f"with {_ranks(p)} the run failed: {type(exc).__name__}: {exc}"
        if calls:
            return _used_library(calls)
        for i, n in enumerate(sizes):
            got, sent, messages, builtins, dtypes = zip(*(res[i] for res in results),
                                                        strict=True)
            inputs = [_ring_input(seed, r, n) for r in range(p)]
            want = np.sum(inputs, axis=0) if p > 1 else inputs[0]
            used = sorted(set().union(*builtins))
            if used:
                return (f"your function called comm.{', comm.'.join(used)}; write the ring "
                        "yourself with comm.send and comm.recv")
            if not all(g.shape == want.shape and np.array_equal(g, want) for g in got):
                return _diagnose_values(p, n, got, inputs, want)
            changed = [r for r, dtype in enumerate(dtypes) if dtype != np.float64]
            if changed:
                return (f"right values, but with {_ranks(p)} and n = {n} rank {changed[0]} "
                        f"returned a {dtypes[changed[0]]} array for a float64 one: keep the "
                        "input's dtype (float32 keeps only about 7 digits)")
            floats = 2 * (p - 1) * n  # each of the p chunks moves p − 1 times in each half
            if sum(sent) < floats * 8:
                kind = ("float32s (4 bytes each)" if 2 * sum(sent) == floats * 8
                        else "fewer bytes than the data holds")
                return (f"right values, but with {p} ranks and n = {n} the ranks sent "
                        f"{sum(sent)} bytes in all, and a ring moves 2(p−1)·n = {floats} "
                        f"float64s, {floats * 8} bytes: your messages carry {kind}. Sending "
                        "float32 loses precision (about 1e-7 relative): send the chunks "
                        "as they are")
            limit = 2 * (p - 1) * -(-n // p) * 8  # 2(p−1) chunks of at most ⌈n/p⌉ float64s
            if max(sent) > limit:
                r = int(np.argmax(sent))
                return (f"right values, but with {p} ranks and n = {n} float64s ({8 * n} "
                        f"bytes) rank {r} sent {sent[r]} bytes; a ring sends only 2(p−1)/p·n ≈ "
                        f"{2 * (p - 1) * 8 * n // p} bytes per rank. Sending whole arrays "
                        "(through one rank, or up a tree) is the naive all-reduce: split the "
                        "array into p chunks, one chunk per message")
            if max(messages) > 2 * (p - 1):
                return (f"right values and bytes, but with {p} ranks a rank sent "
                        f"{max(messages)} messages; a ring needs only 2(p−1) = {2 * (p - 1)}: "
                        "send each step's chunk as one message")
    return None


def _inside(fn, train_sizes, timeout, calls):
    """The first problem of fn as data_parallel's all-reduce on p thread ranks, p in
    train_sizes: it called the library (`calls`), the training differs from single (by float32's
    rounding, or more), or its gradient traffic differs from a ring's."""
    from minidist import data, nn, train

    X, y = data.make_classification(48, SIZES[0], SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, SIZES, seed=1)
    single = train(model_fn, X, y, **RUN)
    n, steps = single.params.size, RUN["steps"]
    for p in train_sizes:
        where = f"inside minidist, as the all-reduce of data_parallel on {_ranks(p)}"
        hist, failure = _train(model_fn, X, y, timeout, strategy="data_parallel", workers=p,
                               algorithm=fn, **RUN)
        failure = failure or _used_library(calls) or _differs(hist, single)
        if failure:
            return f"{where}: {failure}{_precision(hist, single)}"
        reduced = [stats.get("all_reduce", {}) for stats in hist.stats]
        messages = [r.get("messages", 0) for r in reduced]
        sent = [r.get("bytes_sent", 0) for r in reduced]
        for rank, m in enumerate(messages):
            if m != steps * 2 * (p - 1):
                return (f"{where}: rank {rank} sent {m} messages in the {steps} steps' "
                        f"gradient all-reduces; a ring sends 2(p−1) = {2 * (p - 1)} per "
                        f"all-reduce, {steps * 2 * (p - 1)} in all")
        if sum(sent) != steps * 2 * (p - 1) * n * 8:
            return (f"{where}: the ranks sent {sum(sent)} bytes in all over {steps} steps; a "
                    f"ring moves each of the p chunks p − 1 times per half, 2(p−1)·n·8 = "
                    f"{2 * (p - 1) * n * 8} bytes per all-reduce of n = {n} float64s")
    return None


def _precision(hist, single):
    """A hint when hist is single's run up to float32's rounding (1e-9 to 1e-5 relative)."""
    if hist is None:
        return ""
    off = np.abs(hist.params - single.params).max() / np.abs(single.params).max()
    if 1e-9 < off < 1e-5:
        return (f" — only {off:.1g} relative, which is float32's rounding (ε ≈ 1.2e-7), not a "
                "wrong schedule: keep every sum and message in float64")
    return ""


def check_ring_all_reduce(fn, world_sizes=(1, 2, 3, 4, 5), sizes=(12, 7, 1001, 2, 1, 0),
                          train_sizes=(2, 3, 4), timeout=5.0, seed=0):
    """fn(comm, array) should leave the sum of every rank's `array` on every rank (in place, or
    returned), using only comm.send / comm.recv and sending no more than a ring's
    2(p−1)/p·n bytes per rank. Run on its own on p ranks for p in world_sizes (arrays of
    `sizes` elements), then as the all-reduce of data-parallel training (a 73-parameter MLP,
    3 steps) on p ranks for p in train_sizes, which must equal one process (1e-10) and send
    2(p−1) messages per all-reduce. Thread backend; a hang ends after `timeout` s."""
    from minidist.data import is_integer

    if not world_sizes or any(not is_integer(p) or p < 1 for p in world_sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts >= 1, "
                         f"got {world_sizes!r}")
    if not sizes or any(not is_integer(n) or n < 0 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of array sizes >= 0, got {sizes!r}")
    if any(not is_integer(p) or p < 2 for p in train_sizes):
        raise ValueError(f"train_sizes must be a list of rank counts >= 2, got {train_sizes!r}")
    _check_timeout(timeout)
    name = "check_ring_all_reduce"
    with _library_watched(fn) as (watched, calls):
        problem = (_alone(watched, world_sizes, sizes, timeout, seed, calls)
                   or _inside(watched, train_sizes, timeout, calls))
    if problem:
        return Check(name, False, problem)
    trained = (f"; data_parallel with it equals one process on "
               f"{', '.join(map(str, train_sizes))} ranks, with a ring's 2(p−1) messages per "
               "all-reduce" if train_sizes else "")
    return Check(name, True, f"the sum on every rank, with ring traffic, for world sizes "
                             f"{tuple(world_sizes)} and sizes {tuple(sizes)}{trained}")


__all__ = ["check_ring_all_reduce"]

EXERCISES = (
    Exercise(3, "my_ring_all_reduce", check_ring_all_reduce, "ring_all_reduce",
             "ring all-reduce over send/recv, run as the gradient all-reduce of data-parallel "
             "training (algorithm=your function) on 2 to 4 thread ranks"),
)
