"""Buckets and units: how the flat gradient and parameter buffers are cut for communication.

A bucket is a contiguous slice of the flat buffer, so an all-reduce of it is one call on a view.
`buckets` cuts the buffer blindly into pieces of at most `bucket_bytes` (data parallelism
without overlap: the backward has ended, every gradient is ready). `units` cuts it at layer
boundaries, from the last layer back, because that is the order the backward writes gradients:
a unit is ready the moment the backward of its first layer has run, so its all-reduce (or, in
ZeRO, its reduce-scatter) can start while the layers before it still compute. ZeRO-3 gathers
and frees parameters unit by unit as well.
"""

from dataclasses import dataclass


def buckets(n_params, itemsize, bucket_bytes):
    """Contiguous slices of the flat gradient, each at most bucket_bytes (at least one element)."""
    per_bucket = max(1, bucket_bytes // itemsize)
    return [slice(start, min(start + per_bucket, n_params))
            for start in range(0, n_params, per_bucket)] or [slice(0, 0)]


@dataclass(frozen=True)
class Unit:
    """Layers first..last (inclusive) of a Sequential, whose parameters fill `part` of the flat
    buffer. Its gradients are all written once the backward of layer `first` has run."""

    first: int
    last: int
    part: slice

    @property
    def size(self):
        return self.part.stop - self.part.start


def units(model, bucket_bytes, itemsize=None):
    """The model's layers with parameters, grouped from the last layer back into units of at
    most bucket_bytes (a larger layer is a unit by itself); returned in that order, last layer
    first. bucket_bytes=1 gives one unit per layer with parameters. itemsize: bytes per
    element (default: the model's dtype's)."""
    itemsize = model.dtype.itemsize if itemsize is None else itemsize
    limit = max(1, bucket_bytes // itemsize)
    out, group = [], []  # group: indices of layers with parameters, last first

    def close():
        if group:
            start = model.layer_slices[group[-1]].start
            stop = model.layer_slices[group[0]].stop
            out.append(Unit(group[-1], group[0], slice(start, stop)))
            group.clear()

    for i in reversed(range(len(model.layers))):
        size = model.layer_slices[i].stop - model.layer_slices[i].start
        if size == 0:
            continue
        held = model.layer_slices[group[0]].stop - model.layer_slices[group[-1]].start if group \
            else 0
        if group and held + size > limit:
            close()
        group.append(i)
    close()
    return out
