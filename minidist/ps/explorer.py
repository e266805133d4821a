"""Lesson 6's experiments and panel, each a pure function the tests call directly.

    consistency_experiment(workers, staleness, slowdown) -> ConsistencyResult -> plot_consistency
    consistency_explorer(): sliders whose callback is exactly those two calls
    simulate_consistency(consistency, durations, staleness) -> SimulatedRun -> plot_simulated:
        the ideal schedule (free messages, given compute times): waits and staleness, exactly
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
    wait_time: list           # seconds each worker spent inside pull() and push(): messages,
    #                           the server's queue and the rule's waits, on a shared machine
    max_gap: int              # the most clocks any pull ran ahead of the slowest worker
    seconds: float            # until the last worker finished
    finish: list              # per worker: seconds until its last push returned
    last_push: list           # per worker: seconds when its last push began
    step_seconds: list        # per worker: mean seconds from a pull's start to its push's end


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
    slow_worker = min(1, workers - 1)
    slow = {slow_worker: float(slowdown)} if slowdown > 1 else None
    runs = []
    for consistency, bound in MODES:
        s = staleness if bound else None
        hist = train(model_fn, X, y, strategy="parameter_server", workers=workers,
                     steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     consistency=consistency, staleness=s, slow_workers=slow)
        times, smoothed = loss_over_time(hist)
        gaps = [clock - low for pulls in hist.ps["pulls"] for _, clock, low, _ in pulls]
        origin = min(log[0, 1] for log in hist.ps["log"])  # as loss_over_time counts time
        runs.append(ConsistencyRun(
            label=f"SSP (s={s})" if bound else consistency.upper(), loss=hist.loss,
            times=times, smoothed=smoothed, staleness=hist.staleness,
            wait_time=hist.ps["wait_time"], max_gap=int(max(gaps)), seconds=float(times[-1]),
            finish=[float(log[-1, 4] - origin) for log in hist.ps["log"]],
            last_push=[float(log[-1, 3] - origin) for log in hist.ps["log"]],
            step_seconds=[float(np.mean(log[:, 4] - log[:, 1])) for log in hist.ps["log"]]))
    return ConsistencyResult(runs, dict(workers=workers, staleness=staleness, slowdown=slowdown,
                                        slow_worker=slow_worker, steps=steps,
                                        batch_size=batch_size))


@dataclass
class SimulatedRun:
    label: str
    computes: list        # per worker: (start, end) of each step's compute
    waits: list           # per worker: (start, end) of each pull the rule held back
    finish: np.ndarray    # per worker: when its last gradient was applied (its last ack)
    staleness: np.ndarray  # τ of every applied gradient, in the order applied
    max_gap: int          # the most clocks any pull ran ahead of the slowest worker

    @property
    def consistency_waits(self):
        """Per worker: how many of its pulls the consistency rule held back."""
        return [len(w) for w in self.waits]

    @property
    def wait_time(self):
        """Per worker: time spent in pulls the rule held back."""
        return [float(sum(b - a for a, b in w)) for w in self.waits]


def simulate_consistency(consistency, durations, staleness=None):
    """The schedule BSP, ASP or SSP(staleness) implies when messages and updates are free.

    `durations[w][t]` is worker w's compute time for step t. A worker pulls, computes, pushes,
    and pulls again at once; the pull of clock c is answered by the rule of
    minidist.ps.consistency (BSP: step c − 1 applied; SSP: c − c_min ≤ s; ASP: at once).
    Pushes that end at the same instant are taken in rank order, before any pull."""
    from minidist.ps.consistency import check, may_serve_pull

    check(consistency, staleness)
    durations = np.asarray(durations, dtype=float)
    if durations.ndim != 2 or durations.size == 0 or (durations <= 0).any():
        raise ValueError(f"durations must be a (workers, steps) array of positive compute "
                         f"times, got shape {durations.shape}")
    workers, steps = durations.shape
    clocks, pulled = np.zeros(workers, int), np.zeros(workers, int)
    version, pending, gaps, taus = 0, set(), [0], []
    computes, waits = [[] for _ in range(workers)], [[] for _ in range(workers)]
    busy_until = {}                               # worker -> end of its compute
    waiting = dict.fromkeys(range(workers), 0.0)  # worker -> when its pull began
    finish, now = np.zeros(workers), 0.0
    while waiting or busy_until:
        active = [w for w in range(workers) if clocks[w] < steps]
        c_min = min(int(clocks[w]) for w in active) if active else 0
        for w in sorted(waiting):  # answer the pulls the rule allows now
            if may_serve_pull(consistency, clocks[w], version, c_min, staleness):
                start = waiting.pop(w)
                if now > start:
                    waits[w].append((start, now))
                gaps.append(int(clocks[w]) - c_min)
                pulled[w] = version
                busy_until[w] = now + durations[w, clocks[w]]
                computes[w].append((now, busy_until[w]))
        if not busy_until:
            raise RuntimeError(f"{consistency}: every worker waits; no schedule exists")
        now = min(busy_until.values())
        for w in sorted(k for k, end in busy_until.items() if end == now):  # pushes
            del busy_until[w]
            if consistency == "bsp":
                pending.add(w)
            else:
                taus.append(version - pulled[w])
                version += 1
            clocks[w] += 1
            finish[w] = now  # BSP: replaced below by when the step is applied (the ack)
            if clocks[w] < steps:
                waiting[w] = now
        if consistency == "bsp" and len(pending) == workers:
            taus += [version - pulled[w] for w in sorted(pending)]
            finish[sorted(pending)] = now
            version, pending = version + 1, set()
    label = f"SSP (s={staleness})" if consistency == "ssp" else consistency.upper()
    return SimulatedRun(label, computes, waits, finish, np.array(taus, int), max(gaps))


def plot_simulated(runs, fig=None):
    """One timeline per run: each worker's compute (coloured) and the time the consistency
    rule made it wait (grey, hatched)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig = fig or plt.figure(figsize=(12, 1.0 + 0.45 * len(runs[0].computes) * len(runs)))
    axes = np.atleast_1d(fig.subplots(len(runs), 1, sharex=True))
    for ax, run in zip(axes, runs, strict=True):
        for w, (computes, waits) in enumerate(zip(run.computes, run.waits, strict=True)):
            ax.broken_barh([(a, b - a) for a, b in computes], (w - 0.38, 0.76),
                           facecolor="tab:blue", edgecolor="white", linewidth=0.6)
            ax.broken_barh([(a, b - a) for a, b in waits], (w - 0.38, 0.76),
                           facecolor="0.85", edgecolor="0.45", hatch="///", linewidth=0.5)
        ax.set_yticks(range(len(run.computes)),
                      [f"worker {w}" for w in range(len(run.computes))])
        ax.invert_yaxis()
        ax.set_title(f"{run.label}: consistency waits per worker {run.consistency_waits}, "
                     f"last gradient applied at {max(run.finish):g}", fontsize=10)
    axes[-1].set_xlabel("time (units of one fast step)")
    fig.legend(handles=[Patch(facecolor="tab:blue", label="computing a step"),
                        Patch(facecolor="0.85", edgecolor="0.45", hatch="///",
                              label="pull held back by the consistency rule")],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def plot_consistency(result, fig=None):
    """Loss against steps, loss against wall-clock time, and the staleness histogram."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    # the curves often coincide: a thick solid line under a dashed one under a dotted one
    styles = {"BSP": dict(color="tab:blue", lw=3.0, ls="-", alpha=0.55, zorder=1),
              "ASP": dict(color="tab:red", lw=1.4, ls="--", zorder=2)}
    ssp_style = dict(color="tab:green", lw=1.8, ls=":", zorder=3)
    top = max(int(run.staleness.max()) for run in result.runs)
    for i, run in enumerate(result.runs):
        style = styles.get(run.label, ssp_style)
        axes[0].plot(run.loss, **style, label=f"{run.label}: mean τ = {run.staleness.mean():.2f}")
        axes[1].plot(run.times, run.smoothed, **style)
        counts = np.bincount(run.staleness, minlength=top + 1)
        axes[2].bar(np.arange(top + 1) + (i - 1) * 0.28, counts, width=0.28,
                    color=style["color"])
    s = result.settings
    axes[0].set(xlabel="step (clock)", ylabel="loss", title="loss against steps")
    axes[1].set(xlabel="wall-clock seconds", ylabel="reported loss (smoothed)",
                title=f"loss against time (worker slowed {s['slowdown']:g}×)")
    axes[2].set(xlabel="staleness τ (updates between pull and apply)", yscale="log",
                ylabel="gradients (log scale)", title="staleness of the applied gradients")
    fig.tight_layout()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3, fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
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
