"""Lesson 5 (data parallelism): shard weights (a formula), and the bucket schedule that drives a
real data-parallel run.

check_bucket_slices looks at the learner's buckets on their own first (in order, contiguous,
none over the cap, every element once, as few as possible), then makes them THE bucket
schedule of strategy="data_parallel" on 2, 3 and 4 thread ranks: the run must train as one
process does (float64, 1e-10), and every rank's comm.stats must show one ring all-reduce per
bucket per step, with exactly the bytes the ring moves for that bucket (cost.bytes_per_rank).
"""

import contextlib
import functools
import operator

import numpy as np

from minidist.exercises._common import (
    Check,
    Exercise,
    _brief,
    _call,
    _check_timeout,
    _differs,
    _train,
)

MLP_SIZES = [6, 8, 3]  # 83 parameters: the run's flat gradient
RUN = {"steps": 3, "batch_size": 12, "lr": 0.1}
BUCKET_BYTES = 160  # 20 float64 per bucket: 4 full buckets and one of 3


def check_shard_weights(fn, cases=((12, 4), (10, 4), (7, 3), (5, 5), (64, 1), (13, 8), (100, 7))):
    """fn(batch_size, world_size) should return rank k's weight |B_k|/|B| for every rank, where
    the batch is cut into contiguous shards as minidist.data.shard_bounds cuts it: the first
    |B| mod p ranks get one row more."""
    from minidist.data import shard_bounds

    name = "check_shard_weights"
    for batch, p in cases:
        sizes = np.array([hi - lo for lo, hi in (shard_bounds(batch, k, p) for k in range(p))])
        want = sizes / batch
        got, failed = _call(name, fn, batch, p)
        if failed is not None:
            return failed
        got = got.reshape(-1)
        where = f"with |B| = {batch} rows on p = {p} ranks (shards of {sizes.tolist()} rows)"
        if got.shape != want.shape:
            return Check(name, False, f"{where}, return one weight per rank ({p}), "
                                      f"got {got.size}")
        if np.allclose(got, want, rtol=1e-12, atol=1e-15):
            continue
        if np.allclose(got, sizes):
            return Check(name, False, f"{where}, you returned the shard sizes {sizes.tolist()}; "
                                      f"divide by |B| = {batch} so that the weights sum to 1")
        if np.allclose(got, 1 / p):
            return Check(name, False, f"{where}, every rank got 1/p; that is right only when p "
                                      f"divides |B|. Weight rank k by its own share |B_k|/|B|")
        if np.allclose(np.sort(got), np.sort(want)):
            return Check(name, False, f"{where}, right weights, wrong ranks: the first "
                                      f"|B| mod p = {batch % p} ranks hold the extra rows")
        if not np.isclose(got.sum(), 1.0):
            return Check(name, False, f"{where}, the weights sum to {got.sum():.4g}, not 1: "
                                      "every row of the batch must be counted exactly once. "
                                      "Did integer division drop the remainder?")
        return Check(name, False, f"{where}, expected {np.round(want, 4).tolist()}, "
                                  f"got {np.round(got, 4).tolist()}")
    return Check(name, True, f"|B_k|/|B| for {len(cases)} batches, even and uneven")


def _as_bounds(bucket):
    """(start, stop) of a slice(start, stop) or a (start, stop) pair of integers; TypeError or
    ValueError otherwise."""
    if isinstance(bucket, slice):
        if bucket.step not in (None, 1):
            raise ValueError(f"slice {bucket} has a step; buckets are contiguous")
        return operator.index(bucket.start or 0), operator.index(bucket.stop)
    start, stop = bucket
    return operator.index(start), operator.index(stop)


def _slices_problem(fn, cases):
    """The first thing wrong in fn's buckets for (n, itemsize, bucket_bytes) in cases, or None."""
    for n, itemsize, limit in cases:
        where = f"with n = {n} elements of {itemsize} bytes and buckets of at most {limit} bytes"
        try:
            result = fn(n, itemsize, limit)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return (f"{where}, your function raised {type(exc).__name__}: {exc}. Return a "
                    "list of slice(start, stop)")
        try:
            result = list(result)
        except Exception as exc:  # noqa: BLE001 - not a list, or a generator that raised
            return (f"{where}, your function returned {_brief(result)}, not a list of buckets "
                    f"({type(exc).__name__}: {exc})")
        bounds = []
        for k, bucket in enumerate(result):
            try:
                bounds.append(_as_bounds(bucket))
            except Exception as exc:  # noqa: BLE001 - a bucket of the wrong kind
                return (f"{where}, bucket {k} is {_brief(bucket)}: each bucket must be a "
                        f"slice(start, stop) or (start, stop) with integer ends ({exc})")
        bounds = [(lo, hi) for lo, hi in bounds if hi > lo]  # empty buckets cost nothing
        per = limit // itemsize
        too_big = [(lo, hi) for lo, hi in bounds if (hi - lo) * itemsize > limit]
        if too_big:
            lo, hi = too_big[0]
            hint = {per + 1: f" Round down: {limit} bytes hold only {per} elements",
                    limit: " bucket_bytes counts bytes, not elements: divide it by itemsize"}
            hint = hint.get(hi - lo, f" A bucket may hold at most {per} elements")
            return f"{where}, bucket {lo}:{hi} holds {(hi - lo) * itemsize} bytes.{hint}"
        covered = np.zeros(n, dtype=int)
        for lo, hi in bounds:
            covered[max(lo, 0):min(hi, n)] += 1
        if any(lo < 0 or hi > n for lo, hi in bounds):
            return f"{where}, a bucket reaches outside 0:{n}: clip the last one at n"
        if (covered > 1).any():
            return (f"{where}, element {int(np.argmax(covered > 1))} is in two buckets: each "
                    "bucket starts where the previous stops")
        if (covered == 0).any():
            first = int(np.argmax(covered == 0))
            tail = " (the last, partial bucket is missing)" if first > n - per else ""
            return f"{where}, element {first} is in no bucket{tail}"
        if bounds != sorted(bounds):
            return f"{where}, list the buckets in order along the buffer"
        fewest = -(-n // per)
        if len(bounds) > fewest:
            return (f"{where}, {len(bounds)} buckets where {fewest} suffice: fill each one up "
                    f"to {per} elements (one message each)")
    return None


@contextlib.contextmanager
def bucket_schedule(fn, record=None):
    """Inside: strategy="data_parallel" (overlap=False) cuts its gradient into the buckets
    fn(n_params, itemsize, bucket_bytes) returns, slices or (start, stop) pairs, on every
    thread rank (they share the module); each call's buckets are appended to `record` if
    given. Restored after, even on error."""
    from minidist.parallel import data_parallel

    original = data_parallel.buckets

    def buckets(n_params, itemsize, bucket_bytes):
        cut = [slice(*_as_bounds(b)) for b in fn(n_params, itemsize, bucket_bytes)]
        if record is not None:
            record.append(cut)
        return cut

    data_parallel.buckets = buckets
    try:
        yield
    finally:
        data_parallel.buckets = original


def _stats_problem(hist, cut, p):
    """None if every rank's comm.stats shows one ring all-reduce per bucket per step with the
    ring's bytes for that bucket, else what differs."""
    from minidist import cost

    steps = RUN["steps"]
    sizes = [b.stop - b.start for b in cut]
    want = [sum(cost.bytes_per_rank("all_reduce", "ring", m, 8, p)[r][0] for m in sizes) * steps
            for r in range(p)]
    for rank, stats in enumerate(hist.stats):
        got = stats.get("all_reduce", {"calls": 0, "bytes_sent": 0})
        if got["calls"] != steps * len(cut):
            return (f"rank {rank} made {got['calls']} all-reduce calls in {steps} steps; "
                    f"{len(cut)} buckets make {steps * len(cut)}")
        if got["bytes_sent"] != want[rank]:
            return (f"rank {rank} sent {got['bytes_sent']} bytes in all-reduces; the ring "
                    f"sends {want[rank]} for buckets of {sizes} elements")
    return None


def check_bucket_slices(fn, cases=((100, 8, 32), (10, 8, 20), (9610, 8, 4096), (7, 8, 8),
                                   (5, 8, 1 << 20), (12, 4, 16), (1, 8, 8), (0, 8, 64)),
                        world_sizes=(2, 3, 4), timeout=30.0):
    """fn(n_params, itemsize, bucket_bytes) -> contiguous buckets (slices, in order) of at most
    bucket_bytes each, covering the flat gradient's n_params elements of itemsize bytes once,
    as few as possible (one message each). First on their own for (n, itemsize, bucket_bytes)
    in `cases`; then as the bucket schedule of a data-parallel MLP (83 float64 parameters,
    buckets of 160 bytes) on each of `world_sizes` thread ranks, which must train as one
    process does (1e-10), one ring all-reduce per bucket per step with the ring's bytes."""
    from minidist import data, nn, train

    name = "check_bucket_slices"
    cases = [tuple(case) for case in cases]
    if not cases or any(len(case) != 3 or not all(data.is_integer(x) for x in case)
                        or case[0] < 0 or case[1] < 1 or case[2] < case[1] for case in cases):
        raise ValueError(f"cases must be a non-empty list of (n_params >= 0, itemsize >= 1, "
                         f"bucket_bytes >= itemsize), integers, got {cases!r}")
    sizes = list(world_sizes)
    if not sizes or any(not data.is_integer(p) or p < 2 for p in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts >= 2, got "
                         f"{world_sizes!r}")
    _check_timeout(timeout)
    problem = _slices_problem(fn, cases)
    if problem:
        return Check(name, False, problem)
    X, y = data.make_classification(48, MLP_SIZES[0], MLP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, MLP_SIZES, seed=1)
    n = model_fn().num_params
    single = train(model_fn, X, y, **RUN)
    for p in sizes:
        record = []
        with bucket_schedule(fn, record):
            hist, failure = _train(model_fn, X, y, timeout, strategy="data_parallel", workers=p,
                                   algorithm="ring", bucket_bytes=BUCKET_BYTES, **RUN)
        where = (f"driving a data-parallel run on p = {p} ranks (n = {n} float64, buckets of "
                 f"{BUCKET_BYTES} bytes)")
        if failure is None and not record:
            failure = "the run never asked for your buckets"
        if failure is None and any(cut != record[0] for cut in record):
            failure = "your function gave different ranks different buckets"
        if failure is None:
            wrong = _slices_problem(fn, [(n, 8, BUCKET_BYTES)])
            failure = "; ".join(filter(None, (wrong, _differs(hist, single)))) or \
                _stats_problem(hist, record[0], p)
        if failure:
            return Check(name, False, f"{where}: {failure}")
    return Check(name, True, f"contiguous buckets, each at most bucket_bytes, covering every "
                             f"element once, for {len(cases)} cases; as the bucket schedule of "
                             f"real data-parallel runs on p = {', '.join(map(str, sizes))} ranks "
                             f"they train as one process, one all-reduce per bucket")


__all__ = ["check_shard_weights", "check_bucket_slices"]

EXERCISES = (
    Exercise(5, "my_shard_weights", check_shard_weights, "shard_weights",
             "rank k's weight in the global gradient (its share of the batch), for even and "
             "uneven shards",
             kind="formula"),
    Exercise(5, "my_bucket_slices", check_bucket_slices, "bucket_slices",
             "the gradient's bucket schedule, driving real data-parallel runs on 2–4 thread "
             "ranks (one ring all-reduce per bucket, training equal to one process)"),
)
