"""Lesson 5's exercises, solved: what a learner is asked to write, in the plainest form.

    shard_weights    rank k's share |B_k|/|B| of the global batch (contiguous shards)
    bucket_slices    the gradient's bucket schedule: contiguous, at most bucket_bytes each
"""


def shard_weights(batch_size, world_size):
    """⌊|B|/p⌋ rows each, and the first |B| mod p ranks one more: w_k = |B_k|/|B|."""
    base, extra = divmod(batch_size, world_size)
    return [(base + (k < extra)) / batch_size for k in range(world_size)]


def bucket_slices(n_params, itemsize, bucket_bytes):
    """⌊bucket_bytes/itemsize⌋ whole elements per bucket, the last one clipped at n_params:
    ⌈n/per⌉ buckets, the fewest that fit."""
    per = bucket_bytes // itemsize
    return [slice(start, min(start + per, n_params)) for start in range(0, n_params, per)]
