"""Lesson 7 (model parallelism): RowParallelLinear's backward, the 1F1B order of ops, and (the
formula exercise) the fewest micro-batches for a given bubble.

The first two checkers put the learner's piece INSIDE a real run on thread ranks — as the
backward of every RowParallelLinear of a tensor-parallel MLP, or as the order every 1F1B
pipeline stage follows (`_schedules`, shared with lesson 12) — and compare the training with
strategy="single" (float64, 1e-10). Before the run they look at the piece on its own, so
that a failure names the rank, the array, the stage or the op that is wrong.
"""

import contextlib
import functools
import math
import re
from fractions import Fraction

import numpy as np

from minidist.exercises._common import (
    Check,
    Exercise,
    _brief,
    _call,
    _check_timeout,
    _differs,
    _train,
)
from minidist.exercises._schedules import (
    _drives_pipeline,
    _ideal_timeline,
    _peaks,
    _stage_orders,
)

TP_SIZES = [6, 12, 6, 12, 3]  # two (column, ReLU, row) blocks; 12 splits over t = 1, 2, 3, 4
PIPE_SIZES = [6, 8, 8, 8, 3]  # 7 layers: up to 7 stages
RUN = {"steps": 3, "batch_size": 24, "lr": 0.2, "optimizer_options": {"momentum": 0.5}}


# ----- exercise 1: RowParallelLinear's backward --------------------------------------------

@contextlib.contextmanager
def row_parallel_grads(fn):
    """Inside: every RowParallelLinear's backward computes its rank's gradients with
    fn(X_k, W_k, dY) -> (dW_k, db, dX_k) (on thread ranks, which share the class); restored
    after."""
    from minidist.parallel.tensor_parallel import RowParallelLinear

    saved = RowParallelLinear.__dict__["local_grads"]
    RowParallelLinear.local_grads = staticmethod(
        lambda X_k, W_k, dY: [np.asarray(g, np.float64) for g in fn(X_k, W_k, dY)])
    try:
        yield
    finally:
        RowParallelLinear.local_grads = saved


def _row_parallel_problem(rng, t):
    """X (n, d_in), W (d_in, d_out), ∂Y (n, d_out) with d_in = t·(1 or 2) rows and d_out ≥ 3."""
    n, d_out, d_in = int(rng.integers(3, 9)), int(rng.integers(3, 6)), t * int(rng.integers(1, 3))
    return rng.normal(size=(n, d_in)), rng.normal(size=(d_in, d_out)), rng.normal(size=(n, d_out))


def _row_parallel_alone(fn, t, rng):
    """The first thing wrong in fn's gradients on every rank of t, for one random layer (None:
    all right). The reference is the whole layer's gradient (Xᵀ∂Y, Σ_n ∂Y, ∂Y Wᵀ), cut."""
    X, W, dY = _row_parallel_problem(rng, t)
    for k in range(t):
        rows = slice(k * W.shape[0] // t, (k + 1) * W.shape[0] // t)
        want = (X.T @ dY)[rows], dY.sum(axis=0), (dY @ W.T)[:, rows]
        got, failed = _call("", fn, X[:, rows].copy(), W[rows].copy(), dY.copy(),
                            convert=lambda grads: [np.asarray(g, np.float64) for g in grads])
        if failed is not None:
            return failed.message
        if len(got) != 3:
            return "return three arrays: (dW_k, db, dX_k)"
        where = f"with t = {t} ranks, rank {k}, X_k {X[:, rows].shape}, W_k {W[rows].shape}"
        for label, g, w in zip(("dW_k", "db", "dX_k"), got, want, strict=True):
            if g.shape != w.shape:
                hint = {"dX_k": " ∂X_k is only this rank's columns: ∂Y W_kᵀ",
                        "db": " sum ∂Y over the rows: shape (d_out,)"}.get(
                            label, " check which factor is transposed")
                return f"{where}, {label} should have shape {w.shape}, got {g.shape}.{hint}"
            if np.allclose(g, w, rtol=1e-10, atol=1e-12):
                continue
            if label == "db" and np.allclose(g * t, w):
                return (f"{where}, db is 1/t of the answer: every rank adds the whole bias "
                        "once, after the all-reduce, so its gradient is the whole Σ_n ∂Y")
            if label == "dX_k" and np.allclose(g, t * w):
                return (f"{where}, dX_k is t times too large: g's backward is the identity, "
                        "no all-reduce")
            bad = np.unravel_index(np.argmax(np.abs(g - w)), w.shape)
            return (f"{where}, {label} is wrong: element {tuple(map(int, bad))} is "
                    f"{g[bad]:.4g}, expected {w[bad]:.4g}")
    return None


def check_row_parallel_backward(fn, world_sizes=(2, 3, 4), seed=0, timeout=60.0):
    """fn(X_k, W_k, dY) -> (dW_k, db, dX_k): RowParallelLinear's backward on rank k, whose
    forward was Y = all_reduce(X_k W_k) + b, with X_k its columns of X and W_k its rows of W.
    First on its own, on random layers against the whole layer's gradient; then the checker
    makes fn the backward of every RowParallelLinear of a tensor-parallel MLP (two blocks)
    trained on t thread ranks, and compares the run with one process at 1e-10."""
    from minidist import data, nn, train

    name = "check_row_parallel_backward"
    sizes = list(world_sizes)
    if not sizes or any(not data.is_integer(t) or not 1 <= t <= 4 for t in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts 1…4, got "
                         f"{world_sizes!r}")
    _check_timeout(timeout)
    rng = np.random.default_rng(seed)
    for t in sizes:
        problem = _row_parallel_alone(fn, t, rng)
        if problem:
            return Check(name, False, problem)
    X, y = data.make_classification(96, TP_SIZES[0], TP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, TP_SIZES, seed=1)
    single = train(model_fn, X, y, **RUN)
    calls = []

    def counted(X_k, W_k, dY):
        calls.append(1)
        return fn(X_k, W_k, dY)

    for t in sizes:
        with row_parallel_grads(counted):
            hist, failure = _train(model_fn, X, y, timeout, strategy="tensor_parallel",
                                   workers=t, **RUN)
        failure = failure or _differs(hist, single)
        if failure:
            return Check(name, False, f"with t = {t} ranks, as the backward of the MLP's "
                                      f"RowParallelLinear layers: {failure}")
    return Check(name, True, f"dW_k = X_kᵀ∂Y, db = Σ_n ∂Y, dX_k = ∂Y W_kᵀ on every rank; as "
                             f"RowParallelLinear's backward ({len(calls)} calls), a "
                             f"tensor-parallel MLP equals one process on "
                             f"t = {', '.join(map(str, sizes))} ranks")


# ----- exercise 2: the 1F1B order of ops -----------------------------------------------------

def _in_stages(message):
    """simulate's words about chunks, for one chunk per stage: ('B', j) for ('B', j, 0), "from
    stage g" for "through global chunk g (stage g's local chunk 0)"."""
    message = re.sub(r"\('([FB])', (\d+), 0\)", r"('\1', \2)", message)
    return re.sub(r"through global chunk (\d+) \(stage \d+'s local chunk 0\)", r"from stage \1",
                  message)


def check_1f1b_ops(fn, cases=((2, 4), (4, 8), (3, 2), (4, 2), (4, 4)), timeout=60.0):
    """fn(stage, stages, micro_batches) -> the 1F1B (PipeDream-Flush) order of stage s of p
    with m micro-batches: ("F", j) and ("B", j), as pipeline.schedule_ops("1f1b", …) gives
    it. For each (p, m) of `cases`: every F and B once, each F before its B, no deadlock on
    the ideal timeline, at most p − s micro-batches' activations held on stage s, the ideal
    bubble (p−1)/(m+p−1); then the order drives a real pipeline of a 7-layer MLP on p thread
    ranks, which must train as one process does (1e-10)."""
    from minidist import data, nn, train
    from minidist.parallel import pipeline
    from minidist.trace import bubble_fraction

    name = "check_1f1b_ops"
    cases = [tuple(case) for case in cases]
    if not cases or any(len(case) != 2 or not all(data.is_integer(x) and x >= 1 for x in case)
                        or case[0] > 7 for case in cases):
        raise ValueError(f"cases must be a non-empty list of (p, m), integers >= 1 with at "
                         f"most p = 7 stages (the MLP's layers), got {cases!r}")
    _check_timeout(timeout)
    X, y = data.make_classification(96, PIPE_SIZES[0], PIPE_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, PIPE_SIZES, seed=1)
    single = train(model_fn, X, y, **RUN)
    for p, m in cases:
        ops, failed = _stage_orders(name, fn, p, m)
        where = f"p = {p}, m = {m}"
        events, failed = (None, failed) if failed is not None else _ideal_timeline(
            name, fn, where, "1f1b", p, m, words=_in_stages)
        if failed is not None:  # a failed Check is falsy
            return failed
        for s, held in enumerate(_peaks(ops)):
            if held > p - s:
                return Check(name, False, f"{where}: stage {s} holds up to {held} "
                                          f"micro-batches' activations at once; 1F1B holds at "
                                          f"most p − s = {p - s} (its warm-up forwards, and the "
                                          "one forward before each backward)")
        bubble, formula = float(bubble_fraction(events)[0]), pipeline.bubble_formula(p, m)
        if bubble > formula + 1e-9:
            return Check(name, False, f"{where}: on the ideal timeline your order idles "
                                      f"{bubble:.4f} of the step, the formula (p−1)/(m+p−1) "
                                      f"{formula:.4f}: some stage waits where it could work "
                                      "(how many forwards can it start before its first "
                                      "backward?)")
        failed = _drives_pipeline(name, fn, where, "1f1b", single, model_fn, X, y, timeout,
                                  workers=p, micro_batches=m, **RUN)
        if failed is not None:  # a failed Check is falsy
            return failed
    return Check(name, True, f"every F and B once, no deadlock, at most p − s activations, the "
                             f"ideal bubble (p−1)/(m+p−1), and real pipelines that train as "
                             f"one process, for (p, m) = {', '.join(map(str, cases))}")


# ----- exercise 3 (formula): enough micro-batches for a bubble ------------------------------

MIN_MICRO_CASES = ((3, 0.3), (4, Fraction(1, 5)), (4, 0.25), (5, Fraction(1, 3)), (6, 0.9),
                   (8, Fraction(1, 10)), (2, Fraction(1, 2)), (1, 0.05), (16, Fraction(3, 100)))


def _ideal_bubble(p, m):
    """(p−1)/(m+p−1), exactly, and as section 3 writes it (not reduced)."""
    return Fraction(p - 1, m + p - 1), f"{p - 1}/{m + p - 1} = {(p - 1) / (m + p - 1):.4f}"


def check_min_micro_batches(fn, cases=MIN_MICRO_CASES):
    """fn(p, target) -> the fewest micro-batches m >= 1 whose ideal bubble (p−1)/(m+p−1) is at
    most `target` (0 < target < 1, a float or a fractions.Fraction). Judged exactly, by the
    definition: bubble(m) <= target and, unless m = 1, bubble(m − 1) > target; the message
    names the fewest, m = max(1, ⌈(p−1)(1−target)/target⌉)."""
    from minidist.data import is_integer

    name = "check_min_micro_batches"
    try:
        cases = [tuple(case) for case in cases]
    except TypeError:
        cases = None
    if not cases or any(len(case) != 2 or not is_integer(case[0]) or case[0] < 1
                        or not isinstance(case[1], (float, Fraction)) or not 0 < case[1] < 1
                        for case in cases):
        raise ValueError(f"cases must be a non-empty list of (p, target): p an integer >= 1, "
                         f"0 < target < 1 a float or a Fraction, got {cases!r}")
    for p, target in cases:
        where = f"with p = {p} stages and target {target}"
        got, failed = _call(name, fn, p, target, convert=lambda m: m)
        if failed is not None:
            return Check(name, False, f"{where}: {failed.message}")
        if not is_integer(got):
            return Check(name, False, f"{where}: return a whole number of micro-batches, got "
                                      f"{_brief(got)}")
        goal, m = Fraction(target), int(got)
        fewest = max(1, math.ceil((p - 1) * (1 - goal) / goal))
        if m < 1:
            return Check(name, False, f"{where}: m = {m}, but a step has at least one "
                                      "micro-batch" + (" (with p = 1 there is no bubble at all)"
                                                       if p == 1 else ""))
        bubble, said = _ideal_bubble(p, m)
        if bubble > goal:
            return Check(name, False, f"{where}: m = {m} leaves a bubble of {said}, more than "
                                      "the target: too few micro-batches (the inequality "
                                      "bounds m from below: round up)")
        if m > 1 and _ideal_bubble(p, m - 1)[0] <= goal:
            edge, said = _ideal_bubble(p, fewest)
            hint = ("" if edge < goal else ", exactly the target, and 'at most' includes it "
                    "(floats can land just above a whole number: keep a Fraction exact)")
            return Check(name, False, f"{where}: m = {m} is not the fewest: m = {fewest} "
                                      f"already leaves {said}{hint}")
    return Check(name, True, f"the fewest micro-batches for {len(cases)} (p, target), the edges "
                             "(a bubble exactly equal to the target) included")


__all__ = ["check_row_parallel_backward", "check_1f1b_ops", "check_min_micro_batches"]

EXERCISES = (
    Exercise(7, "my_row_parallel_backward", check_row_parallel_backward,
             "row_parallel_backward", "RowParallelLinear's backward on one rank, run as the "
             "backward of a tensor-parallel MLP on 2, 3 and 4 thread ranks"),
    Exercise(7, "my_1f1b_ops", check_1f1b_ops, "one_f_one_b_ops",
             "the 1F1B schedule's order of ops on one stage, followed by a real pipeline on "
             "thread ranks"),
    Exercise(7, "my_min_micro_batches", check_min_micro_batches, "min_micro_batches",
             "the fewest micro-batches whose ideal bubble is at most a target: the bubble "
             "formula inverted, with a ceiling, exact at the edges", "formula"),
)
