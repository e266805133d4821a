"""Lesson 4's exercise, solved: what a learner is asked to write, in the plainest form.

    distributed_gd   the protocol every rank runs: gradients and sizes to rank 0, θ back
"""

import numpy as np

from minidist.parallel.distributed_gd import combine


def distributed_gd(comm, X_part, y_part, theta, lr, steps):
    """Rank 0 serves (and works on its own part); every rank returns θ after each step."""
    thetas = []
    for _ in range(steps):
        grad = X_part.T @ (X_part @ theta - y_part) / len(y_part)  # my part's mean gradient
        if comm.rank == 0:
            grads, sizes = [grad], [len(y_part)]
            for k in range(1, comm.world_size):
                grads.append(comm.recv(k))
                sizes.append(int(comm.recv(k)[0]))
            theta = theta - lr * combine(grads, sizes)
            for k in range(1, comm.world_size):
                comm.send(theta, k)
        else:
            comm.send(grad, 0)
            comm.send(np.array([len(y_part)], dtype=np.float64), 0)
            theta = comm.recv(0)
        thetas.append(theta)
    return thetas
