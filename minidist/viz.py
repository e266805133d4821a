"""Plots of timelines: a Gantt chart, one row per rank, one bar per event."""

from minidist.trace import origin

COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "send": "#55a868", "recv": "#a1d99b",
          "all_reduce": "#c44e52", "optimizer": "#8172b3", "idle": "#eeeeee"}
NESTED = ("send", "recv", "all_reduce")  # drawn thinner, on top of the compute they sit in


def gantt(events_per_rank, ax=None, steps=None, title=None, labels=None, micro_labels=True):
    """Draw every rank's events from the earliest start (milliseconds); returns the axes.

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
            left, width = (start - t0) * 1e3, (end - start) * 1e3
            height = 0.35 if name in NESTED else 0.8
            ax.barh(rank, width, left=left, height=height, color=COLORS.get(name, "#999999"),
                    edgecolor="white" if name != "idle" else "none", linewidth=0.5)
            seen.add(name)
            if micro_labels and micro >= 0 and name in ("forward", "backward") \
                    and width > 0.025 * span * 1e3:
                ax.text(left + width / 2, rank, str(micro), ha="center", va="center",
                        fontsize=7, color="white")
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels(labels or [f"rank {r}" for r in range(len(chosen))])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    if title:
        ax.set_title(title)
    handles = [Patch(color=COLORS[k], label=k) for k in COLORS if k in seen]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return ax
