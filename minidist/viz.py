"""Plots of timelines: a Gantt chart, one row per rank, one bar per event."""

from minidist.trace import COMM, origin

COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#8172b3",
          "send": "#55a868", "recv": "#a1d99b", "all_reduce": "#c44e52",
          "all_gather": "#937860", "reduce_scatter": "#da8bc3", "broadcast": "#64b5cd",
          "all_to_all": "#8c8c3c", "idle": "#eeeeee"}
# (top, height) of a row's two lanes, from the rank's row centre (the y axis points down):
# compute (and idle) above, communication in a thin lane beneath, so an all-reduce running
# under a backward bar shows the overlap
LANES = {"compute": (-0.4, 0.56), "comm": (0.18, 0.22)}


def gantt(events_per_rank, ax=None, steps=None, title=None, labels=None, micro_labels=True,
          scale=1e3, unit="ms"):
    """Draw every rank's events from the earliest start (seconds × scale); returns the axes.

    Each rank's row holds its compute events (forward, backward, optimizer, idle, ...) in the
    upper lane and its communication (minidist.trace.COMM) in a thin lane beneath.
    steps: an iterable of step numbers to draw (default: all). Forward and backward bars carry
    their micro-batch number when micro_labels and there is room.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.6 + 0.5 * len(events_per_rank)))
    keep = None if steps is None else set(steps)
    chosen = [[e for e in events if keep is None or e[3] in keep] for events in events_per_rank]
    t0 = origin(chosen)
    span = max((e[2] for events in chosen for e in events), default=t0) - t0
    seen = set()
    for rank, events in enumerate(chosen):
        for name, start, end, _, micro in events:
            left, width = (start - t0) * scale, (end - start) * scale
            top, height = LANES["comm" if name in COMM else "compute"]
            ax.barh(rank + top, width, left=left, height=height, align="edge",
                    color=COLORS.get(name, "#999999"),
                    edgecolor="white" if name != "idle" else "none", linewidth=0.5)
            seen.add(name)
            if micro_labels and micro >= 0 and name in ("forward", "backward") \
                    and width > 0.025 * span * scale:
                ax.text(left + width / 2, rank + top + height / 2, str(micro), ha="center",
                        va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels(labels or [f"rank {r}" for r in range(len(chosen))])
    ax.set_ylim(len(chosen) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlabel(f"time ({unit})")
    if title:
        ax.set_title(title)
    handles = [Patch(color=COLORS[k], label=k) for k in COLORS if k in seen]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return ax


def plot_schedules(stages, micro_batches, forward=1.0, backward=2.0, fig=None):
    """GPipe and 1F1B side by side on the ideal timeline (pipeline.simulate), with the
    bubble measured on it, the formula, and the activations each stage holds at its peak."""
    import matplotlib.pyplot as plt

    from minidist.parallel.pipeline import bubble_formula, schedule_ops, simulate
    from minidist.trace import bubble_fraction

    fig = fig or plt.figure(figsize=(12, 1.6 + 0.45 * stages))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.45])
    formula = bubble_formula(stages, micro_batches)
    for column, schedule in enumerate(("gpipe", "1f1b")):
        events = simulate(schedule, stages, micro_batches, forward, backward)
        ax = gantt(events, ax=fig.add_subplot(grid[0, column]),
                   labels=[f"stage {s}" for s in range(stages)], scale=1 / forward,
                   unit="units of one forward")
        ax.get_legend().remove()
        ax.set_title(f"{'GPipe' if schedule == 'gpipe' else '1F1B'}: bubble "
                     f"{bubble_fraction(events)[0]:.3f} (formula {formula:.3f})", fontsize=10)
    ax = fig.add_subplot(grid[0, 2])
    for offset, schedule in ((-0.2, "gpipe"), (0.2, "1f1b")):
        held = []
        for s in range(stages):
            ops = schedule_ops(schedule, s, stages, micro_batches)
            in_flight = [sum(1 if op == "F" else -1 for op, _ in ops[:i + 1])
                         for i in range(len(ops))]
            held.append(max(in_flight))
        ax.barh([s + offset for s in range(stages)], held, height=0.4,
                label="GPipe" if schedule == "gpipe" else "1F1B")
    ax.set(yticks=range(stages), yticklabels=[f"stage {s}" for s in range(stages)],
           xlabel="micro-batches held", title="peak stored activations")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside, off the bars
    fig.suptitle(f"p = {stages} stages, m = {micro_batches} micro-batches "
                 f"(a backward takes {backward / forward:g}× a forward)", fontsize=10)
    fig.tight_layout()
    return fig


# the model states of ZeRO's picture (Rajbhandari et al. 2020, Fig. 1), left to right
ZERO_STATES = (("params", "parameters θ", "#4c72b0"), ("grads", "gradients ∇", "#55a868"),
               ("optimizer", "optimizer state", "#c44e52"))


def plot_zero_stages(world_size, bytes_per_param=(4, 4, 8), per_rank=None, stage=None,
                     budget=None, fig=None):
    """ZeRO's stages on N = world_size ranks: one panel per stage 0 (data parallelism) to 3,
    a row per rank, a band per model state as wide as its bytes per parameter (θ, ∇, optimizer:
    bytes_per_param). The band is filled where the rank holds it: whole, or its 1/N shard (at
    r/N) when the stage shards it (memory.ZERO_SHARDED); the title gives the bytes per
    parameter each rank holds, b_θ + b_∇ + b_opt divided by N where sharded.

    per_rank ({stage: {params, grads, optimizer, activations}} bytes one rank holds, as
    widgets.zero_memory returns): a last panel of stacked bars, with a dashed line at `budget`
    bytes if given. stage: the stage to highlight (the others fade). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from minidist.memory import ZERO_SHARDED

    n = int(world_size)
    widths = [float(b) for b in bytes_per_param]
    if n < 1 or len(widths) != 3 or min(widths) < 0:
        raise ValueError(f"plot_zero_stages: world_size must be >= 1 and bytes_per_param three "
                         f"numbers >= 0, got {world_size!r} and {bytes_per_param!r}")
    fig = fig or plt.figure(figsize=(13 if per_rank else 11, 2.3 + 0.28 * n))
    grid = fig.add_gridspec(1, 5 if per_rank else 4, width_ratios=[1] * 4 + [1.1] * bool(per_rank))
    starts = [sum(widths[:i]) for i in range(3)]
    for s in range(4):
        ax = fig.add_subplot(grid[0, s])
        faded = stage is not None and s != stage
        for r in range(n):
            for (key, _, color), x0, w in zip(ZERO_STATES, starts, widths, strict=True):
                ax.add_patch(Rectangle((x0, r - 0.4), w, 0.8, facecolor=color, alpha=0.12,
                                       edgecolor="none"))
                left, width = (x0 + r * w / n, w / n) if key in ZERO_SHARDED[s] else (x0, w)
                ax.add_patch(Rectangle((left, r - 0.4), width, 0.8, facecolor=color,
                                       alpha=0.3 if faded else 1.0, edgecolor="white", lw=0.5))
        held = sum(w / n if key in ZERO_SHARDED[s] else w
                   for (key, _, _), w in zip(ZERO_STATES, widths, strict=True))
        name = "data parallel" if s == 0 else f"ZeRO-{s}"
        ax.set_title(f"{name}: {held:.3g} B/param per rank", fontsize=9,
                     fontweight="bold" if s == stage else "normal")
        ax.set(xlim=(0, sum(widths)), ylim=(n - 0.5, -0.5), xlabel="bytes per parameter")
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)] if s == 0 else [])
        ax.tick_params(axis="y", labelsize=8 if n <= 8 else 6)
    legend = [Patch(color=color, label=label) for _, label, color in ZERO_STATES]
    if per_rank:
        ax = fig.add_subplot(grid[0, 4])
        keys = [key for key, _, _ in ZERO_STATES] + ["activations"]
        colors = [color for _, _, color in ZERO_STATES] + ["#dd8452"]
        for s, held in sorted(per_rank.items()):
            bottom = 0.0
            for key, color in zip(keys, colors, strict=True):
                ax.bar(s, held[key] / 2**20, bottom=bottom / 2**20, color=color, width=0.6,
                       alpha=0.3 if stage is not None and s != stage else 1.0)
                bottom += held[key]
        if budget is not None:
            ax.axhline(budget / 2**20, color="black", ls="--", lw=1)
            ax.text(3.45, budget / 2**20, "budget", ha="right", va="bottom", fontsize=8)
        ax.set(xticks=range(4), xticklabels=["DP", "1", "2", "3"], xlabel="ZeRO stage",
               ylabel="MiB per rank", xlim=(-0.6, 3.6))
        ax.set_title("bytes one rank holds", fontsize=9)
        legend.append(Patch(color="#dd8452", label="activations"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"who holds what on N = {n} ranks (filled: held by that rank)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig
