"""Interactive panels for the lessons, each a thin wrapper over pure functions that tests call.

    data_parallel_experiment(workers, batch_size, lr) -> DataParallelResult -> plot_data_parallel
    data_parallel_explorer(): sliders whose callback is exactly those two calls
    linear_scaling_experiment(base_batch, k, base_lr, warmup_steps) -> plot_linear_scaling
    zero_memory(model_fn, X, y, workers, batch_size) -> ZeroMemory -> viz.plot_zero_stages;
    zero_memory_explorer(): sliders for the ZeRO stage and the workers over those two calls

The α-β prediction of a data-parallel step with p workers (minidist.cost, ring all-reduce of the
gradient's n bytes, bucket by bucket):

    T(p) = C₁/p + Σ_buckets [2(p−1)α + 2(p−1)/p·n_b·β],   predicted speed-up S(p) = C₁ / T(p) ≤ p

where C₁ is the measured compute time of one step on one worker.
"""

import functools
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from minidist import cost, data, memory, nn, optim
from minidist.train import train

DIGITS_MLP = (64, 128, 10)


@functools.cache
def _digits():
    return data.load_digits()


PING_PONG_SIZES = tuple(4**k for k in range(1, 12))  # 4 B … 4 MiB


@functools.cache
def measured_alpha_beta(backend="thread"):
    """(α seconds per message, β seconds per byte) of `backend`: a ping-pong fit, measured once.

    The sizes run up to 4 MiB, past the point where copying the bytes outweighs a message's
    fixed cost: below a few hundred KiB the thread backend's wake-up latency hides the copy
    and the times are flat. β = 0 means the fit still could not resolve it (see
    `cost.fit_alpha_beta`); the prediction then counts latency only, and says so."""
    sizes, seconds = cost.measure_ping_pong(backend=backend, sizes=PING_PONG_SIZES, repeats=9,
                                            warmup=2)
    return cost.fit_alpha_beta(sizes, seconds)


@dataclass
class DataParallelResult:
    """One data-parallel run per worker count. Times are medians over steps (the first step,
    a warm-up, left out), in seconds per step, on rank 0."""

    workers: np.ndarray           # (W,) worker counts, starting with 1
    loss: np.ndarray              # (W, steps) global-batch loss per step
    compute_time: np.ndarray      # (W,)
    comm_time: np.ndarray         # (W,)
    step_time: np.ndarray         # (W,)
    speedup: np.ndarray           # (W,) measured: step_time[p = 1] / step_time[p]
    predicted_time: np.ndarray    # (W,) α-β: C₁/p + all-reduce time
    predicted_speedup: np.ndarray  # (W,) C₁ / predicted_time
    grad_bytes: int
    alpha: float
    beta: float
    settings: dict = field(default_factory=dict)

    @property
    def comm_share(self):
        """Communication's share of compute + communication time, per worker count."""
        return self.comm_time / (self.comm_time + self.compute_time)

    @property
    def bandwidth(self):
        """1/β in bytes per second, or None when the fit did not resolve β (β = 0)."""
        return cost.link_bandwidth(self.beta)

    @property
    def model_label(self):
        """How the α-β prediction is labelled: 'β unresolved: α only' when the fit gave β = 0."""
        return "α-β prediction" if self.beta > 0 else "α-β prediction (β unresolved: α only)"


def _worker_counts(workers):
    counts = range(1, int(workers) + 1) if np.ndim(workers) == 0 else workers
    counts = sorted({1, *(int(p) for p in counts)})
    if counts[0] < 1:
        raise ValueError(f"worker counts must be >= 1, got {counts}")
    return np.array(counts)


def data_parallel_experiment(workers=4, batch_size=64, lr=0.1, steps=30, backend="thread",
                             sizes=DIGITS_MLP, algorithm="ring", bucket_bytes=1 << 20,
                             alpha=None, beta=None, cores=None, X=None, y=None, seed=0):
    """Train the MLP `sizes` (default: the digits MLP 64-128-10) with strategy="data_parallel"
    on 1, 2, …, `workers` workers (or on the given list of counts; 1 is always added), and
    predict each step time with the α-β model. α, β: measured on `backend` unless given
    (β = 0, a fit that could not resolve it, predicts the messages' latency only);
    cores: split the compute min(p, cores) ways, not p (a machine with fewer cores than ranks).
    The prediction models the ring all-reduce, whatever `algorithm` the run uses.

    backend="thread" answers in a fraction of a second, but Python threads share one
    interpreter lock; backend="process" gives truly parallel timings (one process per rank)."""
    counts = _worker_counts(workers)
    if X is None:
        X, y = _digits()
    if alpha is None or beta is None:
        alpha, beta = measured_alpha_beta(backend)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    model_fn = functools.partial(nn.mlp, list(sizes), seed=seed)
    with threadpool_limits(1):  # one BLAS thread per rank, as the process backend does
        runs = [train(model_fn, X, y, strategy="data_parallel", workers=int(p), backend=backend,
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      algorithm=algorithm, bucket_bytes=bucket_bytes) for p in counts]
    steady = slice(1, None) if steps > 1 else slice(None)
    median = lambda name: np.array([np.median(getattr(h, name)[steady]) for h in runs])  # noqa: E731
    compute, comm, step = median("compute_time"), median("comm_time"), median("step_time")
    model = model_fn()
    per_bucket = max(1, bucket_bytes // model.grads.itemsize)
    bucket_sizes = [min(per_bucket, model.num_params - s) * model.grads.itemsize
                    for s in range(0, model.num_params, per_bucket)]
    all_reduce = np.array([sum(cost.time("all_reduce", "ring", n, int(p), alpha, beta)
                               for n in bucket_sizes) for p in counts])
    predicted = compute[0] / np.minimum(counts, cores or counts.max()) + all_reduce
    return DataParallelResult(
        workers=counts, loss=np.array([h.loss for h in runs]), compute_time=compute,
        comm_time=comm, step_time=step, speedup=step[0] / step, predicted_time=predicted,
        predicted_speedup=compute[0] / predicted, grad_bytes=int(model.grads.nbytes),
        alpha=float(alpha), beta=float(beta),
        settings={"batch_size": batch_size, "lr": lr, "steps": steps, "backend": backend,
                  "sizes": tuple(sizes), "algorithm": algorithm, "bucket_bytes": bucket_bytes,
                  "cores": cores})


def plot_data_parallel(result, fig=None):
    """Three panels: loss curves, compute + communication time per step, speed-up measured
    against the α-β prediction. Returns the figure."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(13, 3.8))
    ax_loss, ax_time, ax_speed = fig.subplots(1, 3)
    p, ms = result.workers, 1e3

    def headroom(ax, top, bottom=0.0, share=0.3):  # an empty band on top for the legend
        ax.set_ylim(bottom, top + share / (1 - share) * (top - bottom))

    for i, count in enumerate(p):
        ax_loss.plot(result.loss[i], lw=3.5 - 2.5 * i / max(1, len(p) - 1),
                     label=f"{count} worker{'s' * bool(count > 1)}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss: the same curve for every p")
    low, high = np.nanmin(result.loss), np.nanmax(result.loss)
    headroom(ax_loss, high, low - 0.05 * (high - low), share=0.35 if len(p) > 4 else 0.25)
    ax_loss.legend(fontsize=7, ncol=4, loc="upper center")
    ax_time.bar(p, result.compute_time * ms, color="tab:blue", label="compute")
    ax_time.bar(p, result.comm_time * ms, bottom=result.compute_time * ms, color="tab:orange",
                label="communication")
    ax_time.plot(p, result.predicted_time * ms, "k_", ms=14, mew=2, label=result.model_label)
    ax_time.set(xlabel="workers p", ylabel="ms per step (rank 0, median)", xticks=p,
                title="where a step's time goes")
    headroom(ax_time, max((result.compute_time + result.comm_time).max(),
                          result.predicted_time.max()) * ms)
    ax_time.legend(fontsize=7, ncol=2, loc="upper center")
    ax_speed.plot(p, p, ":", color="gray", label="ideal: p")
    ax_speed.plot(p, result.predicted_speedup, "s--", color="black", ms=4,
                  label=result.model_label)
    ax_speed.plot(p, result.speedup, "o-", color="tab:red", label="measured")
    ax_speed.axhline(1, color="gray", lw=0.5)
    ax_speed.set(xlabel="workers p", ylabel="speed-up vs 1 worker", xticks=p, title="speed-up")
    headroom(ax_speed, max(p.max(), result.speedup.max(), result.predicted_speedup.max()))
    ax_speed.legend(fontsize=7, ncol=2, loc="upper center")
    s = result.settings
    fig.suptitle(f"data parallel, {s['backend']} backend: MLP {'-'.join(map(str, s['sizes']))}, "
                 f"global batch {s['batch_size']}, lr {s['lr']:g}, gradient "
                 f"{result.grad_bytes:,} bytes", fontsize=10)
    fig.tight_layout()
    return fig


def data_parallel_explorer(steps=30, backend="thread", **options):
    """Sliders for workers (1–8), global batch size and learning rate; on release the panel
    re-runs data_parallel_experiment and redraws plot_data_parallel. Returns the widget."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    style = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = {
        "workers": w.IntSlider(value=4, min=1, max=8, description="workers", **style),
        "batch_size": w.SelectionSlider(options=[8, 16, 32, 64, 128, 256, 512], value=64,
                                        description="global batch", **style),
        "lr": w.FloatLogSlider(value=0.1, base=10, min=-3, max=0, step=0.1,
                               description="learning rate", readout_format=".3f", **style),
    }

    def show(workers, batch_size, lr):  # the thin wrapper: no logic here
        plot_data_parallel(data_parallel_experiment(workers, batch_size, lr, steps=steps,
                                                    backend=backend, **options))
        plt.show()

    output = w.interactive_output(show, controls)
    return w.VBox([w.HBox(list(controls.values())), output])


@dataclass
class ScalingRun:
    label: str
    batch_size: int
    lr: np.ndarray        # the learning rate of each step
    samples: np.ndarray   # samples processed after each step
    loss: np.ndarray      # global-batch loss of each step
    final_loss: float     # loss of the final parameters on the whole training set


def linear_scaling_experiment(base_batch=16, k=4, base_lr=0.02, warmup_steps=10,
                              samples=12_800, sizes=DIGITS_MLP, backend="thread", X=None,
                              y=None, seed=0):
    """The linear scaling rule (Goyal et al. 2017) on the same budget of `samples`:
    batch B with lr η on 1 worker; batch kB with lr η, and batch kB with lr kη reached by a
    linear warm-up over `warmup_steps`, each on k data-parallel workers holding B samples.
    Returns three ScalingRun, in that order."""
    if X is None:
        X, y = _digits()
    model_fn = functools.partial(nn.mlp, list(sizes), seed=seed)
    big = k * base_batch
    plan = [(f"batch {base_batch}, lr η = {base_lr:g}", 1, base_batch, base_lr),
            (f"batch {big}, lr η = {base_lr:g}", k, big, base_lr),
            (f"batch {big}, lr {k}η + warm-up", k, big,
             optim.linear_warmup(k * base_lr, warmup_steps, start_factor=1 / k))]
    runs = []
    for label, workers, batch, lr in plan:
        steps = samples // batch
        h = train(model_fn, X, y, strategy="data_parallel", workers=workers, backend=backend,
                  steps=steps, batch_size=batch, lr=lr, seed=seed)
        rates = np.array([lr(t) if callable(lr) else lr for t in range(steps)], dtype=float)
        runs.append(ScalingRun(label, batch, rates, batch * np.arange(1, steps + 1), h.loss,
                               float(h.model().loss(X, y))))
    return runs


def _smooth(values, window):
    """Moving average over `window` entries (the first window − 1 entries dropped)."""
    window = max(1, min(int(window), len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_linear_scaling(runs, fig=None, window_samples=None):
    """Loss against samples processed (moving average over `window_samples`, the same for
    every run) and the learning-rate schedules. Returns the figure."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(11, 3.8))
    ax_loss, ax_lr = fig.subplots(1, 2)
    window_samples = window_samples or 4 * max(r.batch_size for r in runs)
    styles = [dict(color="black", lw=2.5), dict(color="tab:orange"), dict(color="tab:blue",
                                                                          ls="--")]
    for run, style in zip(runs, styles, strict=False):
        window = window_samples // run.batch_size
        ax_loss.plot(run.samples[window - 1:], _smooth(run.loss, window), label=run.label,
                     **style)
        ax_lr.plot(run.samples, run.lr, label=run.label, **style)
    ax_loss.set(xlabel="samples processed", ylabel="training loss (moving average)",
                title="same samples, same curve when lr scales with the batch")
    ax_lr.set(xlabel="samples processed", ylabel="learning rate", title="learning rate")
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_lr.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def pipeline_explorer(forward=1.0, backward=2.0):
    """Sliders for stages (1–8) and micro-batches (1–32); the callback is exactly
    minidist.viz.plot_schedules (GPipe and 1F1B, bubble, stored activations)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from minidist import viz

    style = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = {"stages": w.IntSlider(value=4, min=1, max=8, description="stages p", **style),
                "micro_batches": w.IntSlider(value=8, min=1, max=32,
                                             description="micro-batches m", **style)}

    def show(stages, micro_batches):  # the thin wrapper: no logic here
        viz.plot_schedules(stages, micro_batches, forward, backward)
        plt.show()

    return w.VBox([w.HBox(list(controls.values())), w.interactive_output(show, controls)])


@dataclass
class ZeroMemory:
    """What one rank holds under data parallelism (stage 0) and ZeRO-1, -2, -3 on N ranks."""

    world_size: int
    num_params: int
    bytes_per_param: tuple  # (θ, ∇, optimizer state) bytes per parameter of a whole replica
    per_rank: dict  # stage -> {params, grads, optimizer, activations} bytes


def zero_memory(model_fn, X, y, workers, batch_size, optimizer="adam", bucket_bytes=1):
    """The bytes rank 0 of `workers` holds, by category, for each stage 0–3 (stage 0:
    strategy="data_parallel"). Model states: memory.zero_state_bytes of the model's units
    (buckets.units(model, bucket_bytes)), minidist's padded shards exactly. Activations: what
    the layers keep after a forward of rank 0's shard of a global batch, ⌈batch_size/N⌉ rows of
    X. The step's temporaries (gathered units, buffers in flight) are left out: they are in
    History.memory's peak, not in any category."""
    from minidist.parallel.buckets import units

    data.check_integer("workers", workers, minimum=1)
    data.check_integer("batch_size", batch_size, minimum=1)
    if batch_size < workers:
        raise ValueError(f"batch_size ({batch_size}) must be >= workers ({workers}): every "
                         "rank needs a row of the global batch")
    model = model_fn()
    _, rows = data.shard_bounds(batch_size, 0, workers)
    model.loss(X[:rows], y[:rows])
    kept = memory.activation_bytes([*model.layers, model.criterion])
    sizes = [unit.size for unit in units(model, bucket_bytes)]
    b = model.params.itemsize
    per_rank = {s: {**memory.zero_state_bytes(sizes, s, workers, b, optimizer),
                    "activations": kept} for s in memory.ZERO_SHARDED}
    slots = len(optim.OPTIMIZERS[optimizer].state_names)
    return ZeroMemory(int(workers), model.num_params, (b, b, slots * b), per_rank)


def zero_memory_explorer(model_fn=None, X=None, y=None, batch_size=64, optimizer="adam",
                         bucket_bytes=1, budget=None):
    """Sliders for the ZeRO stage (0: data parallel) and the workers N (1–8); the callback is
    exactly zero_memory and minidist.viz.plot_zero_stages (default model: the digits MLP)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from minidist import viz

    if model_fn is None:
        model_fn = functools.partial(nn.mlp, list(DIGITS_MLP), seed=0)
        X, y = _digits()
    style = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = {"stage": w.IntSlider(value=3, min=0, max=3, description="ZeRO stage", **style),
                "workers": w.IntSlider(value=4, min=1, max=8, description="workers N", **style)}

    def show(stage, workers):  # the thin wrapper: no logic here
        held = zero_memory(model_fn, X, y, workers, batch_size, optimizer, bucket_bytes)
        viz.plot_zero_stages(workers, held.bytes_per_param, held.per_rank, stage, budget)
        plt.show()

    return w.VBox([w.HBox(list(controls.values())), w.interactive_output(show, controls)])
