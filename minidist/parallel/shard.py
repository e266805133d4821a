"""The part of a model one rank holds: layers [start, stop) of a Sequential (a pipeline stage),
each Linear whole or split over a tensor-parallel group (a GPT's embedding, blocks and head
too: parallel.megatron), in this rank's own flat buffers.

`index` says where each local element lives in the full model's flat buffer, so the full
parameters are put back together at the end (`gather_params`) with one rule for every split:
full[index] = local. Elements that several ranks hold (replicas) must agree.
"""

from types import SimpleNamespace

import numpy as np

from minidist import memory
from minidist.nn.layers import walk
from minidist.parallel import megatron
from minidist.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, plan
from minidist.parallel.vocab_parallel import VocabParallelCrossEntropy, VocabParallelHead


def _views(model, flat):
    """Per layer, {name: view of `flat` shaped like that parameter} (the model's layout)."""
    out = []
    for i, layer in enumerate(model.layers):
        out.append({name: flat[model.slices[f"{i}.{name}"]].reshape(shape)
                    for name, shape in layer.param_shapes().items()})
    return out


class ModelShard:
    """Layers [start, stop) of `model`, split over `tp_comm` (None: kept whole).

    forward(X) / backward(dY) run the local layers; the last stage also holds the loss:
    loss(X, y) and backward() with no argument start from it. save() / restore(state) keep one
    micro-batch's cached activations apart from the next one's.

    sequence_parallel (a GPT over tp_comm): the LayerNorms and residuals hold T/t positions;
    `partial` lists the local elements (LayerNorm γ, β) whose gradients the tp group must sum
    after the backward, once per step (empty otherwise).
    """

    def __init__(self, model, start=0, stop=None, tp_comm=None, clock=None, algorithm="auto",
                 sequence_parallel=False):
        stop = len(model.layers) if stop is None else stop
        rank, t = (0, 1) if tp_comm is None else (tp_comm.rank, tp_comm.world_size)
        sequence_parallel = bool(sequence_parallel) and tp_comm is not None
        values = _views(model, model.params)
        where = _views(model, np.arange(model.num_params))
        self.layers, taken = [], []
        for i, kind in plan(model.layers, start, stop) if tp_comm else [
                (i, "whole") for i in range(start, stop)]:
            full = model.layers[i]
            if kind == "column":
                layer = ColumnParallelLinear(full.d_in, full.d_out, tp_comm, clock, algorithm,
                                             input_grad=i > 0)
            elif kind == "row":
                layer = RowParallelLinear(full.d_in, full.d_out, tp_comm, clock, algorithm)
            elif kind in megatron.KINDS:
                layer = megatron.parallel_layer(kind, full, tp_comm, clock, algorithm,
                                                sequence_parallel)
            else:
                layer = full  # kept whole: the same layer, rebound to this shard's buffers
            if kind == "whole":
                taken.append((values[i], where[i]))
            else:
                taken.append((layer.take(**values[i], rank=rank, t=t),
                              layer.take(**where[i], rank=rank, t=t)))
            self.layers.append(layer)
        sizes = [v.size for vals, _ in taken for v in vals.values()]
        self.params = np.zeros(sum(sizes), model.dtype)
        self.grads = np.zeros_like(self.params)
        self.index = np.zeros(sum(sizes), np.int64)
        partial = []
        for layer, (vals, idx), spans in zip(self.layers, taken, self._bind(self.params,
                                                                            self.grads),
                                             strict=True):
            summed = megatron.partial_params(layer) if sequence_parallel else ()
            for name, span in spans.items():
                layer.params[name][...] = vals[name]
                self.index[span] = idx[name].ravel()
                if name in summed:
                    partial.append(np.arange(span.start, span.stop))
        self.partial = np.concatenate(partial) if partial else np.zeros(0, np.int64)
        self.criterion = model.criterion if stop == len(model.layers) else None
        if self.criterion is not None and isinstance(self.layers[-1], VocabParallelHead):
            self.criterion = VocabParallelCrossEntropy(model.layers[-1].d_out, tp_comm, clock,
                                                       algorithm)
        self.full_size = model.num_params

    def __repr__(self):
        return f"ModelShard([{', '.join(map(repr, self.layers))}], params={self.params.size})"

    def forward(self, X):
        for layer in self.layers:
            X = layer.forward(X)
        return X

    def loss(self, X, y):
        """The last stage: forward, then the mean loss of the batch."""
        return self.criterion.forward(self.forward(X), y)

    def backward(self, dY=None):
        """Overwrite `grads`; return ∂L/∂(this shard's input). dY=None: start from the loss."""
        d = self.criterion.backward() if dY is None else dY
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def _parts(self):
        """The local layers, their sublayers (a transformer block's parts) and the loss."""
        return list(walk([*self.layers, self.criterion]))

    def save(self):
        """The cached activations of the last forward, of every layer and sublayer (references:
        forward makes new arrays)."""
        return [dict(vars(part)) for part in self._parts()]

    def restore(self, state):
        for part, saved in zip(self._parts(), state, strict=True):
            vars(part).update(saved)

    def rebind(self, params, grads):
        """Move the parameters into `params` and the gradients into `grads` (1-D, as long as
        `self.params`: slices of a buffer several shards share, parallel.chunks.StageChunks);
        every layer's views follow, in the same layout (layer by layer, param_shapes order)."""
        params[...], grads[...] = self.params, self.grads
        self._bind(params, grads)
        self.params, self.grads = params, grads

    def _bind(self, params, grads):
        """Bind every layer to views of the 1-D `params` and `grads`, layer after layer, each in
        param_shapes order; returns per layer {name: its slice of the buffers}."""
        offset, spans = 0, []
        for layer in self.layers:
            p_views, g_views, mine = {}, {}, {}
            for name, shape in layer.param_shapes().items():
                span = slice(offset, offset + int(np.prod(shape)))
                p_views[name] = params[span].reshape(shape)
                g_views[name] = grads[span].reshape(shape)
                mine[name], offset = span, span.stop
            layer.bind(p_views, g_views)
            spans.append(mine)
        return spans


def activation_bytes(state):
    """Bytes of the activations in a save() state: minidist.memory.activation_bytes of the
    saved parts (each base array once; the parameter and gradient views are not counted)."""
    return memory.activation_bytes([SimpleNamespace(**saved) for saved in state])


def gather_params(comm, shard, tag=2**29):
    """Rank 0 gets the full flat parameters (full[index] = local, over every rank), checking
    that replicas agree; other ranks get None. Call it after report(): not training traffic.
    Who holds what is kept in its own mask, so a NaN parameter (a diverged run) is gathered
    like any other value for train() to report."""
    if comm.rank != 0:
        comm.send(shard.index, 0, tag)
        comm.send(shard.params, 0, tag)
        return None
    full = np.zeros(shard.full_size, shard.params.dtype)
    held = np.zeros(shard.full_size, bool)
    for r in range(comm.world_size):
        index, values = ((shard.index, shard.params) if r == 0
                         else (comm.recv(r, tag), comm.recv(r, tag)))
        again = held[index]
        if not np.allclose(full[index][again], values[again], rtol=1e-9, atol=1e-12,
                           equal_nan=True):
            raise RuntimeError(f"rank {r}'s copy of replicated parameters disagrees with "
                               "another rank's: the replicas drifted apart")
        full[index], held[index] = values, True
    if not held.all():
        raise RuntimeError(f"{int((~held).sum())} parameters are held by no rank")
    return full
