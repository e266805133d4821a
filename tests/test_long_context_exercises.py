"""Lesson 13's checkers pass the reference solutions, explain typical mistakes, and put the
learner's piece inside the real run (the hooks are restored after)."""

import numpy as np
import pytest

from minidist import exercises
from minidist.exercises import long_context as checkers
from minidist.exercises.solutions import long_context as solutions
from minidist.parallel import expert_parallel, ring_attention

# ----- exercise 1: the online-softmax combine -----------------------------------------------


def test_combine_checker_passes_the_solution_which_is_the_librarys_rule():
    check = exercises.check_softmax_combine(solutions.softmax_combine)
    assert check and "(c = 2, c = 4 balanced)" in check.message, check
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(2, 3, 4))
    m1[0, 1] = m2[0, 1] = m1[2, 0] = -np.inf  # rows that saw nothing on one side or both
    l1, l2 = np.where(np.isneginf(m1), 0, 1.5), np.where(np.isneginf(m2), 0, 2.5)
    o1, o2 = rng.normal(size=(2, 3, 4, 2))
    mine = solutions.softmax_combine(m1, l1, o1, m2, l2, o2)
    want = ring_attention.combine(m1, l1, o1, m2, l2, o2)
    for a, b in zip(mine, want, strict=True):
        np.testing.assert_array_equal(a, b)


def no_rescale(m1, l1, o1, m2, l2, o2):
    """The new max, but the sums added as they are."""
    return np.maximum(m1, m2), l1 + l2, o1 + o2


def naive_exponent(m1, l1, o1, m2, l2, o2):
    """Right where a max is finite; e^{−∞ − (−∞)} = NaN where both sides saw nothing."""
    m = np.maximum(m1, m2)
    a1, a2 = np.exp(m1 - m), np.exp(m2 - m)
    return m, a1 * l1 + a2 * l2, a1[..., None] * o1 + a2[..., None] * o2


def o_without_axis(m1, l1, o1, m2, l2, o2):
    """The factors of shape (..., n) multiplied into o (..., n, d_h) without a new axis."""
    m = np.maximum(m1, m2)
    finite = np.where(np.isneginf(m), 0.0, m)
    a1, a2 = np.exp(m1 - finite), np.exp(m2 - finite)
    return m, a1 * l1 + a2 * l2, a1 * o1 + a2 * o2


def o_not_rescaled(m1, l1, o1, m2, l2, o2):
    """m and l right, o summed as it is."""
    m, l_, _ = solutions.softmax_combine(m1, l1, o1, m2, l2, o2)
    return m, l_, o1 + o2


@pytest.mark.parametrize("answer, words", [
    (no_rescale, "two blocks of finite scores, row 0 (m1 = 5.974, m2 = 7.841): your l is "
                 "2.59196, it should be 1.58227; you added l1 + l2 without rescaling"),
    (naive_exponent, "a row that saw no key in either block (m1 = m2 = −∞, as under a padding "
                     "mask), row 2 (m1 = -inf, m2 = -inf): your l is NaN: the new max is −∞ "
                     "too, and e^{m1 − m} = e^{−∞ + ∞}"),
    (o_without_axis, "raised ValueError: operands could not be broadcast together with shapes "
                     "(5,) (5,3)  (scale o, shape (..., n, d_h), by e^{m − ·} of shape (..., n)"
                     ": add an axis"),
    (o_not_rescaled, "two blocks of finite scores, row 0, column 0 (m1 = 5.974, m2 = 7.841): "
                     "your o is -1.16941, it should be 0.0991305 = e^{m1 − m}·o1 + e^{m2 − m}·o2"),
    (lambda *args: None, "return the three arrays (m, l, o), got NoneType"),
], ids=["no-rescale", "nan-when-both-empty", "o-without-axis", "o-not-rescaled", "nothing"])
def test_combine_checker_names_the_mistake(answer, words):
    check = exercises.check_softmax_combine(answer)
    assert not check and words in check.message, check


def test_the_combine_hook_is_what_ring_attention_uses_and_is_restored():
    """Right on every probe, wrong only where the real ring reaches it: the run catches it."""
    calls, original = [], ring_attention.combine

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    assert exercises.check_softmax_combine(spy, cases=[(2, False)])
    assert ring_attention.combine is original
    # the 5 probes, then per step and block the ring's computed pairs: rank 0 its diagonal
    # pair, rank 1 its diagonal and rank 0's keys; m (N, H, T/c)
    assert calls[:5] == [(5,)] * 4 + [(2, 4, 5)]
    assert calls[5:] == [(8, 4, 4)] * (3 * 2 * (1 + 2))

    def wrong_in_the_run(*args):
        m, l_, o = original(*args)
        return m, l_, o * (1 + 1e-6 * (args[0].ndim == 3 and args[0].shape[0] == 8))

    check = exercises.check_softmax_combine(wrong_in_the_run)
    assert not check and "ring attention with your combine on c = 2 ranks (load_balance=False)"\
        in check.message and "differs from single at step 0" in check.message, check
    assert ring_attention.combine is original


def test_a_stub_is_reported_not_raised():
    def stub(*args):
        raise NotImplementedError("write the combine")

    check = exercises.check_softmax_combine(stub)
    assert not check and "raised NotImplementedError: write the combine" in check.message


@pytest.mark.parametrize("bad", [{"cases": []}, {"cases": [(3, False)]}, {"cases": [(2, 1)]},
                                 {"timeout": 0}])
def test_the_combine_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="cases|timeout"):
        exercises.check_softmax_combine(solutions.softmax_combine, **bad)


# ----- exercise 2: the dispatch of tokens to their experts' ranks ----------------------------


def test_dispatch_checker_passes_the_solution_which_is_the_librarys_dispatch():
    check = exercises.check_expert_dispatch(solutions.expert_dispatch)
    assert check and "on e = 2, 4 ranks" in check.message and "(" not in check.message, check
    rng = np.random.default_rng(3)
    for M, E, e in ((40, 8, 4), (7, 6, 3), (0, 4, 2)):
        rows, expert = rng.normal(size=(M, 5)), rng.integers(0, E, M)
        mine, want = solutions.expert_dispatch(rows, expert, E // e, e), \
            expert_parallel.dispatch_chunks(rows, expert, E // e, e)
        np.testing.assert_array_equal(mine[1], want[1])
        assert len(mine[0]) == len(want[0]) == e
        for a, b in zip(mine[0], want[0], strict=True):
            np.testing.assert_array_equal(a, b)


def one_chunk_per_expert(x_rows, expert_of_row, experts_per_rank, world_size):
    order = np.argsort(expert_of_row, kind="stable")
    E = experts_per_rank * world_size
    return [x_rows[order][expert_of_row[order] == e] for e in range(E)], order


def round_robin_ranks(x_rows, expert_of_row, experts_per_rank, world_size):
    """Experts dealt to the ranks like cards: expert e on rank e mod world_size."""
    rank = np.asarray(expert_of_row) % world_size
    order = np.lexsort((expert_of_row, rank))
    return [x_rows[order][rank[order] == j] for j in range(world_size)], order


def rows_in_token_order(x_rows, expert_of_row, experts_per_rank, world_size):
    """The right ranks, but each chunk's rows in token order, not expert by expert."""
    rank = np.asarray(expert_of_row) // experts_per_rank
    order = np.argsort(rank, kind="stable")
    return [x_rows[order][rank[order] == j] for j in range(world_size)], order


def inverse_order(x_rows, expert_of_row, experts_per_rank, world_size):
    chunks, order = solutions.expert_dispatch(x_rows, expert_of_row, experts_per_rank,
                                              world_size)
    return chunks, np.argsort(order)  # where each row went, not which row is where


@pytest.mark.parametrize("answer, words", [
    (one_chunk_per_expert, "with 40 rows, E = 4 experts on e = 2 ranks (2 each): return one "
                           "chunk per rank, 2, got 4 (one per expert)"),
    (round_robin_ranks, "row 0 (expert 2) is in the chunk for rank 0, but expert 2 lives on "
                        "rank 1: rank j holds experts [j·2, (j+1)·2), so its rank is expert // "
                        "experts_per_rank"),
    (rows_in_token_order, "chunk 0 sends expert 1's row 2 before expert 0's row 3: rank 0 reads"
                          " what it receives expert by expert, so sort each chunk by expert"),
    (inverse_order, "order[0] = 26, but row 3 of x_rows is what your chunks send at position 0"),
    (lambda *args: None, "return (chunks, order), got NoneType"),
], ids=["per-expert", "round-robin", "token-order", "inverse-order", "nothing"])
def test_dispatch_checker_names_the_mistake(answer, words):
    check = exercises.check_expert_dispatch(answer)
    assert not check and words in check.message, check


def test_the_dispatch_hook_is_what_expert_parallelism_uses_and_is_restored():
    calls, original = [], expert_parallel.dispatch_chunks

    def spy(x_rows, *args):
        calls.append(x_rows.shape[1])
        return original(x_rows, *args)

    assert exercises.check_expert_dispatch(spy, world_sizes=(2,))
    assert expert_parallel.dispatch_chunks is original
    # the 3 probes (rows of 3), then per step, block and rank the forward's and the backward's
    assert calls == [3] * 3 + [16] * (checkers.EP_RUN["steps"] * 2 * 2 * 2)

    def wrong_in_the_run(x_rows, *args):  # right on the probes' rows of 3, not on d = 16
        chunks, order = original(x_rows, *args)
        return (chunks[::-1] if x_rows.shape[1] == 16 else chunks), order

    check = exercises.check_expert_dispatch(wrong_in_the_run)
    assert not check and "expert parallelism with your dispatch on e = 2 ranks: a rank raised"\
        in check.message, check
    assert expert_parallel.dispatch_chunks is original


def test_an_unordered_expert_is_accepted_and_noted():
    def reversed_within(x_rows, expert_of_row, experts_per_rank, world_size):
        flipped = np.arange(len(expert_of_row))[::-1]
        order = flipped[np.argsort(np.asarray(expert_of_row)[flipped], kind="stable")]
        rank = np.asarray(expert_of_row)[order] // experts_per_rank
        return [x_rows[order][rank == j] for j in range(world_size)], order

    check = exercises.check_expert_dispatch(reversed_within)
    assert check and "not in their x_rows order: that works too" in check.message, check


@pytest.mark.parametrize("bad", [{"world_sizes": ()}, {"world_sizes": (3,)},
                                 {"timeout": -1}])
def test_the_dispatch_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="world_sizes|timeout"):
        exercises.check_expert_dispatch(solutions.expert_dispatch, **bad)
