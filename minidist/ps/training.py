"""strategy="parameter_server": the article's distributed gradient descent, on real servers.

Each worker repeats: pull θ, compute the gradient of its share of step t's global batch,
push (|B_k|/|B|)·∇L_k. So the W pushes of one clock add up to the global-batch gradient:
BSP applies their sum once (the same SGD as strategy="single"), ASP and SSP apply each push
as it arrives, on parameters that may be a few updates old.

Memory: History.memory has one dict per worker, in rank order ({} for a worker that died):
its model's θ and ∇ and the weighted gradient it pushes (grads), no optimizer, its
activations. The servers hold θ, the push slots and the optimizer state: per shard, in
History.ps["server_memory"] (ShardServer.memory_bytes). The shared segments are counted
there, once, not in every worker that maps them.
"""

import functools
import os
from collections.abc import Mapping

import numpy as np

from minidist import kernels, memory, ps
from minidist.data import check_integer
from minidist.ps import checkpoint
from minidist.ps import consistency as rules
from minidist.trace import Trace

OPTIONS = {"consistency": "bsp", "staleness": None, "num_servers": 1, "slow_workers": None,
           "elastic": False, "checkpoint_dir": None, "checkpoint_every": 0, "resume": False}


def check_options(options):
    merged = {**OPTIONS, **options}
    rules.check(merged["consistency"], merged["staleness"])
    check_integer("num_servers", merged["num_servers"])
    check_integer("checkpoint_every", merged["checkpoint_every"], minimum=0)
    directory, slow = merged["checkpoint_dir"], merged["slow_workers"]
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a directory path (str or os.PathLike) or None, "
                        f"got {directory!r}")
    if slow is not None and not isinstance(slow, Mapping):
        raise TypeError(f"slow_workers must be a dict {{rank: slowdown factor}} or None, "
                        f"got {slow!r}")


def resume_step(job, workers, options):
    """The first step a resumed run computes: every worker's clock in the checkpoint it will
    restart from (0 without resume, or without one: ps.run says so). A checkpoint past `steps`,
    or written by another number of workers, is a ValueError naming both numbers."""
    directory = options["checkpoint_dir"]
    if not (options["resume"] and directory):
        return 0
    version = checkpoint.latest(directory, options["num_servers"], warn=False)  # ps.run warns
    if version is None:
        return 0
    done = checkpoint.clocks(directory, options["num_servers"], version)
    if len(done) != workers:
        raise ValueError(f"resume=True: the checkpoint in {directory!r} was written by "
                         f"{len(done)} workers, this run has workers={workers}")
    if done.max() > job.steps:
        raise ValueError(f"resume=True: the checkpoint in {directory!r} is at step "
                         f"{done.max()}, past steps={job.steps}; ask for steps >= {done.max()} "
                         "to go on from it, or start afresh in another checkpoint_dir")
    return int(done.min())


def worker(client, job):
    """One worker's training loop; returns ((step, |B_k|/|B|·L_k, |B_k|/|B|) per step it ran,
    its timeline: pull as recv, forward, backward, push as send, and the idle gaps, its
    memory, the servers' memory, its host↔device copies).

    A model on the GPU pulls θ into a host buffer and copies it up, and computes its weighted
    gradient on the device and copies it down to push: one copy each way per step."""
    model = job.model(client.rank)
    on_device = kernels.is_device_array(model.params)
    grad = np.empty(model.grads.shape, model.grads.dtype)  # |B_k|/|B|·∇L_k, what I push
    pulled = np.empty_like(grad) if on_device else model.params
    weighted = kernels.zeros_like(model.grads) if on_device else grad
    copies = {"to_host": 0, "to_device": 0, "bytes": 0}
    rows_done, trace, ledger = [], Trace(), memory.Ledger(job.max_memory_per_rank, client.rank)
    ledger.hold(params=memory.array_bytes(model.params),
                grads=memory.array_bytes(model.grads, grad))
    for t, (rows, weight) in enumerate(job.my_batches(client.rank, client.world_size)):
        if t < client.clock:  # a resumed run: these steps are in the checkpoint
            continue
        trace.step = t
        trace.timed("recv", functools.partial(client.pull, out=pulled))
        if on_device:
            _copy(model.params.copy_to_device, pulled, "to_device", copies)
        loss = trace.timed("forward", model.loss, job.X[rows], job.y[rows])
        memory.track([*model.layers, model.criterion], ledger)
        trace.timed("backward", model.backward)
        kernels.ops_for(weighted).scale_into(weight, model.grads, weighted)
        if on_device:
            _copy(weighted.copy_to_host, grad, "to_host", copies)
        trace.timed("send", client.push, grad, weight)
        rows_done.append((t, loss * weight, weight))
    return (np.array(rows_done, dtype=np.float64).reshape(-1, 3), trace.with_idle(),
            ledger.as_dict(), client.server_memory, copies)


def _copy(copy, host, direction, copies):
    """copy(host): one host↔device copy, counted."""
    copy(host)
    copies[direction] += 1
    copies["bytes"] += host.nbytes


def train_parameter_server(job, workers, backend, timeout):
    """Run `job` on a parameter server; the History of train()."""
    from minidist.train import History, _check_finite

    if backend != "process":
        raise ValueError(f"strategy='parameter_server' runs servers and workers as processes; "
                         f"backend must be 'process', got {backend!r}")
    options = {**OPTIONS, **job.options}
    start = resume_step(job, workers, options)
    params = kernels.to_host(job.model_fn().params)
    result = ps.run(worker, workers, params, optimizer=job.optimizer, lr=job.lr,
                    optimizer_options=job.optimizer_options, timeout=timeout, args=(job,),
                    **options)
    worker_loss = [r and r[0] for r in result.results]  # None for a worker that died
    loss, weight = np.zeros(job.steps), np.zeros(job.steps)
    for rows in worker_loss:
        if rows is not None:
            steps = rows[:, 0].astype(int)
            np.add.at(loss, steps, rows[:, 1])
            np.add.at(weight, steps, rows[:, 2])
    if result.events:  # elastic: a step's loss is the mean over the workers that ran it
        loss = np.divide(loss, weight, out=np.full_like(loss, np.nan), where=weight > 0)
    loss[:start] = np.nan  # computed by the run that wrote the checkpoint
    _check_finite(loss[start:], job.lr, first_step=start)
    first = next(w for w, log in enumerate(result.log) if log is not None)
    step_time, compute_time, comm_time = (np.full(job.steps, np.nan) for _ in range(3))
    log = result.log[first]
    clocks = log[:, 0].astype(int)
    step_time[clocks] = log[:, 4] - log[:, 1]
    compute_time[clocks] = log[:, 3] - log[:, 2]
    comm_time[clocks] = (log[:, 2] - log[:, 1]) + (log[:, 4] - log[:, 3])
    stats = result.stats
    summary = {
        "consistency": options["consistency"], "staleness_bound": options["staleness"],
        "num_servers": options["num_servers"], "events": result.events,
        "wait_time": [s and s["pull"]["seconds"] + s["push"]["seconds"] for s in stats],
        "bytes_pushed": [s and s["push"]["bytes_sent"] for s in stats],
        "bytes_pulled": [s and s["pull"]["bytes_received"] for s in stats],
        "applied": result.applied, "updates": result.updates, "pulls": result.pulls,
        "log": result.log, "worker_loss": worker_loss, "start_step": start,
        "server_memory": next((r[3] for r in result.results if r), []),
        "host_copies": [r[4] if r else {} for r in result.results]}
    return History(strategy="parameter_server", workers=workers, model_fn=job.model_fn,
                   params=result.params, loss=loss, step_time=step_time,
                   compute_time=compute_time, comm_time=comm_time,
                   bytes_sent=summary["bytes_pushed"], backend="process", options=options,
                   stats=stats, staleness=result.staleness, ps=summary,
                   events=[r[1] if r else [] for r in result.results],
                   memory=[r[2] if r else {} for r in result.results])


def loss_over_time(history):
    """(seconds since the first pull, loss) as the workers reported it: after each push, the
    mean of the last W reports' |B_k|/|B|-normalised losses (one global batch's worth)."""
    logs = [log for log in history.ps["log"] if log is not None and len(log)]
    origin = min(log[0, 1] for log in logs)  # process start-up is not training time
    points = []
    for rows, log in zip(history.ps["worker_loss"], history.ps["log"], strict=True):
        if rows is not None:
            points += zip(log[:, 4] - origin, rows[:, 1] / rows[:, 2], strict=True)
    points.sort()
    times = np.array([p[0] for p in points])
    losses = np.array([p[1] for p in points])
    total = np.concatenate([[0.0], np.cumsum(losses)])
    end = np.arange(1, len(losses) + 1)
    start = np.maximum(0, end - history.workers)
    return times, (total[end] - total[start]) / (end - start)


def time_to_loss(history, target):
    """Seconds until the smoothed reported loss first reaches `target` (inf if it never does)."""
    times, losses = loss_over_time(history)
    below = np.flatnonzero(losses <= target)
    return float(times[below[0]]) if len(below) else float("inf")
