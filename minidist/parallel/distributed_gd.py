"""Distributed gradient descent, as the article lists it, with rank 0 as the server.

    1. the data is split across the workers            -> job.my_batches: my shard of each batch
    2. each worker computes the gradient of its part   -> model.loss_and_grad on my rows
    3. and sends it to the parameter server            -> comm.send(grad, 0)
    4. the server combines the gradients and updates   -> Σ_k (|B_k|/|B|)∇L_k; optimizer.step
    5. and sends the new parameters back               -> comm.send(params, k)
    6. each worker takes the new parameters            -> model.params = comm.recv(0)
    7. repeat until done

Rank 0 is a worker too (its part of the data) and the only rank that holds an optimizer.

Memory: every rank holds the model's θ and ∇ and `grad`, the weighted gradient it sends (on
rank 0, where the gradients are summed): params Ψ, grads 2Ψ values; rank 0 adds the optimizer
state. The received arrays are temporaries of one call, outside the ledger.
"""

import numpy as np

from minidist import memory
from minidist.parallel.job import Clock, report


def worker(comm, job):
    model = job.model_fn()
    server = comm.rank == 0
    optimizer = job.make_optimizer(model.params) if server else None
    grad = np.empty_like(model.grads)  # what I send; on rank 0, the sum of everyone's
    clock, weighted_losses = Clock(job.steps, job.max_memory_per_rank, comm.rank), []
    clock.ledger.hold(params=memory.array_bytes(model.params),
                      grads=memory.array_bytes(model.grads, grad),
                      optimizer=memory.optimizer_bytes(optimizer))
    for t, (rows, weight) in enumerate(job.my_batches(comm.rank, comm.world_size)):
        clock.begin(t)
        if len(rows):  # step 2: the gradient of my part, weighted by its share of the batch
            loss = clock.forward_backward(model, job.X[rows], job.y[rows])
            np.multiply(model.grads, weight, out=grad)
            weighted_losses.append(loss * weight)
        else:
            grad[...] = 0.0
            weighted_losses.append(0.0)
        if server:
            for k in range(1, comm.world_size):  # steps 3-4: collect and combine
                grad += clock.timed("comm", comm.recv, k)
            clock.timed("compute", optimizer.step, grad)
            for k in range(1, comm.world_size):  # step 5: send the new parameters back
                clock.timed("comm", comm.send, model.params, k)
        else:
            clock.timed("comm", comm.send, grad, 0)
            model.params = clock.timed("comm", comm.recv, 0)  # step 6
        clock.end()
    return report(comm, model.params, weighted_losses, clock)
