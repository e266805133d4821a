"""ZeRO's layout: how a rank's shard is cut from the flat buffer, and how a unit's layers are
pointed at a buffer of the unit's (`bind`) or let go of it (`freed`, `release`).

The flat buffer is cut into units (buckets.units: layer-aligned, last layer first, at most
bucket_bytes each). A unit of u elements is padded with zeros to N·c, c = ⌈u/N⌉, and rank r owns
its chunk r, elements [r·c, (r+1)·c). The rank's shard is its chunks of all units end to end,
Σ c_u elements; the optimizer steps that array alone, which is exact because SGD and Adam act
elementwise (the padding: θ = 0 and ∇ = 0, it stays 0). A reduce-scatter of unit k's padded
gradient, split into N rows of c_k, hands rank r its chunk; an all-gather of the chunks stacks
the N rows back into the padded unit.
"""

import numpy as np


class Layout:
    """Units padded to N·c_u (c_u = ⌈u/N⌉); rank r owns chunk r of each; its shard is those
    chunks end to end: unit k's chunk is shard[chunk(k)]."""

    def __init__(self, unit_list, world_size, rank, dtype):
        self.units, self.n, self.rank, self.dtype = unit_list, world_size, rank, np.dtype(dtype)
        self.c = [-(-unit.size // world_size) for unit in unit_list]
        self.offsets = np.concatenate([[0], np.cumsum(self.c, dtype=np.int64)]).astype(int)
        self.size = int(self.offsets[-1])

    def chunk(self, k):
        return slice(self.offsets[k], self.offsets[k + 1])

    def zeros(self, k=None):
        """A zero shard (k None), or unit k padded: N·c_k zeros."""
        return np.zeros(self.size if k is None else self.n * self.c[k], self.dtype)

    def shard_of(self, flat):
        """My chunks of the full buffer `flat`, padded with zeros: a new shard array."""
        out = self.zeros()
        for k, unit in enumerate(self.units):
            lo = min(self.rank * self.c[k], unit.size)
            hi = min(lo + self.c[k], unit.size)
            out[self.offsets[k]:self.offsets[k] + hi - lo] = flat[unit.part][lo:hi]
        return out


def bind(model, unit, side, flat):
    """Point `unit`'s layers' params (side 0) or grads (side 1) into `flat`, the unit's buffer
    (padded: its first unit.size elements; `freed` lets the buffer go)."""
    for i in range(unit.first, unit.last + 1):
        part = model.layer_slices[i]
        if part.stop > part.start:
            views = [None, None]
            views[side] = flat[part.start - unit.part.start:part.stop - unit.part.start]
            model.bind_layer(i, *views)


def freed(size, dtype):
    """What a released view points at: `size` NaNs in one element's memory, read-only (a
    stray read shows as NaN, a stray write raises)."""
    return np.broadcast_to(np.array(np.nan, dtype), (size,))


def release(model, unit_list, side):
    """Re-point every unit's layers' params (side 0) or grads (side 1) at `freed` and drop the
    model's own flat buffer, so nothing holds it any more."""
    for unit in unit_list:
        bind(model, unit, side, freed(unit.size, model.dtype))
    model.release(("params", "grads")[side])
