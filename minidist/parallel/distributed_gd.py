"""Distributed gradient descent, as the article lists it, with rank 0 as the server.

    1. the data is split across the workers            -> data.shard_bounds: my part of each batch
    2. each worker computes the gradient of its part   -> model.loss_and_grad on my rows
    3. and sends it to the parameter server            -> comm.send(grad, 0)
    4. the server combines the gradients and updates   -> combine(grads, sizes); optimizer.step
    5. and sends the new parameters back               -> comm.send(params, k)
    6. each worker takes the new parameters            -> model.params = comm.recv(0)
    7. repeat until done

Rank 0 is a worker too (its part of the data) and the only rank that holds an optimizer. A
worker sends its MEAN gradient ∇L_k; the server knows every part's size |B_k| from the batch's
shard bounds (data.shard_bounds), so the sizes need no message of their own.

Memory: every rank holds the model's θ and ∇ and `grad` (a worker's copy of what it sends; on
rank 0, the combined gradient): params Ψ, grads 2Ψ values; rank 0 adds the optimizer state.
The received arrays are temporaries of one step's combine, outside the ledger.
"""

import numpy as np

from minidist import data, memory
from minidist.parallel.job import Clock, report


def combine(grads, sizes):
    """The global-batch gradient from the parts' mean gradients: ∇L = Σ_k (|B_k| / |B|) ∇L_k,
    grads[k] = ∇L_k over sizes[k] = |B_k| rows (lessons 01 and 04 swap in the learner's)."""
    total = sum(sizes)
    return sum((n_k / total) * g_k for g_k, n_k in zip(grads, sizes, strict=True))


def worker(comm, job):
    model = job.model_fn()
    server, p = comm.rank == 0, comm.world_size
    optimizer = job.make_optimizer(model.params) if server else None
    grad = np.empty_like(model.grads)  # what I send; on rank 0, the combined gradient
    clock, weighted_losses = Clock(job.steps, job.max_memory_per_rank, comm.rank), []
    clock.ledger.hold(params=memory.array_bytes(model.params),
                      grads=memory.array_bytes(model.grads, grad),
                      optimizer=memory.optimizer_bytes(optimizer))
    for t, batch in enumerate(job.global_batches(comm.rank)):
        clock.begin(t)
        bounds = [data.shard_bounds(len(batch), k, p) for k in range(p)]
        rows = batch[slice(*bounds[comm.rank])]
        if len(rows):  # step 2: the mean gradient of my part
            loss = clock.forward_backward(model, job.X[rows], job.y[rows])
            np.copyto(grad, model.grads)
            weighted_losses.append(loss * len(rows) / len(batch))
        else:
            grad[...] = 0.0
            weighted_losses.append(0.0)
        if server:
            grads = [grad] + [clock.timed("comm", comm.recv, k) for k in range(1, p)]  # step 3
            sizes = [stop - start for start, stop in bounds]
            grad[...] = combine(grads, sizes)  # step 4: combine ...
            clock.timed("compute", optimizer.step, grad)  # ... and update
            for k in range(1, p):  # step 5: send the new parameters back
                clock.timed("comm", comm.send, model.params, k)
        else:
            clock.timed("comm", comm.send, grad, 0)
            model.params = clock.timed("comm", comm.recv, 0)  # step 6
        clock.end()
    return report(comm, model.params, weighted_losses, clock)
