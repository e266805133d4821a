"""Plots of timelines: a Gantt chart, one row per rank, one bar per event."""

from minidist.trace import origin

COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "send": "#55a868", "recv": "#a1d99b",
          "all_reduce": "#c44e52", "optimizer": "#8172b3", "idle": "#eeeeee"}
NESTED = ("send", "recv", "all_reduce")  # drawn thinner, on top of the compute they sit in


def gantt(events_per_rank, ax=None, steps=None, title=None, labels=None, micro_labels=True,
          scale=1e3, unit="ms"):
    """Draw every rank's events from the earliest start (seconds × scale); returns the axes.

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
        for name, start, end, _, micro in sorted(events, key=lambda e: e[0] in NESTED):
            left, width = (start - t0) * scale, (end - start) * scale
            height = 0.35 if name in NESTED else 0.8
            ax.barh(rank, width, left=left, height=height, color=COLORS.get(name, "#999999"),
                    edgecolor="white" if name != "idle" else "none", linewidth=0.5)
            seen.add(name)
            if micro_labels and micro >= 0 and name in ("forward", "backward") \
                    and width > 0.025 * span * scale:
                ax.text(left + width / 2, rank, str(micro), ha="center", va="center",
                        fontsize=7, color="white")
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels(labels or [f"rank {r}" for r in range(len(chosen))])
    ax.invert_yaxis()
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
