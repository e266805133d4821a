"""Lesson 8 (communication efficiency): top-k with error feedback, QSGD codes.

The top-k checker puts the learner's function INSIDE a real data-parallel run with top-k
compression on thread ranks — it builds every rank's message and residual, each step — and
compares the training with minidist's own top-k run (float64, 1e-10; compression changes the
SGD, so one process is only the context). Before the run it looks at the function on its own,
so that a failure names the entry, the residual or the k that is wrong.
"""

import contextlib
import functools

import numpy as np

from minidist.exercises._common import Check, Exercise, _call, _check_timeout, _differs, _train

MLP_SIZES = [6, 8, 3]  # n = 83 parameters
RUN = {"steps": 5, "batch_size": 24, "lr": 0.2}
RATIO = 0.1  # k = ⌈0.1·83⌉ = 9 entries a step
OWN = "minidist's own top-k run"  # the reference run, as the messages name it


def _topk_dense(values, k, key=np.abs):
    """values kept at the k entries with the largest key(values), zeros elsewhere."""
    kept = np.zeros_like(values)
    top = np.argsort(-key(values), kind="stable")[:k]
    kept[top] = values[top]
    return kept


@contextlib.contextmanager
def topk_feedback(fn):
    """Inside: every top-k compressed all-reduce with error feedback builds its message with
    fn(grad, residual, k) -> (sent, new_residual) (on thread ranks, which share the class): it
    sends the k entries of `sent` in the library's format (int32 index, float64 value) and
    keeps new_residual; other compressions are untouched; restored after."""
    from minidist.parallel.compression import CompressedAllReduce, TopK

    saved = CompressedAllReduce.__dict__["compress"]

    def compress(self, grad, clock):
        if not isinstance(self.compressor, TopK) or self.residual is None:
            return saved(self, grad, clock)
        sent, new = (np.asarray(a, np.float64).reshape(-1)
                     for a in fn(grad.copy(), self.residual.copy(), self.compressor.k))
        self.residual[...] = new
        return clock.timed("compute", self.compressor.encode, sent, event="compress")

    CompressedAllReduce.compress = compress
    try:
        yield
    finally:
        CompressedAllReduce.compress = saved


def _topk_alone(fn, rng):
    """The first thing wrong in fn on one random problem (None: all right)."""
    n = int(rng.integers(8, 40))
    k = int(rng.integers(1, n // 2))
    grad, residual = rng.normal(size=n), 0.5 * rng.normal(size=n)
    corrected = grad + residual
    want = _topk_dense(corrected, k)
    try:
        sent, new = (np.asarray(a, dtype=np.float64).reshape(-1)
                     for a in fn(grad.copy(), residual.copy(), k))
    except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
        return (f"your function raised {type(exc).__name__}: {exc}. Return the pair "
                "(sent, new_residual)")
    case = f"n = {n}, k = {k}"
    if sent.shape != (n,) or new.shape != (n,):
        return (f"{case}: return two vectors of length n = {n}, got shapes {sent.shape} and "
                f"{new.shape}")
    if np.allclose(sent, want) and np.allclose(new, corrected - want):
        return None
    hints = [
        (sent, _topk_dense(grad, k), "you compressed the gradient alone: add the residual "
         "first (c = grad + residual), or what was held back is never sent"),
        (sent, _topk_dense(corrected, k, key=lambda v: v), "you kept the k largest values; "
         "keep the k largest magnitudes |c|: a large negative entry matters as much"),
        (new, grad - want, "the new residual is c − sent, with c = grad + residual: the "
         "old residual that was not sent this time must stay"),
        (new, residual, "the residual must change: it becomes c − sent, what was held back"),
    ]
    for got, wrong, hint in hints:
        if np.allclose(got, wrong):
            return f"{case}: {hint}"
    if np.count_nonzero(sent) != k:
        return f"{case}: send exactly k = {k} entries, got {np.count_nonzero(sent)} non-zero ones"
    bad = int(np.argmax(np.abs(sent - want) + np.abs(new - (corrected - want))))
    return (f"{case}: entry {bad} should be sent = {want[bad]:.4g}, new_residual = "
            f"{corrected[bad] - want[bad]:.4g}; you gave {sent[bad]:.4g} and {new[bad]:.4g}")


def _sent_by_rank_0(hist):
    """Bytes rank 0 sent for training (the start-up broadcast of θ left out)."""
    return sum(s["bytes_sent"] for op, s in hist.stats[0].items() if op != "broadcast")


def check_topk_error_feedback(fn, trials=4, world_sizes=(2, 3), seed=0, timeout=60.0):
    """fn(grad, residual, k) should return (sent, new_residual): with c = grad + residual, `sent`
    keeps the k entries of c with the largest |c| (zeros elsewhere) and new_residual = c − sent.
    First on `trials` random problems on its own; then the checker makes fn build every
    rank's message of a data-parallel run with top-k compression (compress_ratio 0.1) on p
    thread ranks, and compares the run with minidist's own top-k run at 1e-10."""
    from minidist import data, nn, train
    from minidist.cost import bytes_per_rank

    name = "check_topk_error_feedback"
    sizes = list(world_sizes)
    if not sizes or any(not data.is_integer(p) or not 1 <= p <= 4 for p in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts 1…4, got "
                         f"{world_sizes!r}")
    if not data.is_integer(trials) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    _check_timeout(timeout)
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        problem = _topk_alone(fn, rng)
        if problem:
            return Check(name, False, problem)
    X, y = data.make_classification(96, MLP_SIZES[0], MLP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, MLP_SIZES, seed=1)
    single = train(model_fn, X, y, **RUN)
    options = {"strategy": "data_parallel", "compression": "topk", "compress_ratio": RATIO,
               **RUN}
    notes = []
    for p in sizes:
        own = train(model_fn, X, y, backend="thread", timeout=timeout, workers=p, **options)
        with topk_feedback(fn):
            hist, failure = _train(model_fn, X, y, timeout, workers=p, **options)
        failure = failure or _differs(hist, own, OWN)
        if failure:
            return Check(name, False, f"with p = {p} ranks, building every rank's top-k "
                                      f"message: {failure}")
        if _sent_by_rank_0(hist) != _sent_by_rank_0(own):
            return Check(name, False, f"with p = {p} ranks, rank 0 sent "
                                      f"{_sent_by_rank_0(hist)} bytes, minidist's own run "
                                      f"{_sent_by_rank_0(own)}")
        ring = bytes_per_rank("all_reduce", "ring", hist.params.size, 8, p)[0][0]
        notes.append(f"p = {p}: rank 0 sends {_sent_by_rank_0(hist) // RUN['steps']} bytes a "
                     f"step (the ring all-reduce of the gradient: {ring}), final loss "
                     f"{hist.loss[-1]:.4f} (one process, uncompressed: {single.loss[-1]:.4f})")
    return Check(name, True, f"top-k of grad + residual, and the rest kept, on {trials} "
                             f"problems; inside data-parallel top-k runs it trains as "
                             f"minidist's own ({'; '.join(notes)})")


def check_qsgd_codes(fn, cases=((5, 1), (12, 3), (40, 7), (9, 127)), seed=0):
    """fn(v, levels, u) should return QSGD's integer codes sign(v_i)·⌊s·|v_i|/‖v‖₂ + u_i⌋, with
    s = levels and u one uniform draw in [0, 1) per entry; all zeros when v = 0."""
    name = "check_qsgd_codes"
    rng = np.random.default_rng(seed)
    problems = [(rng.normal(size=n), s, rng.random(n)) for n, s in cases]
    problems.append((np.zeros(4), 3, rng.random(4)))
    for v, s, u in problems:
        norm = np.linalg.norm(v)
        scaled = s * np.abs(v) / norm if norm > 0 else np.zeros_like(v)
        want = np.sign(v) * np.floor(scaled + u)
        with np.errstate(all="ignore"):
            got, failed = _call(name, fn, v.copy(), s, u.copy())
        if failed is not None:
            return failed
        got = got.reshape(-1)
        case = f"n = {len(v)}, levels s = {s}"
        if got.shape != want.shape:
            return Check(name, False, f"{case}: return one code per entry ({len(v)}), got "
                                      f"{got.size}")
        if np.array_equal(got, want):
            continue
        if norm == 0:
            return Check(name, False, "a zero vector has no direction: its codes are all 0 "
                                      "(guard the division by ‖v‖₂ = 0)")
        hints = [
            (np.sign(v) * np.round(scaled), "you rounded to the nearest level; use the draws: "
             "⌊x + u⌋ rounds x up with probability equal to its fractional part, which is what "
             "makes the codes unbiased"),
            (np.sign(v) * np.floor(scaled), "always rounding down makes every code too small on "
             "average; add the uniform draw u before the floor"),
            (np.floor(scaled + u), "the codes lost their sign: multiply by sign(v_i)"),
            (np.sign(v) * np.floor(s * np.abs(v) / np.abs(v).max() + u), "scale by the 2-norm "
             "‖v‖₂, not by the largest entry"),
        ]
        hint = next((h for wrong, h in hints if np.array_equal(got, wrong)),
                    f"expected {want.astype(int).tolist()}, got {got.tolist()}")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"QSGD codes on {len(problems)} vectors, the zero vector included")


__all__ = ["check_topk_error_feedback", "check_qsgd_codes"]

EXERCISES = (
    Exercise(8, "my_topk_feedback", check_topk_error_feedback, "topk_feedback",
             "top-k compression with error feedback, building every rank's message in a "
             "data-parallel run on 2 and 3 thread ranks"),
    Exercise(8, "my_qsgd_codes", check_qsgd_codes, "qsgd_codes",
             "QSGD's integer codes of a vector, worked out from the formula", "formula"),
)
