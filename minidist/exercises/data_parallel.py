"""Lesson 5 (data parallelism): shard weights and gradient buckets."""

import numpy as np

from minidist.exercises._common import Check, _call


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
    """(start, stop) of a slice(start, stop) or a (start, stop) pair; ValueError otherwise."""
    if isinstance(bucket, slice):
        if bucket.step not in (None, 1):
            raise ValueError(f"slice {bucket} has a step; buckets are contiguous")
        return int(bucket.start or 0), int(bucket.stop)
    start, stop = bucket
    return int(start), int(stop)


def check_bucket_slices(fn, cases=((100, 8, 32), (10, 8, 20), (9610, 8, 4096), (7, 8, 8),
                                   (5, 8, 1 << 20), (12, 4, 16), (1, 8, 8), (0, 8, 64))):
    """fn(n_params, itemsize, bucket_bytes) should cut the flat gradient of n_params elements of
    itemsize bytes into contiguous buckets (slices, in order) of at most bucket_bytes each,
    covering every element exactly once, with as few buckets as possible (one message each)."""
    name = "check_bucket_slices"
    for n, itemsize, limit in cases:
        where = f"with n = {n} elements of {itemsize} bytes and buckets of at most {limit} bytes"
        try:
            bounds = [_as_bounds(b) for b in fn(n, itemsize, limit)]
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"{where}, your function raised {type(exc).__name__}: "
                                      f"{exc}. Return a list of slice(start, stop)")
        bounds = [(lo, hi) for lo, hi in bounds if hi > lo]  # empty buckets cost nothing
        per = limit // itemsize
        too_big = [(lo, hi) for lo, hi in bounds if (hi - lo) * itemsize > limit]
        if too_big:
            lo, hi = too_big[0]
            hint = {per + 1: f" Round down: {limit} bytes hold only {per} elements",
                    limit: " bucket_bytes counts bytes, not elements: divide it by itemsize"}
            hint = hint.get(hi - lo, f" A bucket may hold at most {per} elements")
            return Check(name, False, f"{where}, bucket {lo}:{hi} holds {(hi - lo) * itemsize} "
                                      f"bytes.{hint}")
        covered = np.zeros(n, dtype=int)
        for lo, hi in bounds:
            covered[max(lo, 0):min(hi, n)] += 1
        if any(lo < 0 or hi > n for lo, hi in bounds):
            return Check(name, False, f"{where}, a bucket reaches outside 0:{n}: clip the last "
                                      "one at n")
        if (covered > 1).any():
            return Check(name, False, f"{where}, element {int(np.argmax(covered > 1))} is in two "
                                      "buckets: each bucket starts where the previous stops")
        if (covered == 0).any():
            first = int(np.argmax(covered == 0))
            tail = " (the last, partial bucket is missing)" if first > n - per else ""
            return Check(name, False, f"{where}, element {first} is in no bucket{tail}")
        if bounds != sorted(bounds):
            return Check(name, False, f"{where}, list the buckets in order along the buffer")
        fewest = -(-n // per)
        if len(bounds) > fewest:
            return Check(name, False, f"{where}, {len(bounds)} buckets where {fewest} suffice: "
                                      f"fill each one up to {per} elements (one message each)")
    return Check(name, True, f"contiguous buckets, each at most bucket_bytes, covering every "
                             f"element once, for {len(cases)} cases")
