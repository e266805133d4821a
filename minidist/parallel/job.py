"""What every rank of a distributed training run needs, and what it reports back.

The global batch of step t is the same for every strategy and worker count
(data.step_batches); rank k of p takes rows shard_bounds(|B|, k, p) of it. A rank's mean
gradient is weighted by |B_k|/|B|, so summing over ranks gives the global-batch gradient:

    ∇L(θ) = Σ_k (|B_k| / |B|) ∇L_k(θ)
"""

import time
from dataclasses import dataclass, field

import numpy as np

from minidist import data, kernels, memory, optim
from minidist.comm import ALGORITHMS, custom
from minidist.trace import Trace


@dataclass
class Job:
    model_fn: object
    X: np.ndarray
    y: np.ndarray
    steps: int
    batch_size: int
    lr: object
    optimizer: str
    optimizer_options: dict
    seed: int
    options: dict = field(default_factory=dict)
    progress: str = ""  # a progress-bar label, shown by rank 0; "" for none
    max_memory_per_rank: int = None  # bytes a rank may hold (memory.Ledger); None: no limit

    def my_batches(self, rank, world_size, replica_size=1):
        """(indices of my shard of the global batch, its weight |B_k|/|B|), step by step.
        replica_size: the consecutive ranks that share one shard (a context-parallel ring):
        rank r takes shard k = r // replica_size of the world_size / replica_size replicas."""
        replica, replicas = rank // replica_size, world_size // replica_size
        for batch in self.global_batches(rank):
            start, stop = data.shard_bounds(len(batch), replica, replicas)
            yield batch[start:stop], (stop - start) / len(batch)

    def global_batches(self, rank):
        """The whole global batch of every step (model parallelism does not split it)."""
        batches = data.step_batches(len(self.X), self.batch_size, self.steps, self.seed)
        if self.progress and rank == 0:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=self.steps, desc=self.progress, leave=False,
                           disable=None)
        return batches

    def model(self, rank):
        """model_fn(), built as rank `rank`: a cuda model goes on GPU rank mod count."""
        kernels.bind_rank(rank)
        return self.model_fn()

    def make_optimizer(self, params):
        return optim.make(self.optimizer, params, self.lr, **self.optimizer_options)


def check_algorithm(options, allowed=ALGORITHMS, scope=None, note=""):
    """A ValueError, naming the allowed ones, unless options["algorithm"] (default "auto") is
    one of `allowed`, the all-reduce algorithms a strategy runs, or a function of yours that
    comm.all_reduce runs (minidist.comm.custom); scope: for what (the message says "for
    {scope}"), note: a reason appended to the list."""
    name = options.get("algorithm", "auto")
    if callable(name):
        _check_custom(name, options)
    elif name not in allowed:
        raise ValueError(f"unknown all-reduce algorithm {name!r}"
                         f"{f' for {scope}' if scope else ''}; allowed: {', '.join(allowed)}"
                         f"{note}")


def _check_custom(fn, options):
    """Your all-reduce sums the gradient; compression and local SGD send something else (an
    all-gather of encoded messages, an average of parameters), so they cannot run it."""
    for option, value, plain in (("compression", options.get("compression"), None),
                                 ("local_steps", options.get("local_steps", 1), 1)):
        if value != plain:
            raise ValueError(f"algorithm={custom.name(fn)} (your all-reduce) sums the gradient, "
                             f"but {option}={value!r} sends something else, which your "
                             f"function cannot run; use {option}={plain!r} with it")


EVENTS = {"all_reduce": "all_reduce", "send": "send", "recv": "recv", "step": "optimizer"}


class Clock:
    """Per-step wall, compute and communication seconds on this rank, its timeline (`trace`:
    every timed call becomes an event named by `event=` or after the function) and its memory
    (`ledger`: the worker says what it holds with ledger.hold; forward_backward records the
    activations).

    comm counts the seconds communication ran, exposed the seconds the step was blocked on it:

        blocking call (timed("comm", ...)):   comm += its seconds,   exposed += the same
        async op (wait(work)):                comm += finished − started,
                                              exposed += max(0, finished − the wait's call)

    so a step whose async ops ran beneath its backward has exposed < comm. (An async op's
    exposed time ends at its finish, not when the waiting thread wakes up after it: that
    scheduling lag is no communication.) Wait for a step's async ops before its next blocking
    call (which would wait for them too, and count it)."""

    def __init__(self, steps, budget=None, rank=None):
        self.compute, self.comm, self.step = np.zeros(steps), np.zeros(steps), np.zeros(steps)
        self.exposed = np.zeros(steps)
        self.t, self.started = 0, 0.0
        self.trace = Trace()
        self.ledger = memory.Ledger(budget, rank)
        self.parts = []  # the layers and loss of the model forward_backward runs

    def begin(self, t):
        self.t, self.started = t, time.perf_counter()
        self.trace.step = t

    def end(self):
        self.step[self.t] = time.perf_counter() - self.started

    def timed(self, kind, fn, *args, event=None):
        """fn(*args), its seconds added to this step's `kind` ("compute" or "comm")."""
        start = time.perf_counter()
        result = fn(*args)
        end = time.perf_counter()
        getattr(self, kind)[self.t] += end - start
        if kind == "comm":  # blocked on it the whole time
            self.exposed[self.t] += end - start
        name = event or EVENTS.get(getattr(fn, "__name__", ""), kind)
        self.trace.add(name, start, end)
        return result

    def wait(self, work):
        """work.wait() for an async op (a comm call's async_op=True handle); returns its result.
        This step's exposed communication grows by the seconds the wait blocked until the op
        finished (0 if it had), its communication by the op's own finished − started, and the
        op becomes a trace event named after the collective, from its start to its finish."""
        start = time.perf_counter()
        result = work.wait()
        self.exposed[self.t] += max(0.0, work.finished - start)
        self.comm[self.t] += work.finished - work.started
        self.trace.add(work.name, work.started, work.finished)
        return result

    def forward_backward(self, model, X, y):
        """model.loss_and_grad(X, y) as two timed events, forward (with the loss) and backward."""
        self.parts = [*model.layers, model.criterion]
        loss = self.timed("compute", model.loss, X, y, event="forward")
        memory.track(self.parts, self.ledger)
        self.timed("compute", model.backward, event="backward")
        return loss

    def moment(self, transient=0):
        """Show the ledger this moment, from inside forward_backward: what the model's layers
        keep for backward now, and `transient` bytes beside them (ring attention's blocks in
        flight)."""
        self.ledger.saw(memory.activation_bytes(self.parts), transient)


def merge_stats(comm, groups):
    """Add the sub-communicators' counters to the rank's own, operation by operation (before
    report: a rank's bytes are those of all its groups)."""
    for group in groups:
        for op, counts in group.stats.ops.items():
            total = comm.stats[op]
            for name, value in vars(counts).items():
                setattr(total, name, getattr(total, name) + value)


def report(comm, params, weighted_losses, clock):
    """What a rank returns to train(). The bytes are the training's own: taken before the one
    all-reduce that adds up the per-step losses Σ_k (|B_k|/|B|) L_k for the History (done once
    at the end, not every step, so the bookkeeping does not disturb the timings)."""
    stats = comm.stats.as_dict()
    bytes_sent = comm.stats.bytes_sent
    losses = comm.all_reduce(np.array(weighted_losses, dtype=np.float64), algorithm="ring")
    return {"params": kernels.to_host(params), "loss": losses, "step_time": clock.step,
            "compute_time": clock.compute, "comm_time": clock.comm,
            "exposed_comm_time": clock.exposed,
            "bytes_sent": bytes_sent, "stats": stats, "events": clock.trace.with_idle(),
            "memory": clock.ledger.as_dict()}
