"""One entry point for every strategy: train(model_fn, X, y, strategy=...) -> History.

Every step t uses the same global batch (data.step_batches with `seed`), whatever the strategy
and worker count, so each synchronous strategy can be checked against strategy="single".
"""

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from minidist import data, kernels, nn, optim
from minidist.launch import BACKENDS
from minidist.parallel import data_parallel, distributed_gd, hybrid, pipeline, tensor_parallel
from minidist.parallel.job import Job
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
}
# strategy -> check(model_fn, workers, batch_size, options): shapes that cannot be split
JOB_CHECKS = {"tensor_parallel": hybrid.check_tensor_parallel,
              "pipeline": hybrid.check_pipeline, "hybrid": hybrid.check_job}


@dataclass
class History:
    """What a training run leaves behind: final parameters and per-step measurements.

    loss: the global-batch mean loss per step. step_time, compute_time, comm_time: rank 0's
    seconds per step. bytes_sent: each rank's payload bytes over the training (stats: the same
    per operation: bytes, messages, calls, seconds).
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
          progress=False, timeout=600.0, **strategy_options):
    """Train model_fn() on (X, y) for `steps` steps of `batch_size` samples with `strategy`.

    lr is a number or a schedule (minidist.optim.linear_warmup); optimizer_options go to the
    optimizer (momentum, weight_decay for "sgd"; betas, eps for "adam"). backend and timeout
    apply to the multi-rank strategies (see minidist.launch.run). Every argument and the data
    are checked before any step runs; a run that diverges raises, naming the step.
    """
    X, y, optimizer_options = _check_arguments(
        model_fn, X, y, strategy, workers, backend, steps, batch_size, lr, optimizer, seed,
        optimizer_options, progress, timeout, strategy_options)
    if strategy == "single":
        history = _train_single(model_fn, X, y, steps, batch_size, lr, optimizer,
                                optimizer_options, seed, progress)
    else:
        history = _train_ranks(model_fn, X, y, strategy, workers, backend, steps, batch_size,
                               lr, optimizer, optimizer_options, seed, progress, timeout,
                               strategy_options)
    if not np.all(np.isfinite(history.params)):
        raise ValueError(f"the parameters became non-finite in the last step ({steps - 1}, "
                         f"lr={lr}); training diverged: try a smaller learning rate")
    return history


def _train_ranks(model_fn, X, y, strategy, workers, backend, steps, batch_size, lr, optimizer,
                 optimizer_options, seed, progress, timeout, strategy_options):
    from minidist.launch import run

    worker, defaults, _ = STRATEGIES[strategy]
    job = Job(model_fn, X, y, steps, batch_size, lr, optimizer, optimizer_options, seed,
              dict(strategy_options), progress=f"{strategy} ×{workers}" if progress else "")
    if strategy == "parameter_server":
        return parameter_server.train_parameter_server(job, workers, backend, timeout)
    ranks = run(worker, workers, args=(job,), backend=backend, timeout=timeout)
    first = ranks[0]
    _check_finite(first["loss"], lr)
    return History(strategy=strategy, workers=workers, model_fn=model_fn,
                   params=first["params"], loss=first["loss"], step_time=first["step_time"],
                   compute_time=first["compute_time"], comm_time=first["comm_time"],
                   bytes_sent=[r["bytes_sent"] for r in ranks], backend=backend,
                   options={**defaults, **strategy_options}, stats=[r["stats"] for r in ranks],
                   events=[r.get("events", []) for r in ranks],
                   details=[r.get("details", {}) for r in ranks])


def _check_finite(losses, lr, first_step=0):
    """Raise at the first non-finite loss; losses[i] is the loss of step first_step + i."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise ValueError(f"the loss became {losses[bad[0]]} at step {first_step + bad[0]} "
                         f"(lr={lr}); "
                         "training diverged: try a smaller learning rate")


def _check_arguments(model_fn, X, y, strategy, workers, backend, steps, batch_size, lr,
                     optimizer, seed, optimizer_options, progress, timeout, strategy_options):
    """A TypeError or ValueError naming the first bad argument (and what it may be), before
    anything runs; returns X and y as arrays and the optimizer options as a dict."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable (it builds the model), got {model_fn!r}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    data.check_integer("workers", workers)
    if strategy == "single" and workers != 1:
        raise ValueError(f"strategy='single' runs one process; workers must be 1, got {workers}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("seed", seed, 0)):
        data.check_integer(name, value, minimum)
    if batch_size < workers:
        raise ValueError(f"batch_size={batch_size} is smaller than workers={workers}: "
                         "every worker needs at least one sample")
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if not _is_number(timeout):
        raise TypeError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if not 0 < timeout < np.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    _check_lr(lr, steps)
    optimizer_options = _check_optimizer(optimizer, optimizer_options, lr)
    _, defaults, check = STRATEGIES[strategy]
    unknown = set(strategy_options) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"strategy {strategy!r} does not take {sorted(unknown)}; "
                         f"its options: {allowed}")
    _check_types("", defaults, strategy_options)
    if check:
        check(strategy_options)
    X, y = data.check_training_data(X, y)
    classes = _classes(model_fn(), X)
    if classes is not None:
        data.check_labels(y, classes)
    if batch_size > len(X):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(X)} training rows")
    if strategy in JOB_CHECKS:
        JOB_CHECKS[strategy](model_fn, workers, batch_size, strategy_options)
    return X, y, optimizer_options


def _is_number(value):
    """A real number; a bool is not one here."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _check_lr(lr, steps):
    """lr: a finite number > 0, or a schedule whose every rate of the run is finite and >= 0."""
    if callable(lr):
        for t in range(steps):
            rate = lr(t)
            if not _is_number(rate) or not 0 <= rate < np.inf:
                raise ValueError(f"the lr schedule gives {rate!r} at step {t}; every rate must "
                                 "be a finite number >= 0")
    elif not _is_number(lr):
        raise TypeError(f"lr must be a number > 0 or a schedule (a function of the step "
                        f"t = 0, 1, ...), got {lr!r}")
    elif not 0 < lr < np.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def _check_optimizer(optimizer, options, lr):
    """The optimizer's name and its options: only the settings its constructor takes, each of
    its default's kind, and values it accepts. Returns the options as a new dict."""
    if not isinstance(optimizer, str) or optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: "
                         f"{', '.join(optim.OPTIMIZERS)}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"optimizer_options must be a dict of the optimizer's settings or None, "
                        f"got {options!r}")
    options = dict(options or {})
    settings = {name: p.default for name, p in
                inspect.signature(optim.OPTIMIZERS[optimizer]).parameters.items()
                if name not in ("params", "lr", "ops")}
    unknown = sorted(set(options) - set(settings))
    if unknown:
        raise ValueError(f"optimizer_options: optimizer {optimizer!r} does not take {unknown}; "
                         f"its options: {', '.join(settings)}")
    _check_types("optimizer_options: ", settings, options)
    try:
        optim.make(optimizer, np.zeros(1), lr, **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"optimizer_options={options} for optimizer {optimizer!r}: "
                          f"{error}") from None
    return options


def _check_types(prefix, defaults, values):
    """Each option must be of its default's kind: True/False, an integer, a number or a string
    (numpy scalars are fine, a bool is not a number; a default of None or a tuple: any)."""
    for name, value in values.items():
        default = defaults[name]
        if isinstance(default, bool):
            ok, kind = isinstance(value, (bool, np.bool_)), "True or False"
        elif isinstance(default, int):
            ok, kind = data.is_integer(value), "an integer"
        elif isinstance(default, float):
            ok, kind = _is_number(value), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise TypeError(f"{prefix}{name} must be {kind} (its default is {default!r}), "
                            f"got {value!r}")


def _classes(model, X):
    """k for a softmax classifier (the width of its output), else None (any targets)."""
    if not isinstance(getattr(model, "criterion", None), nn.SoftmaxCrossEntropy):
        return None
    return kernels.to_host(model.forward(X[:1])).shape[-1]


def _train_single(model_fn, X, y, steps, batch_size, lr, optimizer, optimizer_options, seed,
                  progress):
    """The reference: one process, the whole global batch each step."""
    model = model_fn()
    opt = optim.make(optimizer, model.params, lr, **optimizer_options)
    batches = data.step_batches(len(X), batch_size, steps, seed)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, desc="single", leave=False, disable=None)
    loss, step_time = np.zeros(steps), np.zeros(steps)
    for t, idx in enumerate(batches):
        start = time.perf_counter()
        loss[t] = model.loss_and_grad(X[idx], y[idx])
        _check_finite(loss[t:t + 1], opt.lr, first_step=t)
        opt.step(model.grads)
        step_time[t] = time.perf_counter() - start
    return History(strategy="single", workers=1, model_fn=model_fn,
                   params=kernels.to_host(model.params),
                   loss=loss, step_time=step_time, compute_time=step_time.copy(),
                   comm_time=np.zeros(steps), bytes_sent=[0])
