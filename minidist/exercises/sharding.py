"""Lesson 11 (sharding and overlap): the ZeRO-1 step, and the bucket hook of overlapped DDP.

Both checkers train the digits MLP on the thread backend with the learner's piece inside the
loop and compare the parameters with strategy="single" on the same global batches (float64,
up to rounding), then look at how the piece communicated.
"""

import contextlib
import re
import threading
import time

import numpy as np

from minidist.exercises._common import Check, Exercise, _check_timeout, _guarded

SIZES = [64, 24, 10]  # Ψ = 1810: neither 3 nor 4 ranks divide it
STEPS, BATCH, LR, MOMENTUM = 4, 84, 0.1, 0.9


def _problem():
    from minidist import data, nn

    X, y = data.load_digits()
    return (lambda: nn.mlp(SIZES, seed=0)), X, y


def _check_world_sizes(world_sizes, divides=None):
    """world_sizes: a non-empty list of rank counts (each dividing `divides` rows, if given)."""
    sizes = list(world_sizes)
    if not sizes or any(isinstance(p, bool) or not isinstance(p, int) or p < 1
                        or (divides and divides % p) for p in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of integers >= 1"
                         f"{f' that divide the batch of {divides} rows' if divides else ''}, "
                         f"got {world_sizes!r}")
    return sizes


def _reference(model_fn, X, y):
    from minidist import train

    return train(model_fn, X, y, steps=STEPS, batch_size=BATCH, lr=LR,
                 optimizer_options={"momentum": MOMENTUM}).params


def _my_rows(batch, rank, p):
    from minidist.data import shard_bounds

    start, stop = shard_bounds(len(batch), rank, p)
    return batch[start:stop], (stop - start) / len(batch)


def _run(worker, p, timeout):
    """(rank results, None) or (None, the reason the run failed: "rank r raised …")."""
    from minidist.launch import run

    results, failure = _guarded(lambda: run(worker, p, backend="thread", timeout=timeout),
                                timeout)
    if failure:
        failure = re.sub(r"^a rank raised (\w+): rank (\d+) failed: \1: ", r"rank \2 raised \1: ",
                         failure)
    return results, failure


def _zero1_worker(comm, fn, model_fn, X, y):
    from minidist import data, optim

    model, p, r = model_fn(), comm.world_size, comm.rank
    psi = model.num_params
    c = -(-psi // p)
    params = np.zeros(p * c)
    params[:psi] = model.params
    shard = optim.SGD(params[r * c:(r + 1) * c].copy(), LR, momentum=MOMENTUM)
    grads = np.zeros(p * c)
    comm.stats.reset()
    for batch in data.step_batches(len(X), BATCH, STEPS, seed=0):
        rows, weight = _my_rows(batch, r, p)
        model.params = params[:psi]
        model.loss_and_grad(X[rows], y[rows])
        grads[:psi] = weight * model.grads
        fn(comm, params, grads, shard)
    return params[:psi].copy(), comm.stats.as_dict()


def check_zero1_step(fn, world_sizes=(1, 2, 3, 4), timeout=20.0):
    """fn(comm, params, grads, optimizer) should take one ZeRO-1 step on this rank.

    params: the flat θ padded to p·c (c = ⌈Ψ/p⌉), the same on every rank: overwrite it with the
    new θ. grads: this rank's weighted gradient |B_k|/|B|·∇L_k, padded the same way (summed over
    ranks it is the global-batch gradient). optimizer: an SGD whose `params` is this rank's own
    copy of its shard θ[r·c:(r+1)·c] and whose momentum covers only that shard. Trains the
    digits MLP; must equal single-process training and send what ZeRO-1 sends (no all-reduce
    of the whole gradient)."""
    name = "check_zero1_step"
    _check_timeout(timeout)
    world_sizes = _check_world_sizes(world_sizes)
    model_fn, X, y = _problem()
    want, initial = _reference(model_fn, X, y), model_fn().params
    psi = model_fn().num_params
    for p in world_sizes:
        results, failure = _run(lambda comm: _zero1_worker(comm, fn, model_fn, X, y), p, timeout)
        where = f"with p = {p} ranks (Ψ = {psi}, shards of c = {-(-psi // p)})"
        if failure:
            return Check(name, False, f"{where}, {failure}")
        for rank, (got, stats) in enumerate(results):
            if np.array_equal(got, initial):
                return Check(name, False, f"{where}, rank {rank}'s θ is still the initial θ "
                                          f"after {STEPS} steps: params was not changed in "
                                          "place (write params[:] = …; `params = …` only "
                                          "rebinds your local name)")
            if not np.allclose(got, want, rtol=1e-10, atol=1e-12):
                return Check(name, False, f"{where}, rank {rank}'s θ after {STEPS} steps differs "
                                          f"from single-process training by up to "
                                          f"{np.abs(got - want).max():.3g}. "
                                          + _zero1_hint(stats, p))
        used = {op for op, s in results[0][1].items() if s["calls"]}
        if p > 1 and "all_reduce" in used:
            return Check(name, False, f"{where}, the result is right but you all-reduced: that "
                                      "is data parallelism. ZeRO-1 reduce-scatters the gradients "
                                      "(each rank needs only its shard's sum) and all-gathers θ")
        if p > 1 and not {"reduce_scatter", "all_gather"} <= used:
            return Check(name, False, f"{where}, the result is right, but ZeRO-1 moves the "
                                      f"gradients with reduce_scatter and θ with all_gather; you "
                                      f"used {sorted(used)}")
    return Check(name, True, f"equals single-process SGD with momentum on {tuple(world_sizes)} "
                             "ranks, with reduce_scatter and all_gather as ZeRO-1 does")


def _zero1_hint(stats, p):
    if p > 1 and not stats.get("all_gather", {}).get("calls"):
        return ("No all_gather ran: after stepping its shard, every rank must collect the "
                "other ranks' updated shards into params")
    return ("Step the optimizer with your chunk of the reduced gradient, not the whole one, "
            "and copy optimizer.params (the updated shard) into place")


class _Watch:
    """The checker's own hooks around the learner's: when each layer's backward began, and
    when the whole backward ended."""

    def __init__(self, inner):
        self.inner, self.began = inner, {}

    def before_forward(self, i):
        self.inner.before_forward(i)

    def after_forward(self, i):
        self.inner.after_forward(i)

    def before_backward(self, i):
        self.began[i] = time.perf_counter()
        self.inner.before_backward(i)

    def after_backward(self, i):
        self.inner.after_backward(i)


_backward = threading.local()  # .waited: the handles a rank waited on during its backward


@contextlib.contextmanager
def _watch_waits():
    """Inside: Work.wait records, on a rank whose backward is running, the handle waited on
    (thread ranks share the class); restored after, even on error."""
    from minidist.comm.work import Work

    wait = Work.__dict__["wait"]

    def watched(work, timeout=None):
        waited = getattr(_backward, "waited", None)
        if waited is not None:
            waited.append(work)
        return wait(work, timeout)

    Work.wait = watched
    try:
        yield
    finally:
        Work.wait = wait


def _hooks_worker(comm, fn, model_fn, X, y):
    from minidist import data, optim
    from minidist.comm.work import Work
    from minidist.parallel.buckets import units

    model, p, r = model_fn(), comm.world_size, comm.rank
    cuts = units(model, 1)  # one unit per Linear, last first
    buffer = np.zeros(model.num_params)
    opt = optim.SGD(model.params, LR, momentum=MOMENTUM)
    late = []
    for t, batch in enumerate(data.step_batches(len(X), BATCH, STEPS, seed=0)):
        rows, _ = _my_rows(batch, r, p)
        hooks = fn(comm, model, cuts, buffer)
        model.hooks = watch = _Watch(hooks)
        try:
            model.loss(X[rows], y[rows])
            _backward.waited = waited = []
            model.backward()
        finally:
            model.hooks, _backward.waited = None, None
        ended = time.perf_counter()
        handles = list(getattr(hooks, "handles", []))
        if len(handles) != len(cuts):
            return None, f"step {t}: hooks.handles holds {len(handles)} handles, one per unit " \
                         f"({len(cuts)}) expected"
        if not all(isinstance(work, Work) for work in handles):
            kind = next(type(w) for w in handles if not isinstance(w, Work))
            return None, (f"step {t}: hooks.handles holds a {kind.__module__}.{kind.__name__}: "
                          "the handles must be the Work objects comm.all_reduce returns with "
                          "async_op=True (a blocking all-reduce stalls the backward)")
        if waited:
            first = next((u.first for u, w in zip(cuts, handles, strict=True) if w is waited[0]),
                         "?")
            return None, (f"step {t}: you waited for the all-reduce of the unit starting at "
                          f"layer {first} inside the hook: the backward stalled on it. Keep "
                          "the handle and leave the waiting to the caller, after the backward")
        for unit, work in zip(cuts, handles, strict=True):
            work.wait()
            deadline = watch.began.get(unit.first - 1, ended)
            if work.issued is None or work.issued > deadline:
                late.append(unit.first)
        opt.step(buffer)
    return (model.params.copy(), late), None


def check_bucket_hooks(fn, world_sizes=(1, 2, 3), timeout=20.0):
    """fn(comm, model, units, buffer) should return a minidist.nn.UnitHooks whose
    after_backward(i) starts, when i is the `first` layer of a unit, averaging that unit's
    gradients over the ranks into buffer[unit.part] without waiting, and keeps the handles, in
    launch order, in a list `handles`. The checker runs forward and backward with the hooks,
    waits for the handles, steps on `buffer` and compares with single-process training; each
    all-reduce must start before the backward reaches the layer below its unit, and no handle
    may be waited on during the backward."""
    name = "check_bucket_hooks"
    _check_timeout(timeout)
    world_sizes = _check_world_sizes(world_sizes, divides=BATCH)  # equal shards: op="mean"
    model_fn, X, y = _problem()
    want = _reference(model_fn, X, y)
    for p in world_sizes:
        with _watch_waits():
            results, failure = _run(lambda comm: _hooks_worker(comm, fn, model_fn, X, y), p,
                                    timeout)
        where = f"with p = {p} ranks"
        if failure:
            return Check(name, False, f"{where}, {failure}")
        for rank, (result, problem) in enumerate(results):
            if problem:
                return Check(name, False, f"{where}, rank {rank}: {problem}")
            got, late = result
            if not np.allclose(got, want, rtol=1e-10, atol=1e-12):
                return Check(name, False, f"{where}, θ after {STEPS} steps differs from "
                                          f"single-process training by up to "
                                          f"{np.abs(got - want).max():.3g}: copy model.grads of "
                                          "the unit's slice into buffer before launching, and "
                                          "average (op='mean')")
            if late:
                return Check(name, False, f"{where}, the all-reduce of the unit starting at layer "
                                          f"{late[0]} was launched after the backward had moved "
                                          "on: launch it in after_backward of the unit's first "
                                          "layer, the moment its last gradient is written")
    return Check(name, True, f"equals single-process training on {tuple(world_sizes)} ranks, each "
                             "bucket launched while the backward went on")


__all__ = ["check_zero1_step", "check_bucket_hooks"]

EXERCISES = (
    Exercise(11, "my_zero1_step", check_zero1_step, "zero1_step",
             "one ZeRO-1 step (each rank steps its shard of θ, with ZeRO-1's traffic), run every "
             "step of a digits MLP's training on 1 to 4 thread ranks"),
    Exercise(11, "MyBucketHooks", check_bucket_hooks, "BucketHooks",
             "the bucket hooks of overlapped data parallelism, launching each unit's async "
             "all-reduce during the backward on 1 to 3 thread ranks"),
)
