"""Pipeline parallelism: the layers cut into p stages, one per rank; the batch into m micro-batches.

Stage s receives activations from s−1, runs its layers forward and sends the result to s+1; on
the way back it receives ∂L/∂(its output) from s+1 and sends ∂L/∂(its input) to s−1. While
micro-batch j is in stage 2, micro-batch j+1 can already be in stage 1: that is the pipeline.

Schedules (the order in which a stage runs forwards F_j and backwards B_j):

    GPipe   F_0 … F_{m−1}, then B_0 … B_{m−1}        keeps all m micro-batches' activations
    1F1B    w = min(p−s−1, m) warm-up forwards, then F, B alternating, then w backwards
            (PipeDream-Flush)                          keeps at most p−s

Both leave stages idle at the start and the end of a step, the bubble: with equal stages,
bubble / total = (p−1)/(m+p−1) (Huang et al. 2019). Micro-batch j's gradient is weighted by
|B_j|/|B| and summed, so one optimizer step per batch gives exactly the full batch's SGD.
"""

import numpy as np

from minidist import memory
from minidist.data import check_integer, is_integer, shard_bounds
from minidist.parallel.shard import activation_bytes

SCHEDULES = ("gpipe", "1f1b")
OPTIONS = {"micro_batches": 4, "schedule": "1f1b", "cuts": None, "algorithm": "auto"}


def schedule_ops(schedule, stage, stages, micro_batches):
    """[("F", j) or ("B", j), …]: what stage `stage` of `stages` runs, in order."""
    m = micro_batches
    if schedule == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    warmup = min(stages - stage - 1, m)
    ops = [("F", j) for j in range(warmup)]
    for j in range(m - warmup):
        ops += [("F", warmup + j), ("B", j)]
    return ops + [("B", j) for j in range(m - warmup, m)]


def bubble_formula(stages, micro_batches):
    """GPipe's idle share of a step with equal stages: (p−1)/(m+p−1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def simulate(schedule, stages, micro_batches, forward=1.0, backward=2.0, send=0.0):
    """The ideal timeline: every F takes `forward` seconds, every B `backward`, a message
    `send`; each stage runs schedule_ops in order, as soon as its input has arrived. Returns
    events per stage in the format of minidist.trace (no measurement: the schedule's shape)."""
    done, clock = {}, [0.0] * stages
    ops = [schedule_ops(schedule, s, stages, micro_batches) for s in range(stages)]
    events, position = [[] for _ in range(stages)], [0] * stages
    while any(position[s] < len(ops[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(ops[s]):
                continue
            op, j = ops[s][position[s]]
            need = ((op, s - 1, j) if op == "F" and s > 0 else ("B", s + 1, j) if op == "B"
                    and s < stages - 1 else ("F", s, j) if op == "B" else None)
            if need is not None and need not in done:
                continue
            ready = 0.0 if need is None else done[need] + (send if need[1] != s else 0.0)
            start = max(clock[s], ready)
            clock[s] = start + (forward if op == "F" else backward)
            done[(op, s, j)] = clock[s]
            events[s].append(("forward" if op == "F" else "backward", start, clock[s], 0, j))
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks with {stages} stages")
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
    if options.get("schedule", "1f1b") not in SCHEDULES:
        raise ValueError(f"unknown schedule {options['schedule']!r}; allowed: "
                         f"{', '.join(SCHEDULES)}")


def run_batch(shard, comm, X, y, rows, weight, micro_batches, schedule, clock, total):
    """One batch, rows `rows` of (X, y), through the pipeline on this stage: leaves the
    weighted sum of the micro-batches' gradients in shard.grads (summed in `total`, a buffer
    shaped like it) and returns Σ_j (|B_j|/|B|)·weight·L_j (0 on all but the last stage) and
    the peak number of micro-batches whose activations were held.

    Micro-batch j is rows[shard_bounds(|rows|, j, m)], gathered from X and y when it starts, so
    a stage holds only the micro-batches in flight. Each time the stash grows, clock.ledger
    sees the bytes held at once: Σ over the stashed micro-batches of the arrays their saved
    states keep (forwards make new arrays, so no two micro-batches share one).
    """
    stage, stages = (0, 1) if comm is None else (comm.rank, comm.world_size)
    first, last = stage == 0, stage == stages - 1
    trace, stash, loss, peak = clock.trace, {}, 0.0, 0
    total[...] = 0.0
    for op, j in schedule_ops(schedule, stage, stages, micro_batches):
        start, stop = shard_bounds(len(rows), j, micro_batches)
        share = weight * (stop - start) / len(rows)
        trace.micro = j
        if op == "F":
            inputs = (X[rows[start:stop]] if first
                      else clock.timed("comm", comm.recv, stage - 1, j))
            if last:
                loss += share * trace.timed("forward", shard.loss, inputs, y[rows[start:stop]])
            else:
                out = trace.timed("forward", shard.forward, inputs)
                clock.timed("comm", comm.send, out, stage + 1, j)
            stash[j] = shard.save()
            clock.ledger.saw(sum(map(activation_bytes, stash.values())))
            peak = max(peak, len(stash))
        else:
            shard.restore(stash.pop(j))
            memory.track([*shard.layers, shard.criterion], clock.ledger,
                         held=sum(map(activation_bytes, stash.values())))
            d_out = (share * shard.criterion.backward() if last
                     else clock.timed("comm", comm.recv, stage + 1, j))
            d_in = trace.timed("backward", _backward_and_add, shard, d_out, total)
            if not first:
                clock.timed("comm", comm.send, np.ascontiguousarray(d_in), stage - 1, j)
    trace.micro = -1
    shard.grads[...] = total
    return loss, peak


def _backward_and_add(shard, d_out, total):
    """Backward of one micro-batch; its (already weighted) gradient added to `total`."""
    d_in = shard.backward(d_out)
    total += shard.grads
    return d_in
