"""Lesson 3 (collectives): ring all-reduce written over send/recv."""

import numpy as np

from minidist.exercises._common import Check


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
        got = np.array(array if got is None else got, dtype=np.float64, copy=True)
        builtins = sorted(op for op, s in comm.stats.ops.items() if s.calls and op != "barrier")
        out.append((got, comm.stats.bytes_sent, comm.stats["send"].messages, builtins))
    return out


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
    if p > 1 and all(0 < r.sum() <= -(-n // p) for r in right):
        return (f"{where}, each rank has the full sum in only one chunk (≈ n/p positions): "
                "that is the reduce-scatter half. Now pass the finished chunks around the ring "
                "for p − 1 more steps (the all-gather), copying instead of adding")
    bad = [r for r, ok in enumerate(right) if not ok.all()]
    r = bad[0]
    i = int(np.flatnonzero(~right[r])[0])
    return (f"{where}, rank(s) {bad} end with wrong values; rank {r} is wrong at "
            f"{int((~right[r]).sum())} of {n} positions (first: index {i}, expected "
            f"{want[i]:g}, got {got[r][i]:g}). Check which chunk each step sends and adds")


def check_ring_all_reduce(fn, world_sizes=(1, 2, 3, 4, 5), sizes=(12, 7, 1001, 2, 1, 0),
                          timeout=5.0, seed=0):
    """fn(comm, array) should leave the sum of every rank's `array` on every rank (in place, or
    returned), using only comm.send / comm.recv and sending no more than a ring's
    2(p−1)/p·n bytes per rank. Runs on the thread backend; a hang ends after `timeout` s."""
    from minidist.errors import CommTimeout, WorkerError
    from minidist.launch import run

    name = "check_ring_all_reduce"
    for p in world_sizes:
        try:
            results = run(_ring_trial, p, args=(fn, tuple(sizes), seed), backend="thread",
                          timeout=timeout)
        except CommTimeout as exc:
            return Check(name, False, f"with {_ranks(p)} the run hung until the {timeout} s "
                         f"timeout ({exc}). That is a deadlock: some rank waits in recv for a "
                         "message nobody sends. In each step, first send to the right "
                         "(send never waits), then recv from the left")
        except WorkerError as exc:
            what = str(exc).splitlines()[0].split("failed: ", 1)[-1]
            return Check(name, False, f"with {_ranks(p)}, rank {exc.rank} raised {what}")
        except Exception as exc:  # noqa: BLE001 - a checker reports, never raises
            return Check(name, False, f"with {_ranks(p)} the run failed: "
                                      f"{type(exc).__name__}: {exc}")
        for i, n in enumerate(sizes):
            got, sent, messages, builtins = zip(*(res[i] for res in results), strict=True)
            inputs = [_ring_input(seed, r, n) for r in range(p)]
            want = np.sum(inputs, axis=0) if p > 1 else inputs[0]
            used = sorted(set().union(*builtins))
            if used:
                return Check(name, False, f"your function called comm.{', comm.'.join(used)}; "
                                          "write the ring yourself with comm.send and comm.recv")
            if not all(g.shape == want.shape and np.array_equal(g, want) for g in got):
                return Check(name, False, _diagnose_values(p, n, got, inputs, want))
            limit = 2 * (p - 1) * -(-n // p) * 8  # 2(p−1) chunks of at most ⌈n/p⌉ float64s
            if max(sent) > limit:
                r = int(np.argmax(sent))
                return Check(name, False, f"right values, but with {p} ranks and n = {n} "
                             f"float64s ({8 * n} bytes) rank {r} sent {sent[r]} bytes; a ring "
                             f"sends only 2(p−1)/p·n ≈ {2 * (p - 1) * 8 * n // p} bytes per rank. "
                             "Sending whole arrays (through one rank, or up a tree) is the naive "
                             "all-reduce: split the array into p chunks, one chunk per message")
            if max(messages) > 2 * (p - 1):
                return Check(name, False, f"right values and bytes, but with {p} ranks a rank "
                             f"sent {max(messages)} messages; a ring needs only 2(p−1) = "
                             f"{2 * (p - 1)}: send each step's chunk as one message")
    return Check(name, True, f"the sum on every rank, with ring traffic, for world sizes "
                             f"{tuple(world_sizes)} and sizes {tuple(sizes)}")
