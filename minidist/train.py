"""One entry point for every strategy: train(model_fn, X, y, strategy=...) -> History.

Every step t uses the same global batch (data.step_batches with `seed`), whatever the strategy
and worker count, so each synchronous strategy can be checked against strategy="single".
"""

import time
from dataclasses import dataclass, field

import numpy as np

from minidist import data, kernels, memory, optim
from minidist.arguments import check_arguments
from minidist.parallel import (
    context_parallel,
    data_parallel,
    distributed_gd,
    expert_parallel,
    hybrid,
    pipeline,
    tensor_parallel,
    zero,
)
from minidist.parallel.job import Job
from minidist.precision import LOSS_SCALE, MixedPrecision
from minidist.ps import training as parameter_server

# strategy -> (the function each rank runs, its options with defaults, their validator)
STRATEGIES = {
    "single": (None, {}, None),
    "distributed_gd": (distributed_gd.worker, {}, None),
    "data_parallel": (data_parallel.worker, data_parallel.OPTIONS, data_parallel.check_options),
    "parameter_server": (parameter_server.worker, parameter_server.OPTIONS,
                         parameter_server.check_options),
    "tensor_parallel": (hybrid.tensor_parallel_worker, tensor_parallel.OPTIONS,
                        tensor_parallel.check_options),
    "pipeline": (hybrid.pipeline_worker, pipeline.OPTIONS, pipeline.check_options),
    "hybrid": (hybrid.worker, hybrid.OPTIONS, hybrid.check_options),
    "zero": (zero.worker, zero.OPTIONS, zero.check_options),
    "context_parallel": (context_parallel.worker, context_parallel.OPTIONS,
                         context_parallel.check_options),
    "expert_parallel": (expert_parallel.worker, expert_parallel.OPTIONS,
                        expert_parallel.check_options),
}
# strategy -> check(model_fn, workers, batch_size, options, data_shape): shapes that cannot be split
JOB_CHECKS = {"data_parallel": data_parallel.check_job,
              "tensor_parallel": hybrid.check_tensor_parallel,
              "pipeline": hybrid.check_pipeline, "hybrid": hybrid.check_job,
              "zero": zero.check_model, "context_parallel": context_parallel.check_job,
              "expert_parallel": expert_parallel.check_job}


@dataclass
class History:
    """What a training run leaves behind: final parameters and per-step measurements.

    params: the final parameters (fp16/bf16: the fp32 master weights). loss: the global-batch
    mean loss per step (unscaled; a skipped step's too). step_time, compute_time, comm_time:
    rank 0's seconds per step (comm_time: what its communication took, an async op from when
    it started to when it finished). exposed_comm_time: rank 0's seconds per step blocked on
    communication, a blocking call's whole time and an async op's only what its wait blocked
    (data_parallel with overlap=True: what the step waited after its backward); comm_time
    where a strategy only blocks, zeros for "single". bytes_sent: each rank's payload bytes
    over the training (stats: the same per operation: bytes, messages, calls, seconds).
    precision: "fp64", "fp32", "fp16" or "bf16"; loss_scale: the loss scale S each step
    used (1 but for fp16); skipped_steps: the steps fp16 skipped for an inf or NaN gradient.
    memory: per rank, the bytes it held (minidist.memory.Ledger.as_dict: params, grads,
    optimizer, activations, peak); parameter_server: one dict per worker, in rank order ({}
    for a worker that died), and the servers' shards in ps["server_memory"].
    """

    strategy: str
    workers: int
    model_fn: object
    params: np.ndarray
    loss: np.ndarray
    step_time: np.ndarray
    compute_time: np.ndarray
    comm_time: np.ndarray
    bytes_sent: list = field(default_factory=list)
    backend: str = "none"
    options: dict = field(default_factory=dict)
    stats: list = field(default_factory=list)  # per rank: comm.stats.as_dict() of the training
    staleness: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per applied
    ps: dict = field(default_factory=dict)  # gradient; parameter_server's waits, bytes, events
    events: list = field(default_factory=list)  # per rank: (name, start, end, step, micro)
    details: list = field(default_factory=list)  # per rank: what the strategy measured
    precision: str = "fp64"
    loss_scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    skipped_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    memory: list = field(default_factory=list)
    exposed_comm_time: np.ndarray = None  # None: comm_time (a strategy that only blocks)

    def __post_init__(self):
        if self.exposed_comm_time is None:
            self.exposed_comm_time = np.array(self.comm_time, dtype=np.float64)

    def model(self):
        """A fresh model holding the final parameters."""
        model = self.model_fn()
        model.params = self.params
        return model

    def accuracy(self, X, y):
        """Fraction of correct class predictions of the final model."""
        return self.model().accuracy(X, y)

    def timeline(self, ax=None, steps=None):
        """A Gantt chart of every rank's events (minidist.viz.gantt); returns the axes."""
        from minidist import viz

        return viz.gantt(self.events, ax=ax, steps=steps,
                         title=f"{self.strategy} ({self.workers} workers)")

    def save_trace(self, path):
        """Write the events as Chrome trace-event JSON (open in ui.perfetto.dev)."""
        from minidist import trace

        return trace.save_chrome_trace(self.events, path)

    def plot(self, ax=None, label=None):
        """The loss curve, on `ax` or a new figure; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.loss, label=label or f"{self.strategy} ({self.workers} workers)")
        ax.set(xlabel="step", ylabel="training loss (batch mean)")
        ax.legend()
        return ax


def train(model_fn, X, y, strategy="single", workers=1, backend="process", steps=100,
          batch_size=64, lr=0.1, optimizer="sgd", seed=0, optimizer_options=None,
          progress=False, timeout=600.0, precision=None, loss_scale=LOSS_SCALE,
          max_memory_per_rank=None, **strategy_options):
    """Train model_fn() on (X, y) for `steps` steps of `batch_size` samples with `strategy`.

    lr is a number or a schedule (minidist.optim.linear_warmup); optimizer_options go to the
    optimizer (momentum, weight_decay for "sgd"; betas, eps for "adam"). backend and timeout
    apply to the multi-rank strategies (see minidist.launch.run). precision: "fp64", "fp32",
    "fp16" or "bf16" (None: the model's dtype); fp16 and bf16 (strategy "single" or
    "data_parallel", a float32 model) compute in 16 bits over fp32 master weights, fp16 with
    dynamic loss scaling from loss_scale (minidist.precision). max_memory_per_rank: None, or
    the bytes each rank may hold, a simulated device's memory: a rank that would hold more
    raises minidist.OutOfMemory (before training when the plan shows it). Every argument and
    the data are checked before any step runs; a run that diverges raises, naming the step.
    """
    X, y, optimizer_options, precision = check_arguments(
        STRATEGIES, JOB_CHECKS, model_fn, X, y, strategy, workers, backend, steps, batch_size,
        lr, optimizer, seed, optimizer_options, progress, timeout, strategy_options, precision,
        loss_scale, max_memory_per_rank)
    if strategy == "single":
        history = _train_single(model_fn, X, y, steps, batch_size, lr, optimizer,
                                optimizer_options, seed, progress, precision, loss_scale,
                                max_memory_per_rank)
    else:
        history = _train_ranks(model_fn, X, y, strategy, workers, backend, steps, batch_size,
                               lr, optimizer, optimizer_options, seed, progress, timeout,
                               strategy_options, precision, loss_scale, max_memory_per_rank)
    history.precision = precision
    if not np.all(np.isfinite(history.params)):
        raise ValueError(f"the parameters became non-finite in the last step ({steps - 1}, "
                         f"lr={lr}); training diverged: try a smaller learning rate")
    return history


def _train_ranks(model_fn, X, y, strategy, workers, backend, steps, batch_size, lr, optimizer,
                 optimizer_options, seed, progress, timeout, strategy_options, precision,
                 loss_scale, max_memory_per_rank):
    from minidist.launch import run

    worker, defaults, _ = STRATEGIES[strategy]
    options = dict(strategy_options)
    if strategy == "data_parallel":  # the one multi-rank strategy with 16-bit precision
        options.update(precision=precision, loss_scale=loss_scale)
    job = Job(model_fn, X, y, steps, batch_size, lr, optimizer, optimizer_options, seed,
              options, progress=f"{strategy} ×{workers}" if progress else "",
              max_memory_per_rank=max_memory_per_rank)
    if strategy == "parameter_server":
        history = parameter_server.train_parameter_server(job, workers, backend, timeout)
        history.loss_scale = np.ones(steps)
        return history
    ranks = run(worker, workers, args=(job,), backend=backend, timeout=timeout)
    first = ranks[0]
    _check_finite(first["loss"], lr)
    return History(strategy=strategy, workers=workers, model_fn=model_fn,
                   params=first["params"], loss=first["loss"], step_time=first["step_time"],
                   compute_time=first["compute_time"], comm_time=first["comm_time"],
                   exposed_comm_time=first.get("exposed_comm_time"),
                   bytes_sent=[r["bytes_sent"] for r in ranks], backend=backend,
                   options={**defaults, **strategy_options}, stats=[r["stats"] for r in ranks],
                   events=[r.get("events", []) for r in ranks],
                   details=[r.get("details", {}) for r in ranks],
                   loss_scale=first.get("loss_scale", np.ones(steps)),
                   skipped_steps=first.get("skipped_steps", np.zeros(0, np.int64)),
                   memory=[r.get("memory", {}) for r in ranks])


def _check_finite(losses, lr, first_step=0):
    """Raise at the first non-finite loss; losses[i] is the loss of step first_step + i."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise ValueError(f"the loss became {losses[bad[0]]} at step {first_step + bad[0]} "
                         f"(lr={lr}); "
                         "training diverged: try a smaller learning rate")


def _train_single(model_fn, X, y, steps, batch_size, lr, optimizer, optimizer_options, seed,
                  progress, precision, loss_scale, max_memory_per_rank):
    """The reference: one process, the whole global batch each step."""
    model = model_fn()
    mixed = MixedPrecision(model, lambda params: optim.make(optimizer, params, lr,
                                                            **optimizer_options),
                           precision, loss_scale)
    ledger = memory.Ledger(max_memory_per_rank, rank=0)
    mixed.hold(ledger)
    batches = data.step_batches(len(X), batch_size, steps, seed)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, desc="single", leave=False, disable=None)
    loss, step_time = np.zeros(steps), np.zeros(steps)
    with mixed.running():
        for t, idx in enumerate(batches):
            start = time.perf_counter()
            loss[t] = model.loss(X[idx], y[idx])
            memory.track([*model.layers, model.criterion], ledger)
            model.backward()
            _check_finite(loss[t:t + 1], mixed.optimizer.lr, first_step=t)
            mixed.step(model.grads)
            step_time[t] = time.perf_counter() - start
    return History(strategy="single", workers=1, model_fn=model_fn,
                   params=kernels.to_host(mixed.params),
                   loss=loss, step_time=step_time, compute_time=step_time.copy(),
                   comm_time=np.zeros(steps), bytes_sent=[0], memory=[ledger.as_dict()],
                   **mixed.record())
