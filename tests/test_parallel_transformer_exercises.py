"""Lesson 12's checkers pass the reference solutions, explain typical mistakes, and put the
learner's piece inside the real run (the hooks are restored after)."""

import numpy as np
import pytest

from minidist import exercises
from minidist.exercises import parallel_transformers as checkers
from minidist.exercises._schedules import interleaved_schedule
from minidist.exercises.solutions import parallel_transformers as solutions
from minidist.parallel import pipeline
from minidist.parallel.megatron import ParallelAttention


def _heads(rank, t, H):
    return slice(rank * H // t, (rank + 1) * H // t)


def split_by_d(W_qkv, b_qkv, W_o, b_o, rank, t):
    """W_qkv cut along d, its input rows, as if it were one column-parallel matrix's rows."""
    H, d = W_o.shape[0], W_qkv.shape[2]
    return {"W_qkv": W_qkv[:, :, rank * d // t:(rank + 1) * d // t],
            "b_qkv": b_qkv[:, _heads(rank, t, H)], "W_o": W_o[_heads(rank, t, H)], "b_o": b_o}


def w_o_by_columns(W_qkv, b_qkv, W_o, b_o, rank, t):
    """W_o split like a column-parallel layer, by its output columns."""
    H, d = W_o.shape[0], W_o.shape[2]
    heads = _heads(rank, t, H)
    return {"W_qkv": W_qkv[:, heads], "b_qkv": b_qkv[:, heads],
            "W_o": W_o[:, :, rank * d // t:(rank + 1) * d // t], "b_o": b_o}


def w_o_of_another_rank(W_qkv, b_qkv, W_o, b_o, rank, t):
    """The right shapes, but W_o's rows of the heads rank t−1−k runs."""
    H = W_o.shape[0]
    heads = _heads(rank, t, H)
    return {"W_qkv": W_qkv[:, heads], "b_qkv": b_qkv[:, heads],
            "W_o": W_o[_heads(t - 1 - rank, t, H)], "b_o": b_o}


def test_attention_take_checker_passes_the_solution_and_it_is_megatrons_take():
    check = exercises.check_attention_take(solutions.attention_take)
    assert check and "t = 2, 4" in check.message, check
    rng = np.random.default_rng(0)
    full = [rng.normal(size=s) for s in ((3, 4, 16, 4), (3, 4, 4), (4, 4, 16), (16,))]
    for t in (1, 2, 4):
        for rank in range(t):
            mine = solutions.attention_take(*full, rank, t)
            want = ParallelAttention.take(*full, rank, t)
            assert all(np.array_equal(mine[k], want[k]) for k in want)


@pytest.mark.parametrize("answer, words", [
    (split_by_d, "rank 0's W_qkv has shape (3, 4, 8, 4); it should be (3, 2, 16, 4): you split "
                 "d (its input rows); split W_qkv by heads (axis 1)"),
    (w_o_by_columns, "rank 0's W_o has shape (4, 4, 8); it should be (2, 4, 16): you split d "
                     "(its output columns); split W_o by heads (axis 0)"),
    (w_o_of_another_rank, "rank 0 got heads [0, 1] of W_qkv, [0, 1] of b_qkv and [2, 3] of W_o"
                          ": a head's Q, K, V and its rows of W_o must be on the same rank; the "
                          "run's loss differs from single at step 0 by"),
], ids=["by-d", "W_o-columns", "W_o-other-heads"])
def test_attention_take_checker_names_the_mistake(answer, words):
    check = exercises.check_attention_take(answer)
    assert not check and words in check.message, check


def test_attention_take_checker_reports_a_stub_and_puts_the_real_take_back():
    saved = ParallelAttention.__dict__["take"]

    def stub(*args):
        raise NotImplementedError("write the head split of attention")

    check = exercises.check_attention_take(stub)
    assert not check and "raised NotImplementedError: write the head split" in check.message
    with checkers.attention_take(stub):
        assert ParallelAttention.__dict__["take"] is not saved
    assert ParallelAttention.__dict__["take"] is saved


def test_the_attention_hook_is_what_the_run_uses():
    """Heads given to the wrong ranks consistently (rank k runs rank t−1−k's heads) still
    train as one process, and the checker says it differs from Megatron's assignment; heads
    given twice leave parameters that no rank holds."""
    def reversed_ranks(W_qkv, b_qkv, W_o, b_o, rank, t):
        return solutions.attention_take(W_qkv, b_qkv, W_o, b_o, t - 1 - rank, t)

    check = exercises.check_attention_take(reversed_ranks)
    assert check and "rank 0 got heads [2, 3] of W_qkv (Megatron gives it [0, 1])" in \
        check.message, check

    def first_heads(W_qkv, b_qkv, W_o, b_o, rank, t):
        return solutions.attention_take(W_qkv, b_qkv, W_o, b_o, 0, t)

    saved = ParallelAttention.__dict__["take"]
    wrong = exercises.check_attention_take(first_heads, world_sizes=(2,))
    assert not wrong and "head 0 is on ranks [0, 1]" in wrong.message
    assert "parameters are held by no rank" in wrong.message, wrong
    assert ParallelAttention.__dict__["take"] is saved  # put back after a failed run too


def megatron_warmup(p, m, v, s):
    return m * v if m == p else min(2 * (p - s - 1) + (v - 1) * p, m * v)


def megatron_order(warmup=megatron_warmup, backward_chunk=lambda k, p, v: v - 1 - k // p % v):
    """The solution's order with one piece swapped for a typical mistake."""
    def ops(stage, stages, micro_batches, chunks):
        p, m, v = stages, micro_batches, chunks
        micro = [k // (p * v) * p + k % p for k in range(m * v)]
        forward = [("F", micro[k], k // p % v) for k in range(m * v)]
        backward = [("B", micro[k], backward_chunk(k, p, v)) for k in range(m * v)]
        w = warmup(p, m, v, stage)
        out = forward[:w]
        for k in range(m * v - w):
            out += [forward[w + k], backward[k]]
        return out + backward[m * v - w:]
    return ops


def test_interleaved_checker_passes_the_solution_which_is_the_librarys_order():
    check = exercises.check_interleaved_ops(solutions.interleaved_ops)
    assert check and "(2, 4, 2), (2, 2, 2), (4, 8, 2), (3, 6, 3)" in check.message, check
    for p, m, v in ((2, 4, 2), (3, 6, 3), (4, 8, 2), (2, 2, 2), (3, 9, 4), (2, 6, 1)):
        for s in range(p):
            assert solutions.interleaved_ops(s, p, m, v) == \
                pipeline.schedule_ops("interleaved_1f1b", s, p, m, v)


@pytest.mark.parametrize("answer, words", [
    (megatron_order(warmup=lambda p, m, v, s: p - s - 1),
     "stage 0 of p = 2 (m = 4, v = 2): ('B', 0, 1) at position 2 comes before its forward "
     "('F', 0, 1) at position 3: with v chunks the warm-up needs 2(p−s−1) + (v−1)·p forwards"),
    (megatron_order(backward_chunk=lambda k, p, v: k // p % v),
     "p = 2, m = 4, v = 2: your order deadlocks: stage 0 waits at its op 5, ('B', 0, 0), for "
     "the backward of micro-batch 0 through global chunk 1 (stage 1's local chunk 0); stage 1 "
     "waits at its op 3, ('B', 0, 0), for the backward of micro-batch 0 through global chunk 2"),
    (megatron_order(warmup=lambda p, m, v, s: megatron_warmup(p, m, v, s) + (s == 0)),
     "stage 0 holds up to 6 (micro-batch, chunk) activations at once, Megatron's order 5"),
    (lambda s, p, m, v: [("F", j, c) for j in range(m) for c in range(v)]
     + [("B", j, c) for j in range(m) for c in reversed(range(v))],
     "on the ideal timeline your order idles 0.3846 of the step, the formula (p−1)/(v·m+p−1) "
     "0.1111"),
    (lambda *args: solutions.interleaved_ops(*args)[:-1], "('B', 3, 0) is missing"),
], ids=["1f1b-warm-up", "backward-chunks-in-forward-order", "warm-up-too-long", "gpipe-like",
        "missing-op"])
def test_interleaved_checker_names_the_mistake(answer, words):
    check = exercises.check_interleaved_ops(answer)
    assert not check and words in check.message, check


def test_interleaved_hook_drives_the_real_pipeline_and_is_restored():
    """The learner's function is what the real run's stages follow, every step, and
    pipeline.schedule_ops is the library's again afterwards."""
    seen = []

    def spy(stage, stages, micro_batches, chunks):
        seen.append(stage)
        return solutions.interleaved_ops(stage, stages, micro_batches, chunks)

    original = pipeline.schedule_ops
    check = exercises.check_interleaved_ops(spy, cases=[(2, 4, 2)])
    assert check, check
    assert pipeline.schedule_ops is original
    # per stage: the checker's own call, simulate's, and the real run's, once per step
    assert [seen.count(s) for s in (0, 1)] == [2 + checkers.MLP_RUN["steps"]] * 2
    with interleaved_schedule(lambda *args: [("F", 0, 0)]):
        assert pipeline.schedule_ops("interleaved_1f1b", 0, 2, 2, 2) == [("F", 0, 0)]
        assert pipeline.schedule_ops("1f1b", 0, 2, 2) == original("1f1b", 0, 2, 2)
    assert pipeline.schedule_ops is original


def test_a_stub_is_reported_not_raised():
    def stub(stage, stages, micro_batches, chunks):
        raise NotImplementedError("write the interleaved order")

    check = exercises.check_interleaved_ops(stub)
    assert not check and "raised NotImplementedError: write the interleaved order" in \
        check.message


@pytest.mark.parametrize("checker, words", [
    (exercises.check_attention_take, "return a dict with the keys W_qkv, b_qkv, W_o and b_o, "
                                     "got NoneType"),
    (exercises.check_interleaved_ops, "return a list of ops, got NoneType"),
])
def test_an_answer_that_returns_nothing_is_reported(checker, words):
    check = checker(lambda *args: None)
    assert not check and words in check.message, check


@pytest.mark.parametrize("checker, bad", [
    (exercises.check_attention_take, {"world_sizes": (3,)}),
    (exercises.check_attention_take, {"world_sizes": ()}),
    (exercises.check_interleaved_ops, {"cases": [(2, 3, 2)]}),
    (exercises.check_interleaved_ops, {"cases": [(4, 8, 3)]}),
    (exercises.check_interleaved_ops, {"cases": []}),
    (exercises.check_interleaved_ops, {"timeout": 0}),
    (exercises.check_attention_take, {"timeout": "soon"}),
])
def test_checkers_refuse_what_they_cannot_check(checker, bad):
    answer = (solutions.attention_take if checker is exercises.check_attention_take
              else solutions.interleaved_ops)
    with pytest.raises(ValueError, match="world_sizes|cases|timeout"):
        checker(answer, **bad)
