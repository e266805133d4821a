"""Pipeline parallelism: the layers cut into p stages, one per rank; the batch into m micro-batches.

Stage s receives activations from s−1, runs its layers forward and sends the result to s+1; on
the way back it receives ∂L/∂(its output) from s+1 and sends ∂L/∂(its input) to s−1. While
micro-batch j is in stage 2, micro-batch j+1 can already be in stage 1: that is the pipeline.

Schedules (the order in which a stage runs forwards F_j and backwards B_j):

    GPipe   F_0 … F_{m−1}, then B_0 … B_{m−1}        keeps all m micro-batches' activations
    1F1B    w = min(p−s−1, m) warm-up forwards, then F, B alternating, then w backwards
            (PipeDream-Flush)                          keeps at most p−s
    interleaved_1f1b   (Narayanan et al. 2021; Megatron-LM's
            forward_backward_pipelining_with_interleaving) the layers cut into p·v chunks,
            rank s holding chunks s, s+p, …, s+(v−1)p (its v virtual stages). Of a rank's
            m·v virtual steps, forward step k runs local chunk (k // p) mod v, backward step k
            chunk v−1−(k // p) mod v, both on micro-batch ⌊k/(p·v)⌋·p + k mod p; warm-up
            w = min(2(p−s−1) + (v−1)p, m·v) forwards (all m·v when m = p), then F, B
            alternating, then w backwards. Needs m divisible by p. Keeps at most min(w+1, m·v)
            chunk-micro-batches, each 1/v of the stage.

All three leave stages idle at the start and the end of a step, the bubble: with equal stages,
bubble / total = (p−1)/(m+p−1) (Huang et al. 2019); interleaving makes each F and B 1/v as
long, so it shrinks to (p−1)/(v·m+p−1). Micro-batch j's gradient is weighted by |B_j|/|B| and
summed, so one optimizer step per batch gives exactly the full batch's SGD.
"""

import numpy as np

from minidist import memory
from minidist.data import check_integer, is_integer, shard_bounds
from minidist.nn.moe import aux_loss, moe_layers
from minidist.parallel.shard import activation_bytes

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
OPTIONS = {"micro_batches": 4, "schedule": "1f1b", "chunks": 1, "cuts": None,
           "algorithm": "auto"}


def schedule_ops(schedule, stage, stages, micro_batches, chunks=1):
    """What stage `stage` of `stages` runs, in order: ("F", j) or ("B", j) for "gpipe" and
    "1f1b"; ("F", j, c) or ("B", j, c) for "interleaved_1f1b", c the LOCAL chunk 0 … v−1
    (global chunk c·p + stage)."""
    m, p, v = micro_batches, stages, chunks
    check_chunks(schedule, v)
    if schedule == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    if schedule == "1f1b":
        return _one_f_one_b([("F", j) for j in range(m)], [("B", j) for j in range(m)],
                            min(p - stage - 1, m))
    check_micro_batches(m, p)
    steps = range(m * v)
    micro = [k // (p * v) * p + k % p for k in steps]
    forward = [("F", micro[k], k // p % v) for k in steps]
    backward = [("B", micro[k], v - 1 - k // p % v) for k in steps]
    warmup = m * v if m == p else min(2 * (p - stage - 1) + (v - 1) * p, m * v)
    return _one_f_one_b(forward, backward, warmup)


def _one_f_one_b(forward, backward, warmup):
    """`warmup` forwards, then one forward and one backward in turn, then the rest backward."""
    ops = forward[:warmup]
    for f, b in zip(forward[warmup:], backward, strict=False):
        ops += [f, b]
    return ops + backward[len(forward) - warmup:]


def _virtual_ops(schedule, stage, stages, micro_batches, chunks):
    """schedule_ops as (op, j, local chunk) for every schedule (chunk 0 unless interleaved)."""
    return [(*op, 0)[:3] for op in schedule_ops(schedule, stage, stages, micro_batches, chunks)]


def _needs(op, j, g, last):
    """What op ("F" or "B") of micro-batch j on global chunk g needs first, as (kind, global
    chunk, micro-batch), or None: the input from chunk g−1, or the gradient from chunk g+1 (the
    last chunk: its own forward)."""
    if op == "F":
        return ("F", g - 1, j) if g > 0 else None
    return ("B", g + 1, j) if g < last else ("F", g, j)


def _waits(ops, position, done, p, last):
    """What every stuck stage of a deadlocked timeline waits for, in words."""
    waits = []
    for s in range(p):
        if position[s] < len(ops[s]):
            op, j, c = ops[s][position[s]]
            kind, g, _ = _needs(op, j, c * p + s, last)
            waits.append(f"stage {s} waits at its op {position[s]}, {(op, j, c)}, for the "
                         f"{'forward' if kind == 'F' else 'backward'} of micro-batch {j} "
                         f"through global chunk {g} (stage {g % p}'s local chunk {g // p})")
    return "; ".join(waits)


def check_chunks(schedule, chunks):
    """schedule must be one of SCHEDULES; chunks an integer >= 1, above 1 only interleaved."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    check_integer("chunks", chunks)
    if chunks > 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"chunks={chunks} needs schedule='interleaved_1f1b': schedule="
                         f"{schedule!r} runs one chunk per stage (chunks=1)")


def check_micro_batches(micro_batches, stages):
    """The interleaved schedule (as Megatron-LM) needs m to be a multiple of p."""
    if micro_batches % stages:
        raise ValueError(f"schedule='interleaved_1f1b' needs micro_batches divisible by the "
                         f"{stages} pipeline stages, got micro_batches={micro_batches}")


def bubble_formula(stages, micro_batches, chunks=1):
    """The idle share of a step with equal chunks: (p−1)/(v·m + p−1); GPipe's and 1F1B's
    (p−1)/(m+p−1) for v = 1. Narayanan et al. (2021) state it as the bubble over the ideal
    (busy) time, (1/v)·(p−1)/m."""
    return (stages - 1) / (chunks * micro_batches + stages - 1)


def simulate(schedule, stages, micro_batches, forward=1.0, backward=2.0, send=0.0, chunks=1):
    """The ideal timeline: every chunk's F takes forward/v seconds, its B backward/v, a message
    `send`; each stage runs schedule_ops in order, as soon as its input has arrived. Returns
    events per stage in the format of minidist.trace (no measurement: the schedule's shape)."""
    p, v = stages, chunks
    last, done, clock = p * v - 1, {}, [0.0] * p
    ops = [_virtual_ops(schedule, s, p, micro_batches, v) for s in range(p)]
    events, position = [[] for _ in range(p)], [0] * p
    while any(position[s] < len(ops[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(ops[s]):
                continue
            op, j, c = ops[s][position[s]]
            g = c * p + s  # the global chunk (virtual stage)
            need = _needs(op, j, g, last)
            if need is not None and need not in done:
                continue
            ready = 0.0 if need is None else done[need] + (send if need[1] % p != s else 0.0)
            start = max(clock[s], ready)
            clock[s] = start + (forward if op == "F" else backward) / v
            done[(op, g, j)] = clock[s]
            events[s].append(("forward" if op == "F" else "backward", start, clock[s], 0, j))
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks with {stages} stages: "
                               + _waits(ops, position, done, p, last))
    return events


def balanced_cuts(counts, stages):
    """Cut points [c_1 … c_{p−1}]: stage s runs layers c_s … c_{s+1}−1, no stage empty, the
    largest stage's parameter count as small as it can be (ties: later cuts, so an activation
    stays with the Linear before it)."""
    n = len(counts)
    if stages > n:
        raise ValueError(f"cannot cut {n} layers into {stages} pipeline stages: more stages "
                         "than layers")
    prefix = np.concatenate([[0], np.cumsum(counts)])
    best = {(0, 0): (0, None)}  # (layers used, stages used) -> (largest stage, previous cut)
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            largest, j = min((max(best[(j, k - 1)][0], prefix[i] - prefix[j]), -j)
                             for j in range(k - 1, i) if (j, k - 1) in best)
            best[(i, k)] = (largest, -j)
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = best[(i, k)][1]
        cuts.append(i)
    return sorted(cuts)[1:]


def stage_bounds(model, stages, cuts=None):
    """[(start, stop)] of layers for every stage: from explicit `cuts`, else balanced."""
    n = len(model.layers)
    if cuts is None:
        counts = [sum(int(np.prod(s)) for s in layer.param_shapes().values())
                  for layer in model.layers]
        cuts = balanced_cuts(counts, stages)
    cuts = [int(c) for c in cuts]
    if len(cuts) != stages - 1 or cuts != sorted(set(cuts)) or (cuts and not 0 < cuts[0]
                                                                 <= cuts[-1] < n):
        raise ValueError(f"cuts must be {stages - 1} increasing layer indices in (0, {n}) for "
                         f"{stages} stages of {n} layers, got {cuts}")
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def check_options(options):
    check_integer("micro_batches", options.get("micro_batches", 1))
    cuts = options.get("cuts")
    if cuts is not None and not (isinstance(cuts, (list, tuple, np.ndarray))
                                 and all(map(is_integer, cuts))):
        raise TypeError(f"cuts must be None or a list of layer indices (integers), got {cuts!r}")
    check_chunks(options.get("schedule", "1f1b"), options.get("chunks", 1))


def run_batch(shard, comm, X, y, rows, weight, micro_batches, schedule, clock, total):
    """One batch, rows `rows` of (X, y), through the pipeline on this stage: leaves the
    weighted sum of the micro-batches' gradients in shard.grads (summed in `total`, a buffer
    shaped like it) and returns Σ_j (|B_j|/|B|)·weight·L_j (this stage's part of it: the
    cross-entropy on the last stage, the load-balancing losses of its mixture-of-experts blocks) and
    the peak number of (chunk, micro-batch) activations held at once.

    shard: a ModelShard (one chunk), or for "interleaved_1f1b" a chunks.StageChunks, whose
    local chunk c is global chunk g = c·p + s: its forward goes to rank (s+1) mod p (global
    chunk g+1), its backward to rank (s−1) mod p, tagged by direction, receiving chunk and
    micro-batch so no message meets the wrong op (sends do not wait for the receiver).

    Micro-batch j is rows[shard_bounds(|rows|, j, m)], gathered from X and y when it starts, so
    a stage holds only the micro-batches in flight. Each time the stash grows, clock.ledger
    sees the bytes held at once: Σ over the stashed chunk-micro-batches of the arrays their
    saved states keep (forwards make new arrays, so no two share one).
    """
    stage, stages = (0, 1) if comm is None else (comm.rank, comm.world_size)
    parts, spans = getattr(shard, "shards", [shard]), getattr(shard, "slices", [slice(None)])
    m, last = micro_batches, stages * len(parts) - 1
    trace, stash, loss, peak = clock.trace, {}, 0.0, 0
    total[...] = 0.0
    for op, j, c in _virtual_ops(schedule, stage, stages, m, len(parts)):
        start, stop = shard_bounds(len(rows), j, m)
        share = weight * (stop - start) / len(rows)
        part, g = parts[c], c * stages + stage
        trace.micro = j
        if op == "F":
            inputs = (X[rows[start:stop]] if g == 0 else
                      clock.timed("comm", comm.recv, (stage - 1) % stages, _tag("F", g, j, m)))
            if g == last:
                loss += share * trace.timed("forward", part.loss, inputs, y[rows[start:stop]])
            else:
                out = trace.timed("forward", part.forward, inputs)
                clock.timed("comm", comm.send, out, (stage + 1) % stages,
                            _tag("F", g + 1, j, m))
            loss += share * aux_loss(part.layers)  # a mixture of experts' load-balancing loss
            stash[c, j] = part.save()
            clock.ledger.saw(sum(map(activation_bytes, stash.values())))
            peak = max(peak, len(stash))
        else:
            part.restore(stash.pop((c, j)))
            memory.track([*part.layers, part.criterion], clock.ledger,
                         held=sum(map(activation_bytes, stash.values())))
            d_out = (share * part.criterion.backward() if g == last else
                     clock.timed("comm", comm.recv, (stage + 1) % stages, _tag("B", g, j, m)))
            d_in = trace.timed("backward", _backward_and_add, part, d_out, total[spans[c]],
                               share)
            if g > 0:
                clock.timed("comm", comm.send, np.ascontiguousarray(d_in),
                            (stage - 1) % stages, _tag("B", g - 1, j, m))
    trace.micro = -1
    shard.grads[...] = total
    return loss, peak


def _tag(op, chunk, micro, micro_batches):
    """The message tag of what global chunk `chunk` receives for micro-batch `micro`: its input
    (op "F") or the gradient of its output ("B")."""
    return 2 * (chunk * micro_batches + micro) + (op == "B")


def _backward_and_add(shard, d_out, total, share):
    """Backward of one micro-batch; its (already weighted) gradient added to `total`. Its MoE
    layers seed their load-balancing loss with the same weight `share` (MoE.loss_weight)."""
    experts = moe_layers(shard.layers)
    for layer in experts:
        layer.loss_weight = share
    try:
        d_in = shard.backward(d_out)
    finally:
        for layer in experts:
            del layer.loss_weight  # the class's 1 again
    total += shard.grads
    return d_in
