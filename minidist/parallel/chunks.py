"""The v model chunks one rank holds under the interleaved 1F1B schedule (virtual stages).

The layers are cut into p·v chunks; rank s of p holds chunks s, s+p, …, s+(v−1)p, so a
micro-batch visits every rank v times on its way through the model. Each chunk is a
ModelShard; all v share ONE flat parameter buffer and ONE gradient buffer, chunk after chunk,

    params = [θ_chunk s | θ_chunk s+p | … ],    index = [index_s | index_{s+p} | … ]

so the optimizer, the data-parallel all-reduce, gather_params and the memory ledger treat a
rank's chunks exactly as they treat one ModelShard. `shards[c]` is local chunk
c, with its forward / backward / loss / save / restore; `slices[c]` is its span of the buffers.
"""

import numpy as np

from minidist.parallel.shard import ModelShard


class StageChunks:
    """Layers bounds[0], bounds[1], … of `model` (each (start, stop)), one ModelShard each,
    split over `tp_comm` (with sequence parallelism or not) like a ModelShard, over one shared
    params / grads buffer."""

    def __init__(self, model, bounds, tp_comm=None, clock=None, algorithm="auto",
                 sequence_parallel=False):
        self.bounds = [(int(a), int(b)) for a, b in bounds]
        self.shards = [ModelShard(model, a, b, tp_comm, clock, algorithm, sequence_parallel)
                       for a, b in self.bounds]
        edges = np.cumsum([0, *(shard.params.size for shard in self.shards)])
        self.slices = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        self.params = np.zeros(int(edges[-1]), model.dtype)
        self.grads = np.zeros_like(self.params)
        for shard, part in zip(self.shards, self.slices, strict=True):
            shard.rebind(self.params[part], self.grads[part])
        self.index = np.concatenate([shard.index for shard in self.shards])
        # the local elements whose gradients the tp group sums (sequence parallelism)
        self.partial = np.concatenate([shard.partial + part.start for shard, part
                                       in zip(self.shards, self.slices, strict=True)])
        self.criterion = self.shards[-1].criterion
        self.full_size = model.num_params

    def __repr__(self):
        inner = ", ".join(f"layers {a}:{b} {shard!r}"
                          for (a, b), shard in zip(self.bounds, self.shards, strict=True))
        return f"StageChunks([{inner}], params={self.params.size})"
