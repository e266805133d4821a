"""Timelines: what every rank did, and when.

A rank records events — forward, backward, optimizer, its communication (send, recv and the
collectives), and the idle gaps between them — as (name, start, end, step, micro) with start
and end from time.perf_counter (one monotonic clock for all threads and processes of a
machine). `micro` numbers the micro-batch of a pipeline's forward and backward, or the unit of
ZeRO's (−1: none). An async collective's event runs from when it started to when it finished,
so it may lie under a backward, overlapping it; the idle gaps are the gaps of everything else
(a rank waiting under a communication bar is waiting on it). From them:

    bubble fraction of a stage = 1 − (forward + backward seconds) / (the pipeline phase's span)

which a GPipe or 1F1B schedule with equal stages brings to (p−1)/(m+p−1). `chrome_trace` writes
the trace-event JSON that Perfetto (ui.perfetto.dev) and chrome://tracing open, a rank's
communication on a row of its own ("rank k comm": there an async op need not nest in the
compute it overlaps).
"""

import json
import time
from pathlib import Path

import numpy as np

COMPUTE = ("forward", "backward")
COMM = ("send", "recv", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
KINDS = (*COMPUTE, *COMM, "optimizer", "idle")


class Trace:
    """One rank's events. `timed(name, fn, *args)` runs fn and records how long it took."""

    def __init__(self, enabled=True):
        self.events, self.enabled = [], enabled
        self.step, self.micro = 0, -1  # what the next events belong to (-1: no micro-batch)

    def timed(self, name, fn, *args, micro=None):
        start = time.perf_counter()
        result = fn(*args)
        self.add(name, start, time.perf_counter(), micro)
        return result

    def add(self, name, start, end, micro=None):
        if self.enabled:
            self.events.append((name, start, end, self.step,
                                self.micro if micro is None else micro))

    def with_idle(self):
        """The events, plus an `idle` event for every gap between busy spans within a step."""
        out, busy_until, step = [], None, None
        for event in sorted(self.events, key=lambda e: e[1]):
            name, start, end, s, _ = event
            if s == step and busy_until is not None and start > busy_until:
                out.append(("idle", busy_until, start, s, -1))
            busy_until = end if s != step or busy_until is None else max(busy_until, end)
            step = s
            out.append(event)
        return out


def origin(events_per_rank):
    """The earliest start over all ranks (timelines are drawn from it)."""
    starts = [e[1] for events in events_per_rank for e in events]
    return min(starts) if starts else 0.0


def seconds_by_kind(events, kinds=KINDS):
    """{kind: total seconds} over one rank's events (nested spans counted by their own kind)."""
    totals = dict.fromkeys(kinds, 0.0)
    for name, start, end, *_ in events:
        if name in totals:
            totals[name] += end - start
    return totals


def bubble_fraction(events_per_rank, steps=None):
    """Measured pipeline bubble: per step, the span from the first forward to the last backward
    over all ranks; per rank, 1 − its forward+backward seconds / that span. Returns the mean
    over ranks of each step's value, one number per step (an array)."""
    per_step = {}
    for rank, events in enumerate(events_per_rank):
        for name, start, end, step, _ in events:
            if name in COMPUTE:
                per_step.setdefault(step, {}).setdefault(rank, []).append((start, end))
    values = []
    for step in sorted(per_step) if steps is None else steps:
        spans = per_step[step]
        first = min(s for r in spans.values() for s, _ in r)
        last = max(e for r in spans.values() for _, e in r)
        busy = [sum(e - s for s, e in spans.get(r, [])) for r in range(len(events_per_rank))]
        values.append(1.0 - np.mean(busy) / (last - first))
    return np.array(values)


def chrome_trace(events_per_rank, names=None):
    """The Chrome trace-event format: one complete ("X") event per span, microseconds,
    one thread row per rank (tid = rank) and one for its communication, if it has any
    (tid = ranks + rank). Returns a dict ready for json.dump."""
    t0, ranks = origin(events_per_rank), len(events_per_rank)
    out = []
    for rank, events in enumerate(events_per_rank):
        label = names[rank] if names else f"rank {rank}"
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                    "args": {"name": label}})
        if any(e[0] in COMM for e in events):
            out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": ranks + rank,
                        "args": {"name": f"{label} comm"}})
        for name, start, end, step, micro in events:
            args = {"step": int(step)} | ({"micro_batch": int(micro)} if micro >= 0 else {})
            out.append({"name": name, "cat": name, "ph": "X", "pid": 0,
                        "tid": ranks + rank if name in COMM else rank,
                        "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6, "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def save_chrome_trace(events_per_rank, path, names=None):
    """Write chrome_trace(...) to `path`, making its folder if needed (open the file in
    ui.perfetto.dev or chrome://tracing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(chrome_trace(events_per_rank, names), f)
    return path
