"""Lesson 12 (parallel transformers): the head split of attention, and the order of ops of the
interleaved 1F1B schedule.

Both checkers put the learner's piece INSIDE a real run on thread ranks — as the `take` of
every ParallelAttention, or as the schedule every interleaved pipeline stage follows — and
compare the training with strategy="single" (float64, 1e-10). Before the run they look at the
piece on its own, so that a failure names the rank, the parameter, the shape, the head or the
op that is wrong.
"""

import contextlib
import functools
from collections import Counter

import numpy as np

from minidist.exercises._common import Check, Exercise, _call, _check_timeout, _differs, _train
from minidist.exercises._schedules import (
    _drives_pipeline,
    _ideal_timeline,
    _peaks,
    _stage_orders,
)

V, T, D, HEADS = 11, 8, 16, 4  # the GPT of exercise 1: d_h = 4, two blocks, d_ff 4d
GPT_RUN = {"steps": 3, "batch_size": 8, "lr": 0.1}
MLP_SIZES = [6, 8, 8, 8, 8, 3]  # exercise 2's MLP: 9 layers, so up to 9 chunks
MLP_RUN = {"steps": 3, "batch_size": 24, "lr": 0.2, "optimizer_options": {"momentum": 0.5}}
NAMES = ("W_qkv", "b_qkv", "W_o", "b_o")
HEAD_AXIS = {"W_qkv": 1, "b_qkv": 1, "W_o": 0}
AXES = {"W_qkv": ("Q/K/V", "the heads", "d (its input rows)", "d_h (a head's width)"),
        "b_qkv": ("Q/K/V", "the heads", "d_h (a head's width)"),
        "W_o": ("the heads (its rows)", "d_h (a head's width)", "d (its output columns)"),
        "b_o": ("d",)}


# ----- exercise 1: the head split of attention ----------------------------------------------

@contextlib.contextmanager
def attention_take(fn):
    """Inside: every ParallelAttention takes its part of the full layer with
    fn(W_qkv, b_qkv, W_o, b_o, rank, t) (on thread ranks, which share the class); restored
    after."""
    from minidist.parallel.megatron import ParallelAttention

    saved = ParallelAttention.__dict__["take"]
    ParallelAttention.take = staticmethod(
        lambda W_qkv, b_qkv, W_o, b_o, rank, t: fn(W_qkv, b_qkv, W_o, b_o, rank, t))
    try:
        yield
    finally:
        ParallelAttention.take = saved


def _labels():
    """The full layer's parameters as labels: element e of the layer holds the number e."""
    from minidist.nn.attention import CausalSelfAttention

    out, start = {}, 0
    for name, shape in CausalSelfAttention(D, HEADS).param_shapes().items():
        size = int(np.prod(shape))
        out[name] = np.arange(start, start + size).reshape(shape)
        start += size
    return out


def _shape_problem(name, got, full, want, rank, t):
    where = f"with t = {t}, rank {rank}'s {name} has shape {got.shape}; it should be {want}"
    if name == "b_o":
        return (f"{where}: b_o is added once, after g's all-reduce, so every rank keeps the "
                "whole bias")
    cut = [AXES[name][i] for i in range(min(got.ndim, full.ndim))
           if got.shape[i] != full.shape[i] and i != HEAD_AXIS[name]]
    if got.ndim == full.ndim and cut:
        return (f"{where}: you split {', '.join(cut)}; split {name} by heads (axis "
                f"{HEAD_AXIS[name]}), H/t = {HEADS // t} whole heads per rank")
    return f"{where}: take H/t = {HEADS // t} whole heads along axis {HEAD_AXIS[name]}"


def _heads_of(name, got, full):
    """Which full head each local head of `got` is (None: not one whole head)."""
    axis = HEAD_AXIS[name]
    return [next((k for k in range(HEADS) if np.array_equal(np.take(got, h, axis),
                                                             np.take(full, k, axis))), None)
            for h in range(got.shape[axis])]


def _probe(fn, t):
    """Call fn on labelled parameters for every rank of t: (the heads each rank got of each
    parameter, None) or (None, a message about the first wrong return value or shape)."""
    full = _labels()
    heads = []
    for rank in range(t):
        got, failed = _call("", fn, *(full[n] for n in NAMES), rank, t, convert=lambda r: r)
        if failed is not None:
            return None, f"with t = {t}, rank {rank}: {failed.message}"
        if not isinstance(got, dict) or set(got) != set(NAMES):
            keys = sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__
            return None, (f"with t = {t}, rank {rank}: return a dict with the keys W_qkv, "
                          f"b_qkv, W_o and b_o, got {keys}")
        mine = {}
        for name in NAMES:
            array, shape = np.asarray(got[name]), list(full[name].shape)
            if name != "b_o":
                shape[HEAD_AXIS[name]] //= t
            if array.shape != tuple(shape):
                return None, _shape_problem(name, array, full[name], tuple(shape), rank, t)
            mine[name] = (np.array_equal(array, full[name]) if name == "b_o"
                          else _heads_of(name, array, full[name]))
        heads.append(mine)
    return heads, None


def _diagnose(heads, t):
    """The first thing wrong in the heads each rank got (Megatron's split if nothing is)."""
    megatron = [list(range(r * HEADS // t, (r + 1) * HEADS // t)) for r in range(t)]
    for rank, mine in enumerate(heads):
        if not mine["b_o"]:
            return f"rank {rank}'s b_o is not the whole b_o"
        for name in HEAD_AXIS:
            if None in mine[name]:
                return (f"rank {rank}'s {name} holds a block that is no single head: take "
                        f"whole heads, along axis {HEAD_AXIS[name]}")
        if len({tuple(mine[name]) for name in HEAD_AXIS}) > 1:
            return (f"rank {rank} got heads {mine['W_qkv']} of W_qkv, {mine['b_qkv']} of "
                    f"b_qkv and {mine['W_o']} of W_o: a head's Q, K, V and its rows of W_o must "
                    "be on the same rank")
    held = Counter(h for mine in heads for h in mine["W_qkv"])
    for h in range(HEADS):
        if held[h] != 1:
            owners = [r for r, mine in enumerate(heads) if h in mine["W_qkv"]]
            return (f"head {h} is on {'no rank' if not owners else f'ranks {owners}'}: each "
                    f"head belongs to exactly one rank (Megatron: rank k gets heads "
                    f"[k·H/t, (k+1)·H/t), {megatron})")
    for rank, mine in enumerate(heads):
        if mine["W_qkv"] != megatron[rank]:
            return (f"rank {rank} got heads {mine['W_qkv']} of W_qkv (Megatron gives it "
                    f"{megatron[rank]})")
    return None


def check_attention_take(fn, world_sizes=(2, 4), timeout=60.0):
    """fn(W_qkv, b_qkv, W_o, b_o, rank, t) -> {"W_qkv", "b_qkv", "W_o", "b_o"}: rank `rank`
    of t's part of a full attention layer (W_qkv (3, H, d, d_h), b_qkv (3, H, d_h),
    W_o (H, d_h, d), b_o (d,)): H/t whole heads of the first three, b_o whole. The checker
    makes fn the `take` of every ParallelAttention of a tensor-parallel GPT (H = 4 heads,
    d = 16) trained on t thread ranks, and compares the run with one process at 1e-10."""
    from minidist import nn, train

    name = "check_attention_take"
    sizes = list(world_sizes)
    if not sizes or any(not isinstance(t, int) or t < 1 or HEADS % t for t in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts that divide the "
                         f"{HEADS} heads (1, 2 or 4), got {world_sizes!r}")
    _check_timeout(timeout)
    tokens = np.random.default_rng(0).integers(0, V, (32, T + 1))
    X, Y = tokens[:, :-1], tokens[:, 1:]
    model_fn = functools.partial(nn.gpt, V, T, d_model=D, n_heads=HEADS, n_layers=2, seed=1)
    single = train(model_fn, X, Y, **GPT_RUN)
    notes = []
    for t in sizes:
        heads, problem = _probe(fn, t)
        if problem:
            return Check(name, False, problem)
        with attention_take(fn):
            hist, failure = _train(model_fn, X, Y, timeout, strategy="tensor_parallel",
                                   workers=t, **GPT_RUN)
        failure = failure or _differs(hist, single)
        if failure:
            wrong = _diagnose(heads, t) or "your parts put together are not the full layer"
            return Check(name, False, f"with t = {t} ranks, {wrong}; {failure}")
        if _diagnose(heads, t):
            notes.append(f"t = {t}: {_diagnose(heads, t)}, which works too")
    return Check(name, True, f"a tensor-parallel GPT with your take equals one process on "
                             f"t = {', '.join(map(str, sizes))} ranks"
                             + (f" ({'; '.join(notes)})" if notes else ""))


# ----- exercise 2: the interleaved schedule's order of ops ----------------------------------

def check_interleaved_ops(fn, cases=((2, 4, 2), (2, 2, 2), (4, 8, 2), (3, 6, 3)), timeout=60.0):
    """fn(stage, stages, micro_batches, chunks) -> the interleaved 1F1B order of stage s of p
    with m micro-batches and v chunks per stage: ("F", j, c) and ("B", j, c), c the LOCAL
    chunk (global chunk c·p + s), as pipeline.schedule_ops("interleaved_1f1b", …) gives it.
    For each (p, m, v) of `cases`: every F and B once, each F before its B, no deadlock, the
    ideal bubble (p−1)/(v·m+p−1) and no more activations held than Megatron's order; then the
    order drives a real pipeline of a 9-layer MLP on p thread ranks, which must train as one
    process does (1e-10)."""
    from minidist import data, nn, train
    from minidist.parallel import pipeline
    from minidist.trace import bubble_fraction

    name = "check_interleaved_ops"
    cases = [tuple(case) for case in cases]
    if not cases or any(len(case) != 3 or not all(data.is_integer(x) and x >= 1 for x in case)
                        or case[1] % case[0] or case[0] * case[2] > 9 for case in cases):
        raise ValueError(f"cases must be a non-empty list of (p, m, v), integers >= 1 with m "
                         f"divisible by p and p·v <= 9 chunks, got {cases!r}")
    _check_timeout(timeout)
    X, y = data.make_classification(96, MLP_SIZES[0], MLP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, MLP_SIZES, seed=1)
    single = train(model_fn, X, y, **MLP_RUN)
    for p, m, v in cases:
        ops, failed = _stage_orders(name, fn, p, m, v)
        where = f"p = {p}, m = {m}, v = {v}"
        events, failed = (None, failed) if failed is not None else _ideal_timeline(
            name, fn, where, "interleaved_1f1b", p, m, v)
        if failed is not None:  # a failed Check is falsy
            return failed
        bubble = float(bubble_fraction(events)[0])
        formula = pipeline.bubble_formula(p, m, v)
        if bubble > formula + 1e-9:
            return Check(name, False, f"{where}: on the ideal timeline your order idles "
                                      f"{bubble:.4f} of the step, the formula (p−1)/(v·m+p−1) "
                                      f"{formula:.4f}: some stage waits where it could work")
        megatron = _peaks([pipeline.schedule_ops("interleaved_1f1b", s, p, m, v)
                           for s in range(p)])
        for s, (held, most) in enumerate(zip(_peaks(ops), megatron, strict=True)):
            if held > most:
                return Check(name, False, f"{where}: stage {s} holds up to {held} "
                                          f"(micro-batch, chunk) activations at once, "
                                          f"Megatron's order {most}: after the warm-up, "
                                          "alternate one forward and one backward")
        failed = _drives_pipeline(name, fn, where, "interleaved_1f1b", single, model_fn, X, y,
                                  timeout, workers=p, chunks=v, micro_batches=m, **MLP_RUN)
        if failed is not None:  # a failed Check is falsy
            return failed
    return Check(name, True, f"every F and B once, no deadlock, the ideal bubble "
                             f"(p−1)/(v·m+p−1), and real pipelines that train as one process, "
                             f"for (p, m, v) = {', '.join(map(str, cases))}")


__all__ = ["check_attention_take", "check_interleaved_ops"]

EXERCISES = (
    Exercise(12, "my_attention_take", check_attention_take, "attention_take",
             "the head split of attention: each rank's Q, K, V columns and W_o rows, run as the "
             "`take` of every layer of a tensor-parallel GPT on 2 and 4 ranks"),
    Exercise(12, "my_interleaved_ops", check_interleaved_ops, "interleaved_ops",
             "the interleaved 1F1B schedule's order of ops, followed by a real pipeline on "
             "thread ranks"),
)
