"""Lessons 7 and 8's checkers pass the reference solutions, explain typical mistakes, and put the
learner's piece inside the real run (the hooks are restored after)."""

import math
from fractions import Fraction

import numpy as np
import pytest

from minidist import exercises
from minidist.exercises import compression as compression_checkers
from minidist.exercises import model_parallel as checkers
from minidist.exercises._schedules import interleaved_schedule
from minidist.exercises.solutions import compression as compression_solutions
from minidist.exercises.solutions import model_parallel as solutions
from minidist.parallel import pipeline
from minidist.parallel.compression import CompressedAllReduce
from minidist.parallel.tensor_parallel import RowParallelLinear

# ----- lesson 7, exercise 1: RowParallelLinear's backward -----------------------------------


def test_row_parallel_checker_passes_the_solution_which_is_the_librarys_backward():
    check = exercises.check_row_parallel_backward(solutions.row_parallel_backward)
    assert check and "a tensor-parallel MLP equals one process on t = 2, 3, 4 ranks" in \
        check.message, check
    rng = np.random.default_rng(0)
    X, W, dY = rng.normal(size=(7, 3)), rng.normal(size=(3, 5)), rng.normal(size=(7, 5))
    for mine, library in zip(solutions.row_parallel_backward(X, W, dY),
                             RowParallelLinear.local_grads(X, W, dY), strict=True):
        np.testing.assert_allclose(mine, library, rtol=1e-12)


@pytest.mark.parametrize("answer, words", [
    (lambda X, W, dY: (X.T @ dY, dY.sum(0) / 2, dY @ W.T),
     "with t = 2 ranks, rank 0, X_k (8, 2), W_k (2, 4), db is 1/t of the answer: every rank "
     "adds the whole bias once"),
    (lambda X, W, dY: (X.T @ dY, dY.sum(0), 2 * dY @ W.T),
     "rank 0, X_k (8, 2), W_k (2, 4), dX_k is t times too large: g's backward is the identity"),
    (lambda X, W, dY: (X.T @ dY, dY.sum(0), dY), "dX_k should have shape (8, 2), got (8, 4)"),
    (lambda X, W, dY: (dY.T @ X, dY.sum(0), dY @ W.T), "dW_k should have shape (2, 4)"),
    (lambda X, W, dY: (X.T @ dY, dY.sum(0, keepdims=True), dY @ W.T),
     "db should have shape (4,), got (1, 4). sum ∂Y over the rows: shape (d_out,)"),
    (lambda X, W, dY: (X.T @ dY, dY.mean(0), dY @ W.T),
     "rank 0, X_k (8, 2), W_k (2, 4), db is wrong: element (0,) is 0.3914, expected 3.131"),
    (lambda X, W, dY: (X.T @ dY, dY.sum(0)), "return three arrays: (dW_k, db, dX_k)"),
    (lambda X, W, dY: 1 / 0, "raised ZeroDivisionError"),
], ids=["db-over-t", "dX-all-reduced", "dX-whole", "dW-transposed", "db-keepdims", "db-mean",
        "two-arrays", "raises"])
def test_row_parallel_checker_names_the_mistake(answer, words):
    check = exercises.check_row_parallel_backward(answer)
    assert not check and words in check.message and "✘" in repr(check), check


def test_the_row_parallel_hook_is_what_the_run_uses_and_is_restored():
    """Every RowParallelLinear of the run calls the learner's function (3 steps × 2 blocks ×
    every rank); a function that is right on the checker's small layers but wrong on the
    run's 24 rows is caught by the run; the library's backward is back after either."""
    saved = RowParallelLinear.__dict__["local_grads"]
    calls = []

    def spy(X_k, W_k, dY):
        calls.append(len(X_k))
        return solutions.row_parallel_backward(X_k, W_k, dY)

    assert exercises.check_row_parallel_backward(spy, world_sizes=(2, 4))
    assert calls.count(24) == checkers.RUN["steps"] * 2 * (2 + 4)
    assert RowParallelLinear.__dict__["local_grads"] is saved

    def wrong_on_big_batches(X_k, W_k, dY):
        dW, db, dX = solutions.row_parallel_backward(X_k, W_k, dY)
        return (2 * dW if len(X_k) > 10 else dW), db, dX

    check = exercises.check_row_parallel_backward(wrong_on_big_batches)
    assert not check and "with t = 2 ranks, as the backward of the MLP's RowParallelLinear " \
        "layers: the run's loss differs from single at step 1" in check.message, check
    assert RowParallelLinear.__dict__["local_grads"] is saved

    def raises_in_the_run(X_k, W_k, dY):
        if len(X_k) > 10:
            raise NotImplementedError("not for big batches")
        return solutions.row_parallel_backward(X_k, W_k, dY)

    check = exercises.check_row_parallel_backward(raises_in_the_run, world_sizes=(3,))
    assert not check and "with t = 3 ranks" in check.message
    assert "a rank raised NotImplementedError" in check.message, check
    assert RowParallelLinear.__dict__["local_grads"] is saved


# ----- lesson 7, exercise 2: the 1F1B order of ops ------------------------------------------

def one_f_one_b(warmup=lambda s, p: p - s - 1, backward_first=False, clamp=True):
    """The solution's order with its warm-up or its steady phase swapped for a mistake
    (clamp=False: the warm-up is not cut to m, which only shows when m < p − 1)."""
    def ops(stage, stages, micro_batches):
        m = micro_batches
        w = min(warmup(stage, stages), m) if clamp else warmup(stage, stages)
        out = [("F", j) for j in range(w)]
        for j in range(m - w):
            out += [("B", j), ("F", w + j)] if backward_first else [("F", w + j), ("B", j)]
        return out + [("B", j) for j in range(max(m - w, 0), m)]
    return ops


def test_1f1b_checker_passes_the_solution_which_is_the_librarys_order():
    check = exercises.check_1f1b_ops(solutions.one_f_one_b_ops)
    assert check and "(2, 4), (4, 8), (3, 2), (4, 2), (4, 4)" in check.message, check
    for p in range(1, 6):
        for m in range(1, 9):
            for s in range(p):
                assert solutions.one_f_one_b_ops(s, p, m) == pipeline.schedule_ops("1f1b", s, p, m)


@pytest.mark.parametrize("answer, words", [
    (lambda s, p, m: [("F", j) for j in range(m)] + [("B", j) for j in range(m)],
     "p = 2, m = 4: stage 0 holds up to 4 micro-batches' activations at once; 1F1B holds at "
     "most p − s = 2"),
    (one_f_one_b(warmup=lambda s, p: s),
     "p = 2, m = 4: your order deadlocks: stage 0 waits at its op 1, ('B', 0), for the backward "
     "of micro-batch 0 from stage 1; stage 1 waits at its op 1, ('F', 1), for the forward of "
     "micro-batch 1 from stage 0"),
    (one_f_one_b(warmup=lambda s, p: p - s),
     "p = 2, m = 4: stage 0 holds up to 3 micro-batches' activations at once; 1F1B holds at "
     "most p − s = 2"),
    (one_f_one_b(warmup=lambda s, p: 0),
     "p = 2, m = 4: on the ideal timeline your order idles 0.5000 of the step, the formula "
     "(p−1)/(m+p−1) 0.2000"),
    (one_f_one_b(warmup=lambda s, p: p - s - 1, clamp=False),
     "stage 0 of p = 4 (m = 2): op 2, ('F', 2), is out of range: micro-batches 0…1; with m = 2 "
     "< p − s − 1 = 3 the warm-up is only m forwards"),
    (one_f_one_b(backward_first=True),
     "stage 1 of p = 2 (m = 4): ('B', 0) at position 0 comes before its forward ('F', 0) at "
     "position 1"),
    (lambda s, p, m: solutions.one_f_one_b_ops(s, p, m)[:-1],
     "stage 0 of p = 2 (m = 4): ('B', 3) is missing"),
    (lambda s, p, m: [("F", j, 0) for j in range(m)],
     "op 0 is ('F', 0, 0); an op is ('F' or 'B', micro-batch j)"),
    (lambda s, p, m: [("F", m)], "op 0, ('F', 4), is out of range: micro-batches 0…3"),
    (lambda s, p, m: None, "stage 0 of p = 2 (m = 4): return a list of ops, got NoneType"),
], ids=["gpipe", "reversed-warm-up", "warm-up-too-long", "no-warm-up", "warm-up-over-m",
        "backward-first",
        "missing-op", "interleaved-format", "out-of-range", "nothing"])
def test_1f1b_checker_names_the_mistake(answer, words):
    check = exercises.check_1f1b_ops(answer)
    assert not check and words in check.message and "✘" in repr(check), check


def test_1f1b_hook_drives_the_real_pipeline_and_is_restored():
    """The learner's function is what the real run's stages follow, every step; an order that
    turns bad only in the real run hangs there, and the checker reports the hang; the
    library's schedule_ops is back afterwards."""
    seen = []

    def spy(stage, stages, micro_batches):
        seen.append(stage)
        return solutions.one_f_one_b_ops(stage, stages, micro_batches)

    original = pipeline.schedule_ops
    assert exercises.check_1f1b_ops(spy, cases=[(3, 4)])
    # per stage: the checker's own call, simulate's, and the real run's, once per step
    assert [seen.count(s) for s in range(3)] == [2 + checkers.RUN["steps"]] * 3
    assert pipeline.schedule_ops is original

    calls = []

    def deadlocks_later(stage, stages, micro_batches):
        calls.append(stage)
        if len(calls) > 2 * stages:  # the real run: the reversed warm-up of the cases above
            return one_f_one_b(warmup=lambda s, p: s)(stage, stages, micro_batches)
        return solutions.one_f_one_b_ops(stage, stages, micro_batches)

    check = exercises.check_1f1b_ops(deadlocks_later, cases=[(2, 4)], timeout=2)
    assert not check and "p = 2, m = 4: driving the real pipeline, the ranks hung (ended " \
        "after 2 s)" in check.message, check
    assert pipeline.schedule_ops is original
    with interleaved_schedule(lambda *args: [("F", 0)], "1f1b"):
        assert pipeline.schedule_ops("1f1b", 0, 2, 2) == [("F", 0)]
        assert pipeline.schedule_ops("gpipe", 0, 2, 2) == original("gpipe", 0, 2, 2)
    assert pipeline.schedule_ops is original


def test_a_stub_is_reported_not_raised():
    def stub(stage, stages, micro_batches):
        raise NotImplementedError("write the 1F1B order")

    check = exercises.check_1f1b_ops(stub)
    assert not check and "stage 0 of p = 2 (m = 4): your function raised " \
        "NotImplementedError: write the 1F1B order" in check.message, check


# ----- lesson 7, exercise 3 (formula): the fewest micro-batches for a bubble ----------------

def test_min_micro_batches_checker_passes_the_solution_which_is_the_fewest_by_search():
    """The solution is the first m of a search over m = 1, 2, … with the exact bubble, and on
    the ideal timeline (pipeline.simulate) that m's bubble is at most the target, m − 1's not."""
    from minidist.trace import bubble_fraction

    check = exercises.check_min_micro_batches(solutions.min_micro_batches)
    assert check and "the fewest micro-batches for 9 (p, target)" in check.message, check
    targets = [Fraction(k, 20) for k in range(1, 20)] + [0.3, 0.07, 0.25, 0.999]
    for p in range(1, 10):
        for target in targets:
            fewest = next(m for m in range(1, 10**5)
                          if Fraction(p - 1, m + p - 1) <= Fraction(target))
            assert solutions.min_micro_batches(p, target) == fewest, (p, target)
    for p, target in ((3, 0.3), (4, 0.25), (6, 0.9)):
        m = solutions.min_micro_batches(p, target)
        measured = [float(bubble_fraction(pipeline.simulate("1f1b", p, k))[0]) for k in (m - 1, m)
                    if k >= 1]
        assert measured[-1] <= target + 1e-12 and (m == 1 or measured[0] > target), (p, m)


@pytest.mark.parametrize("answer, words", [
    (lambda p, t: max(1, int((p - 1) * (1 - t) / t)),
     "with p = 3 stages and target 0.3: m = 4 leaves a bubble of 2/6 = 0.3333, more than the "
     "target: too few micro-batches (the inequality bounds m from below: round up)"),
    (lambda p, t: max(1, math.ceil((p - 1) * (1 - float(t)) / float(t))),
     "with p = 4 stages and target 1/5: m = 13 is not the fewest: m = 12 already leaves 3/15 = "
     "0.2000, exactly the target, and 'at most' includes it"),
    (lambda p, t: max(1, math.ceil((p - 1) / t)),
     "with p = 3 stages and target 0.3: m = 7 is not the fewest: m = 5 already leaves 2/7 = "
     "0.2857"),
    (lambda p, t: math.ceil((p - 1) * (1 - Fraction(t)) / Fraction(t)),
     "with p = 1 stages and target 0.05: m = 0, but a step has at least one micro-batch (with "
     "p = 1 there is no bubble at all)"),
    (lambda p, t: float(solutions.min_micro_batches(p, t)),
     "with p = 3 stages and target 0.3: return a whole number of micro-batches, got 5.0"),
    (lambda p, t: 1 / 0, "target 0.3: your function raised ZeroDivisionError"),
], ids=["rounded-down", "floats-at-the-edge", "idle-over-useful", "no-max-1", "float", "raises"])
def test_min_micro_batches_checker_names_the_mistake(answer, words):
    check = exercises.check_min_micro_batches(answer)
    assert not check and words in check.message and "✘" in repr(check), check


# ----- lesson 8, exercise 1: top-k with error feedback ---------------------------------------

def top_of(values, k, key=np.abs):
    sent = np.zeros_like(values)
    top = np.argsort(-key(values))[:k]
    sent[top] = values[top]
    return sent


def test_topk_checker_passes_the_solution_which_is_the_librarys_compressor():
    check = exercises.check_topk_error_feedback(compression_solutions.topk_feedback)
    assert check and "inside data-parallel top-k runs it trains as minidist's own (p = 2: rank " \
        "0 sends 108 bytes a step (the ring all-reduce of the gradient: 664)" in check.message
    from minidist.parallel.compression import TopK

    rng = np.random.default_rng(1)
    grad, residual = rng.normal(size=50), rng.normal(size=50)
    library = TopK(50, 0.1)
    sent, new = compression_solutions.topk_feedback(grad, residual, library.k)
    np.testing.assert_array_equal(sent, library.decode(library.encode(grad + residual)))
    np.testing.assert_allclose(new, grad + residual - sent, rtol=0, atol=0)


@pytest.mark.parametrize("answer, words", [
    (lambda g, r, k: (top_of(g, k), g - top_of(g, k)),
     "n = 35, k = 11: you compressed the gradient alone: add the residual first"),
    (lambda g, r, k: (top_of(g + r, k, key=lambda v: v), g + r - top_of(g + r, k, key=lambda v: v)),
     "keep the k largest magnitudes |c|"),
    (lambda g, r, k: (top_of(g + r, k), g - top_of(g + r, k)),
     "the old residual that was not sent this time must stay"),
    (lambda g, r, k: (top_of(g + r, k), r), "n = 35, k = 11: the residual must change"),
    (lambda g, r, k: (top_of(g + r, k + 1), g + r - top_of(g + r, k + 1)),
     "send exactly k = 11 entries, got 12 non-zero ones"),
    (lambda g, r, k: (top_of(g + r, k), g + r - top_of(g + r, k) + 1e-3 * (np.arange(len(g)) == 3)),
     "n = 35, k = 11: entry 3 should be sent = 0, new_residual ="),
    (lambda g, r, k: (g[:k], r), "return two vectors of length n = 35"),
    (lambda g, r, k: top_of(g + r, k), "raised ValueError"),
], ids=["no-residual", "largest-values", "residual-drops-old", "residual-unchanged", "k-plus-one",
        "one-entry", "short", "one-vector"])
def test_topk_checker_names_the_mistake(answer, words):
    check = exercises.check_topk_error_feedback(answer)
    assert not check and words in check.message and "✘" in repr(check), check


def test_the_topk_hook_is_what_the_run_uses_and_is_restored():
    """Every rank's top-k message of the run is built by the learner's function (5 steps × p
    ranks); one right on the checker's short vectors but wrong on the model's 83 entries is
    caught by the run, which names the step; the library's compress is back after either."""
    saved = CompressedAllReduce.__dict__["compress"]
    ks = []

    def spy(grad, residual, k):
        ks.append((len(grad), k))
        return compression_solutions.topk_feedback(grad, residual, k)

    assert exercises.check_topk_error_feedback(spy, world_sizes=(2, 3))
    assert ks.count((83, 9)) == compression_checkers.RUN["steps"] * (2 + 3)
    assert CompressedAllReduce.__dict__["compress"] is saved

    def no_feedback_on_big_vectors(grad, residual, k):
        if len(grad) < 50:
            return compression_solutions.topk_feedback(grad, residual, k)
        return top_of(grad, k), grad - top_of(grad, k)

    check = exercises.check_topk_error_feedback(no_feedback_on_big_vectors)
    assert not check and "with p = 2 ranks, building every rank's top-k message: the run's " \
        "loss differs from minidist's own top-k run at step 2" in check.message, check
    assert CompressedAllReduce.__dict__["compress"] is saved

    def raises_in_the_run(grad, residual, k):
        if len(grad) > 50:
            raise NotImplementedError("write top-k")
        return compression_solutions.topk_feedback(grad, residual, k)

    check = exercises.check_topk_error_feedback(raises_in_the_run, world_sizes=(3,))
    assert not check and "with p = 3 ranks" in check.message
    assert "a rank raised NotImplementedError" in check.message, check
    assert CompressedAllReduce.__dict__["compress"] is saved


# ----- lesson 8, exercise 2 (formula): QSGD codes --------------------------------------------

def test_qsgd_codes_checker():
    assert exercises.check_qsgd_codes(compression_solutions.qsgd_codes)
    scaled = lambda v, s: s * np.abs(v) / np.linalg.norm(v)  # noqa: E731
    cases = {
        "rounded to the nearest level": lambda v, s, u: np.sign(v) * np.round(scaled(v, s)),
        "add the uniform draw": lambda v, s, u: np.sign(v) * np.floor(scaled(v, s)),
        "lost their sign": lambda v, s, u: np.floor(scaled(v, s) + u),
        "not by the largest entry": lambda v, s, u: np.sign(v) * np.floor(
            s * np.abs(v) / np.abs(v).max() + u),
        "zero vector has no direction": lambda v, s, u: np.sign(v) * np.floor(scaled(v, s) + u),
        "one code per entry": lambda v, s, u: compression_solutions.qsgd_codes(v, s, u)[:-1],
        "raised ZeroDivisionError": lambda v, s, u: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_qsgd_codes(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


# ----- both lessons --------------------------------------------------------------------------

def test_the_catalog_lists_the_exercises_and_the_solutions_pass():
    from minidist.exercises import catalog

    for lesson, names, kinds in ((7, ["my_row_parallel_backward", "my_1f1b_ops",
                                      "my_min_micro_batches"], ["build", "build", "formula"]),
                                 (8, ["my_topk_feedback", "my_qsgd_codes"], ["build", "formula"])):
        found = catalog.exercises(lesson)
        assert [e.name for e in found] == names and [e.kind for e in found] == kinds
        for exercise in found:
            assert exercise.checker(catalog.solutions(lesson)[exercise.name]), exercise


@pytest.mark.parametrize("checker, bad", [
    (exercises.check_row_parallel_backward, {"world_sizes": ()}),
    (exercises.check_row_parallel_backward, {"world_sizes": (5,)}),
    (exercises.check_row_parallel_backward, {"timeout": 0}),
    (exercises.check_1f1b_ops, {"cases": []}),
    (exercises.check_1f1b_ops, {"cases": [(8, 4)]}),
    (exercises.check_1f1b_ops, {"cases": [(2, 0)]}),
    (exercises.check_1f1b_ops, {"timeout": "soon"}),
    (exercises.check_min_micro_batches, {"cases": []}),
    (exercises.check_min_micro_batches, {"cases": [(0, 0.5)]}),
    (exercises.check_min_micro_batches, {"cases": [(2, 1.0)]}),
    (exercises.check_min_micro_batches, {"cases": [(2, True)]}),
    (exercises.check_min_micro_batches, {"cases": 3}),
    (exercises.check_topk_error_feedback, {"world_sizes": (0,)}),
    (exercises.check_topk_error_feedback, {"trials": 0}),
    (exercises.check_topk_error_feedback, {"timeout": -1}),
])
def test_checkers_refuse_what_they_cannot_check(checker, bad):
    answer = {exercises.check_row_parallel_backward: solutions.row_parallel_backward,
              exercises.check_1f1b_ops: solutions.one_f_one_b_ops,
              exercises.check_min_micro_batches: solutions.min_micro_batches,
              exercises.check_topk_error_feedback: compression_solutions.topk_feedback}[checker]
    with pytest.raises(ValueError, match="world_sizes|cases|timeout|trials"):
        checker(answer, **bad)
