"""Lesson 6's experiments and panel, each a pure function the tests call directly.

    consistency_experiment(workers, staleness, slowdown) -> ConsistencyResult -> plot_consistency
    consistency_explorer(): sliders whose callback is exactly those two calls
    plot_architecture(workers, num_servers): the servers, their shards, the workers, push/pull
    traffic_per_step(n_bytes, workers, num_servers): bytes through the busiest node, PS vs ring
"""

import functools
from dataclasses import dataclass, field

import numpy as np

from minidist import data, nn
from minidist.ps.training import loss_over_time
from minidist.train import train

MODES = (("bsp", None), ("asp", None), ("ssp", "s"))


@dataclass
class ConsistencyRun:
    label: str
    loss: np.ndarray          # global-batch loss per step (the workers' losses, weighted)
    times: np.ndarray         # seconds since the start, one per push
    smoothed: np.ndarray      # the reported loss at those times, over one global batch
    staleness: np.ndarray     # τ of every applied gradient
    wait_time: list           # seconds each worker spent in pull and push
    max_gap: int              # the most clocks any pull ran ahead of the slowest worker
    seconds: float            # until the last worker finished


@dataclass
class ConsistencyResult:
    runs: list
    settings: dict = field(default_factory=dict)


def consistency_experiment(workers=3, staleness=2, slowdown=3.0, steps=60, batch_size=96,
                           lr=0.1, sizes=(64, 128, 10), seed=0):
    """Train the digits MLP on a parameter server under BSP, ASP and SSP(staleness), with
    worker 1 (or worker 0 when alone) slowed `slowdown` times."""
    X, y = data.load_digits()
    model_fn = functools.partial(nn.mlp, list(sizes), seed=seed)
    slow = {min(1, workers - 1): float(slowdown)} if slowdown > 1 else None
    runs = []
    for consistency, bound in MODES:
        s = staleness if bound else None
        hist = train(model_fn, X, y, strategy="parameter_server", workers=workers,
                     steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     consistency=consistency, staleness=s, slow_workers=slow)
        times, smoothed = loss_over_time(hist)
        gaps = [clock - low for pulls in hist.ps["pulls"] for _, clock, low, _ in pulls]
        runs.append(ConsistencyRun(
            label=f"SSP (s={s})" if bound else consistency.upper(), loss=hist.loss,
            times=times, smoothed=smoothed, staleness=hist.staleness,
            wait_time=hist.ps["wait_time"], max_gap=int(max(gaps)), seconds=float(times[-1])))
    return ConsistencyResult(runs, dict(workers=workers, staleness=staleness,
                                        slowdown=slowdown, steps=steps, batch_size=batch_size))


def plot_consistency(result, fig=None):
    """Loss against steps, loss against wall-clock time, and the staleness histogram."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    colors = {"BSP": "tab:blue", "ASP": "tab:red"}
    top = max(int(run.staleness.max()) for run in result.runs)
    for i, run in enumerate(result.runs):
        color = colors.get(run.label, "tab:green")
        axes[0].plot(run.loss, color=color, label=run.label)
        axes[1].plot(run.times, run.smoothed, color=color, label=run.label)
        counts = np.bincount(run.staleness, minlength=top + 1)
        axes[2].bar(np.arange(top + 1) + (i - 1) * 0.28, counts, width=0.28, color=color,
                    label=f"{run.label}: mean τ = {run.staleness.mean():.2f}")
    s = result.settings
    axes[0].set(xlabel="step (clock)", ylabel="loss", title="loss against steps")
    axes[1].set(xlabel="wall-clock seconds", ylabel="reported loss (smoothed)",
                title=f"loss against time (worker slowed {s['slowdown']:g}×)")
    axes[2].set(xlabel="staleness τ (updates between pull and apply)", yscale="log",
                ylabel="gradients (log scale)", title="staleness of the applied gradients")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def consistency_explorer(steps=60, **options):
    """Sliders for workers, the SSP bound s and the straggler's slowdown; on release the panel
    re-runs consistency_experiment and redraws plot_consistency. Returns the widget."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    style = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = {
        "workers": w.IntSlider(value=3, min=2, max=6, description="workers", **style),
        "staleness": w.IntSlider(value=2, min=0, max=8, description="SSP bound s", **style),
        "slowdown": w.FloatSlider(value=3.0, min=1.0, max=8.0, step=0.5,
                                  description="straggler slowdown", **style),
    }

    def show(workers, staleness, slowdown):  # the thin wrapper: no logic here
        plot_consistency(consistency_experiment(workers, staleness, slowdown, steps=steps,
                                                **options))
        plt.show()

    output = w.interactive_output(show, controls)
    return w.VBox([w.HBox(list(controls.values())), output])


def traffic_per_step(n_bytes, workers, num_servers=1):
    """Bytes sent plus received per training step by the busiest node.

    Parameter server: each of W workers pushes n and pulls n; server j holds n/k of them, so
    it receives W·n/k and sends W·n/k:  2·W·n/k (a worker: 2n). Ring all-reduce among the W
    workers: every worker sends and receives 2·(W−1)/W·n:  4·(W−1)/W·n."""
    server = 2 * workers * n_bytes / num_servers
    worker = 2 * n_bytes
    ring = 4 * (workers - 1) / workers * n_bytes
    return {"server": server, "ps_busiest": max(server, worker), "ring": ring}


def plot_architecture(workers=3, num_servers=2, ax=None):
    """The servers (each owning a shard of θ and its optimizer state) above the workers, with
    every worker pushing gradients to and pulling parameters from every server."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    xs_s = np.linspace(0.2, 0.8, num_servers) if num_servers > 1 else [0.5]
    xs_w = np.linspace(0.1, 0.9, workers) if workers > 1 else [0.5]
    for j, x in enumerate(xs_s):
        ax.add_patch(FancyBboxPatch((x - 0.11, 0.72), 0.22, 0.2, boxstyle="round,pad=0.01",
                                    color="tab:orange", alpha=0.85))
        ax.text(x, 0.82, f"server {j}\nθ shard {j} + optimizer", ha="center", va="center",
                fontsize=8)
    for w, x in enumerate(xs_w):
        ax.add_patch(FancyBboxPatch((x - 0.07, 0.05), 0.14, 0.16, boxstyle="round,pad=0.01",
                                    color="tab:blue", alpha=0.85))
        ax.text(x, 0.13, f"worker {w}\ndata shard {w}", ha="center", va="center", fontsize=8,
                color="white")
        for xs in xs_s:
            ax.annotate("", xy=(xs - 0.02, 0.71), xytext=(x - 0.015, 0.22),
                        arrowprops=dict(arrowstyle="->", color="tab:red", lw=0.9))
            ax.annotate("", xy=(x + 0.015, 0.22), xytext=(xs + 0.02, 0.71),
                        arrowprops=dict(arrowstyle="->", color="tab:green", lw=0.9))
    ax.text(0.01, 0.5, "push(g): red\npull() θ: green", fontsize=8, va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{num_servers} server(s), {workers} workers")
    ax.axis("off")
    return ax
