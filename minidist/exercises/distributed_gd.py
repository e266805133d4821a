"""Lesson 4 (distributed gradient descent): the protocol itself, over send and recv.

The learner writes what every rank runs: rank 0 is the server (and a worker with a part of its
own), the workers send it their mean gradient and their part's size, the server combines them
with the library's `minidist.parallel.distributed_gd.combine`, steps and sends θ back. The
checker runs it with minidist.run on 1 … 4 thread ranks with parts of unequal sizes and judges
what it does: θ on every rank after every step against full-batch gradient descent (1e-10),
the messages each rank sent, and a hang (a timeout that names which rank waited for what).
"""

import numpy as np

from minidist.exercises._common import Check, Exercise, _check_timeout, _guarded

PART_SIZES = (5, 2, 7, 3)  # rank k of p holds PART_SIZES[k] rows: never all equal
D, LR, STEPS = 3, 0.2, 4


def _problem(p):
    """(X, y, the parts' bounds, θ₀) of a regression problem cut into p uneven parts."""
    rng = np.random.default_rng(p)
    sizes = PART_SIZES[:p]
    X = rng.normal(size=(sum(sizes), D))
    y = X @ rng.normal(size=D) + 0.1 * rng.normal(size=len(X))
    ends = np.cumsum((0, *sizes))
    return X, y, [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)], \
        rng.normal(size=D)


def _gradient(theta, X, y):
    return X.T @ (X @ theta - y) / len(y)


def _on_rank(comm, fn, X, y, bounds, theta0, lr, steps):
    """What the learner's function returned on this rank, and the messages it sent, by op."""
    start, stop = bounds[comm.rank]
    thetas = fn(comm, X[start:stop].copy(), y[start:stop].copy(), theta0.copy(), lr, steps)
    return thetas, {op: s["messages"] for op, s in comm.stats.as_dict().items()}


def _ranks(p):
    return f"{p} rank{'s' * (p > 1)}"


def _trajectories(results, steps):
    """([rank][step] θ arrays, None), or (None, what is wrong with what fn returned)."""
    out = []
    for rank, (thetas, _) in enumerate(results):
        if isinstance(thetas, (list, tuple)) and len({id(t) for t in thetas}) < len(thetas):
            return None, (f"rank {rank} returned the same array object for several steps: θ "
                          f"was changed in place (theta -= …) after it was appended, so every "
                          f"entry shows the last θ. Append a copy (thetas.append(theta.copy())), "
                          f"or make a new θ each step (theta = theta - …)")
        try:
            arrays = [np.asarray(t, dtype=np.float64) for t in thetas]
        except (TypeError, ValueError):
            return None, (f"rank {rank} returned {type(thetas).__name__}; return the list of the "
                          f"θ it held after each of the {steps} steps")
        if len(arrays) != steps or any(a.shape != (D,) for a in arrays):
            return None, (f"rank {rank} returned {len(arrays)} arrays of shapes "
                          f"{sorted({a.shape for a in arrays})}; return one θ of shape ({D},) "
                          f"per step, {steps} in all")
        out.append(arrays)
    return out, None


def _first_wrong_theta(trajectories, X, y, bounds, theta0, lr):
    """The first (step, rank) whose θ is not full-batch GD's, in words (None: all right)."""
    p = len(bounds)
    sizes = [b - a for a, b in bounds]
    theta = theta0
    for t in range(len(trajectories[0])):
        grads = [_gradient(theta, X[a:b], y[a:b]) for a, b in bounds]
        want = theta - lr * _gradient(theta, X, y)
        for rank in range(p):
            got = trajectories[rank][t]
            if np.allclose(got, want, rtol=1e-10, atol=1e-12):
                continue
            where = (f"on {_ranks(p)} (parts of {sizes} rows), rank {rank}'s θ after step "
                     f"{t + 1} is {np.round(got, 6)}, full-batch GD's is {np.round(want, 6)}")
            hints = [
                (theta, "the θ before the step: " + (
                    "the server must step before it sends θ back" if rank else
                    "the server must take its step, θ − η·combine(grads, sizes)")),
                (theta - lr * np.mean(grads, axis=0),
                 "a step with the plain mean of the gradients: pass combine the sizes the "
                 "workers sent (the parts are unequal)"),
                (theta - lr * grads[rank], "a step with this rank's own gradient only: " + (
                    "a worker must adopt the θ the server sends back" if rank else
                    "the server's step must combine every worker's gradient — receive each "
                    "worker's gradient and size in the order they were sent (the gradient "
                    "first, then the size)")),
                (theta - _gradient(theta, X, y), "the learning rate is missing"),
            ]
            for wrong, hint in hints:
                if np.allclose(got, wrong, rtol=1e-10, atol=1e-12):
                    return f"{where}; yours is {hint}"
            return where
        theta = want
    return None


def _wrong_messages(results, steps):
    """A message if some rank sent another number of messages than the protocol's."""
    p = len(results)
    for rank, (_, sent) in enumerate(results):
        others = sorted(set(sent) - {"send", "recv"})
        if others:
            return (f"rank {rank} used {', '.join(others)}: this exercise builds the protocol "
                    f"from comm.send and comm.recv alone")
        want = (p - 1) * steps if rank == 0 else 2 * steps
        if sent.get("send", 0) != want:
            role = (f"the server sends θ to each worker ({p - 1}) once a step" if rank == 0
                    else "a worker sends two messages a step, its gradient and its size")
            return (f"on {_ranks(p)}, rank {rank} sent {sent.get('send', 0)} messages in {steps} "
                    f"steps, the protocol {want}: {role}")
    return None


def check_distributed_gd(fn, world_sizes=(1, 2, 3, 4), timeout=10.0):
    """fn(comm, X_part, y_part, theta, lr, steps) -> [θ after step 1, …, θ after step `steps`]
    on every rank, for the half-MSE L = (1/2N)‖Xθ − y‖² over all ranks' rows. Each step, every
    rank computes the mean gradient of its part; a worker (rank ≥ 1) sends it to rank 0, then
    its size |B_k| as a one-element array, and receives θ; rank 0 receives both from every
    worker, steps θ − η·combine(grads, sizes) (minidist.parallel.distributed_gd.combine) and
    sends θ to every worker. Run on p thread ranks, parts of unequal sizes, for each p of
    world_sizes: θ must be full-batch GD's on every rank after every step (1e-10), with
    2·steps messages from a worker, (p − 1)·steps from the server, and no hang."""
    from minidist import run

    name = "check_distributed_gd"
    try:
        sizes = list(world_sizes)
    except TypeError:
        sizes = None
    if not sizes or any(isinstance(p, bool) or not isinstance(p, int) or
                        not 1 <= p <= len(PART_SIZES) for p in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts in 1 … "
                         f"{len(PART_SIZES)}, got {world_sizes!r}")
    _check_timeout(timeout)
    for p in sizes:
        X, y, bounds, theta0 = _problem(p)
        results, failure = _guarded(lambda p=p, X=X, y=y, bounds=bounds, theta0=theta0: run(
            _on_rank, p, args=(fn, X, y, bounds, theta0, LR, STEPS), backend="thread",
            timeout=timeout), timeout)
        if failure:
            hint = (": every recv needs a matching send — a worker sends its gradient and its "
                    "size, then waits for θ; the server receives both from every worker, then "
                    "sends θ to each" if failure.startswith("the ranks hung") else "")
            return Check(name, False, f"on {_ranks(p)}: {failure}{hint}")
        trajectories, problem = _trajectories(results, STEPS)
        problem = problem or _wrong_messages(results, STEPS) or _first_wrong_theta(
            trajectories, X, y, bounds, theta0, LR)
        if problem:
            return Check(name, False, problem)
    return Check(name, True, f"every rank follows full-batch gradient descent step by step, "
                             f"with the protocol's messages, on p = "
                             f"{', '.join(map(str, sizes))} ranks (unequal parts)")


__all__ = ["check_distributed_gd"]

EXERCISES = (
    Exercise(4, "my_distributed_gd", check_distributed_gd, "distributed_gd",
             "the distributed-GD protocol over send/recv (gradients and sizes to the server, θ "
             "back), run on 1–4 thread ranks with unequal parts"),
)
