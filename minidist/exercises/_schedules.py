"""Judging a learner's pipeline order (lessons 7 and 12): the hook that makes the real pipeline
and pipeline.simulate follow it, the checks of its ops on their own, on the ideal timeline and
in a real run on thread ranks."""

import contextlib
from collections import Counter

import numpy as np

from minidist.exercises._common import Check, _call, _differs, _train


@contextlib.contextmanager
def interleaved_schedule(fn, schedule="interleaved_1f1b"):
    """Inside: `schedule` follows fn's order on every stage — the real pipeline on thread ranks
    and pipeline.simulate alike: fn(stage, stages, micro_batches, chunks) -> ("F"/"B", j, c)
    for "interleaved_1f1b", fn(stage, stages, micro_batches) -> ("F"/"B", j) for "1f1b" or
    "gpipe" (lesson 7); the other schedules are untouched; restored after."""
    from minidist.parallel import pipeline

    original = pipeline.schedule_ops

    def schedule_ops(name, stage, stages, micro_batches, chunks=1):
        if name != schedule:
            return original(name, stage, stages, micro_batches, chunks)
        if name != "interleaved_1f1b":
            return [(op[0], int(op[1])) for op in fn(stage, stages, micro_batches)]
        return [(op[0], int(op[1]), int(op[2])) for op in fn(stage, stages, micro_batches,
                                                               chunks)]

    pipeline.schedule_ops = schedule_ops
    try:
        yield
    finally:
        pipeline.schedule_ops = original


def _order_problem(ops, s, p, m, v=None):
    """The first thing wrong in stage s's list: its ops' form, an F or B missing or run twice,
    a B before its F (None: none of these). v: the chunks of an interleaved stage, whose ops
    are ("F"|"B", j, c); None for plain 1F1B's ("F"|"B", j) (lesson 7)."""
    from minidist.data import is_integer

    where = f"stage {s} of p = {p} (m = {m}{f', v = {v}' if v else ''})"
    if not isinstance(ops, (list, tuple)):
        return f"{where}: return a list of ops, got {type(ops).__name__}"
    width, chunks = (2, 1) if v is None else (3, v)
    form = "('F' or 'B', micro-batch j" + (")" if v is None else ", chunk c)")
    for i, op in enumerate(ops):
        if not (isinstance(op, (tuple, list)) and len(op) == width and op[0] in ("F", "B")
                and all(is_integer(k) for k in op[1:])):
            return f"{where}: op {i} is {op!r}; an op is {form}"
        if not (0 <= op[1] < m and (v is None or 0 <= op[2] < v)):
            hint = (f"; with m = {m} < p − s − 1 = {p - s - 1} the warm-up is only m forwards"
                    if v is None and m < p - s - 1 else "")
            return (f"{where}: op {i}, {op!r}, is out of range: micro-batches 0…{m - 1}"
                    f"{'' if v is None else f', local chunks 0…{v - 1}'}{hint}")
    key = [tuple([op[0], *map(int, op[1:])]) for op in ops]
    count = Counter(key)
    for op in [(kind, j, *([] if v is None else [c])) for kind in "FB" for j in range(m)
               for c in range(chunks)]:
        if count[op] != 1:
            return (f"{where}: {op} {'is missing' if not count[op] else 'runs twice or more'};"
                    f" every micro-batch goes forward and backward once"
                    f"{'' if v is None else ' through each chunk'}")
    at = {op: i for i, op in enumerate(key)}
    for op, i in sorted(at.items(), key=lambda item: item[1]):
        forward = ("F", *op[1:])
        if op[0] == "B" and at[forward] > i:
            why = ("a micro-batch can only go back through a stage it went forward through"
                   if v is None else "with v chunks the warm-up needs 2(p−s−1) + (v−1)·p "
                   "forwards (plain 1F1B's p−s−1 are too few)")
            return (f"{where}: {op} at position {i} comes before its forward {forward} at "
                    f"position {at[forward]}: {why}")
    return None


def _stage_orders(name, fn, p, m, v=None):
    """(every stage's ops from fn, each checked by _order_problem, None) or (None, the first
    failure as a Check); v None: plain 1F1B's fn(s, p, m), else fn(s, p, m, v)."""
    ops = []
    for s in range(p):
        got, failed = _call(name, fn, s, p, m, *([] if v is None else [v]),
                            convert=lambda ops: ops)
        if failed is not None:
            return None, Check(name, False, f"stage {s} of p = {p} (m = {m}"
                                            f"{'' if v is None else f', v = {v}'}): "
                                            f"{failed.message}")
        problem = _order_problem(got, s, p, m, v)
        if problem:
            return None, Check(name, False, problem)
        ops.append([tuple([op[0], *map(int, op[1:])]) for op in got])
    return ops, None


def _ideal_timeline(name, fn, where, schedule, p, m, v=None, words=lambda text: text):
    """(simulate's events with fn as the schedule, None) or (None, a failed Check naming who
    waits for what, in words(simulate's text))."""
    from minidist.parallel import pipeline

    with interleaved_schedule(fn, schedule):
        try:
            return pipeline.simulate(schedule, p, m, **({} if v is None else {"chunks": v})), None
        except Exception as exc:  # noqa: BLE001 - learner code: report, never raise
            if isinstance(exc, RuntimeError) and " deadlocks with " in str(exc):
                waits = words(str(exc).split(" stages: ", 1)[1])
                return None, Check(name, False, f"{where}: your order deadlocks: {waits}")
            return None, Check(name, False, f"{where}: on the ideal timeline your function "
                                            f"raised {type(exc).__name__}: {exc}")


def _drives_pipeline(name, fn, where, schedule, single, model_fn, X, y, timeout, **options):
    """None if a real pipeline on thread ranks that follows fn trains as `single`, else the
    failed Check."""
    with interleaved_schedule(fn, schedule):
        hist, failure = _train(model_fn, X, y, timeout, strategy="pipeline", schedule=schedule,
                               **options)
    failure = failure or _differs(hist, single)
    return Check(name, False, f"{where}: driving the real pipeline, {failure}") if failure \
        else None


def _peaks(ops):
    """The most (micro-batch, chunk) activations each stage holds at once."""
    return [int(np.max(np.cumsum([1 if op[0] == "F" else -1 for op in stage]))) for stage in ops]
