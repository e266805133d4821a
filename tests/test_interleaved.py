"""The interleaved 1F1B schedule (Narayanan et al. 2021, Megatron-LM's virtual pipeline): its
order of ops, its ideal bubble, and training that equals one process at 1e-10 (float64)."""

import functools

import numpy as np
import pytest

from minidist import data, memory, nn, train
from minidist.parallel.pipeline import bubble_formula, schedule_ops, simulate, stage_bounds
from minidist.trace import bubble_fraction

MLP = functools.partial(nn.mlp, [6, 8, 8, 8, 8, 3], seed=1)  # 9 layers
GPT = functools.partial(nn.gpt, 11, 8, d_model=16, n_heads=2, n_layers=4, seed=1)  # 7 layers
KWARGS = {"steps": 4, "batch_size": 24, "lr": 0.2, "optimizer_options": {"momentum": 0.5}}
INTERLEAVED = {"strategy": "pipeline", "schedule": "interleaved_1f1b"}


def warmup(p, m, v, s):
    """Megatron's warm-up forwards on rank s: all m·v when m = p, else 2(p−s−1) + (v−1)p."""
    return m * v if m == p else min(2 * (p - s - 1) + (v - 1) * p, m * v)


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 4, 2), (3, 6, 2), (4, 8, 3), (2, 6, 1),
                                     (3, 3, 3), (1, 3, 2)])
def test_every_chunk_and_micro_batch_runs_once_forward_before_backward(p, m, v):
    every = [(op, j, c) for op in "FB" for j in range(m) for c in range(v)]
    for s in range(p):
        ops = schedule_ops("interleaved_1f1b", s, p, m, v)
        assert sorted(ops) == sorted(every)
        assert all(ops.index(("F", j, c)) < ops.index(("B", j, c))
                   for j in range(m) for c in range(v))
        w = warmup(p, m, v, s)
        first_backward = w + (w < m * v)  # in the steady state, each F comes before its B
        assert {op for op, _, _ in ops[:first_backward]} == {"F"}
        assert ops[first_backward] == ("B", 0, v - 1)
        held = np.cumsum([1 if op == "F" else -1 for op, _, _ in ops])
        assert held.max() == min(w + 1, m * v)  # the warm-up, and one more in the steady state


def test_megatron_order_by_hand():
    # p=2, m=4, v=2: 8 virtual steps k per rank. Forward k runs chunk (k//2)%2, backward chunk
    # 1−(k//2)%2, both on micro-batch (k//4)·2 + k%2:
    #   k        0  1  2  3  4  5  6  7
    #   micro    0  1  0  1  2  3  2  3
    #   F chunk  0  0  1  1  0  0  1  1        B chunk  1  1  0  0  1  1  0  0
    # Rank 0 warms up with 2(2−0−1) + (2−1)·2 = 4 forwards, rank 1 with 0 + 2 = 2; then F, B
    # alternate (F from where the warm-up stopped, B from k = 0); the rest are backwards.
    F = [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1), ("F", 2, 0), ("F", 3, 0),
         ("F", 2, 1), ("F", 3, 1)]
    B = [("B", 0, 1), ("B", 1, 1), ("B", 0, 0), ("B", 1, 0), ("B", 2, 1), ("B", 3, 1),
         ("B", 2, 0), ("B", 3, 0)]
    assert schedule_ops("interleaved_1f1b", 0, 2, 4, 2) == [
        *F[:4], F[4], B[0], F[5], B[1], F[6], B[2], F[7], B[3], *B[4:]]
    assert schedule_ops("interleaved_1f1b", 1, 2, 4, 2) == [
        *F[:2], F[2], B[0], F[3], B[1], F[4], B[2], F[5], B[3], F[6], B[4], F[7], B[5], *B[6:]]
    # m = p: every rank runs all its forwards first (Megatron's all_warmup_microbatches)
    assert schedule_ops("interleaved_1f1b", 1, 2, 2, 2) == [*F[:4], *B[:4]]


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 4, 2), (2, 4, 3), (3, 6, 2), (4, 4, 2),
                                     (4, 8, 3), (3, 9, 4), (4, 8, 1)])
def test_ideal_timeline_has_the_formula_bubble(p, m, v):
    events = simulate("interleaved_1f1b", p, m, forward=1.0, backward=2.0, chunks=v)
    bubble = bubble_fraction(events)[0]
    assert bubble == pytest.approx(bubble_formula(p, m, v), rel=1e-12, abs=1e-12)
    assert max(e[2] for ev in events for e in ev) == pytest.approx(3 * (m + (p - 1) / v))
    one_f_one_b = bubble_fraction(simulate("1f1b", p, m, forward=1.0, backward=2.0))[0]
    assert bubble < one_f_one_b - 1e-9 if v > 1 else bubble == pytest.approx(one_f_one_b)
    # with a message cost it still finishes: v times as many messages, the price of v chunks
    slow = simulate("interleaved_1f1b", p, m, forward=1.0, backward=2.0, send=0.5, chunks=v)
    assert [len(ev) for ev in slow] == [2 * m * v] * p


def test_bubble_formula_values():
    assert bubble_formula(4, 8) == pytest.approx(3 / 11)
    assert bubble_formula(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_formula(1, 4, 3) == 0.0
    b = bubble_formula(4, 8, 4)  # Narayanan's bubble over busy time: (1/v)(p−1)/m
    assert b / (1 - b) == pytest.approx(3 / 32)


@pytest.fixture(scope="module")
def problem():
    X, y = data.make_classification(96, 6, 3, seed=0)
    return X, y, train(MLP, X, y, **KWARGS)


def assert_same_training(hist, single):
    np.testing.assert_allclose(hist.params, single.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, single.loss, rtol=1e-10)


@pytest.mark.parametrize("m, backend", [(2, "thread"), (4, "thread"), (4, "process")])
def test_mlp_reproduces_single(problem, m, backend):
    X, y, single = problem
    hist = train(MLP, X, y, workers=2, chunks=2, micro_batches=m, backend=backend,
                 **INTERLEAVED, **KWARGS)
    assert_same_training(hist, single)
    assert stage_bounds(MLP(), 4) == [(0, 2), (2, 4), (4, 6), (6, 9)]
    assert [d["layers"] for d in hist.details] == [[(0, 2), (4, 6)], [(2, 4), (6, 9)]]
    assert [d["peak_activations"] for d in hist.details] == [min(warmup(2, m, 2, s) + 1, 2 * m)
                                                             for s in range(2)]
    assert sum(d["param_bytes"] for d in hist.details) == 8 * MLP().num_params


def test_the_ledger_sees_every_stashed_chunk(problem):
    X, y, _ = problem
    p, m, v = 2, 4, 2
    hist = train(MLP, X, y, workers=p, chunks=v, micro_batches=m, backend="thread",
                 **INTERLEAVED, **KWARGS)
    n = KWARGS["batch_size"] // m
    per_chunk = [n * (6 + 8) * 8, n * (8 + 8) * 8, n * (8 + 8) * 8,  # Linear and ReLU inputs
                 n * (8 + 8) * 8 + memory.mlp_activation_bytes(n, [8, 3], fused=False)]
    for s, details in enumerate(hist.details):
        held, peak = 0, 0
        for op, _, c in schedule_ops("interleaved_1f1b", s, p, m, v):
            held += per_chunk[c * p + s] if op == "F" else -per_chunk[c * p + s]
            peak = max(peak, held)
        assert details["peak_activation_bytes"] == peak == hist.memory[s]["activations"]


@pytest.mark.parametrize("recompute", [False, True])
def test_gpt_reproduces_single(recompute):
    rng = np.random.default_rng(0)
    X, Y = rng.integers(0, 11, (32, 8)), rng.integers(0, 11, (32, 8))
    kwargs = {"steps": 3, "batch_size": 8, "lr": 0.1}
    model_fn = functools.partial(GPT, recompute=recompute)
    hist = train(model_fn, X, Y, workers=2, chunks=2, micro_batches=2, backend="thread",
                 **INTERLEAVED, **kwargs)
    assert_same_training(hist, train(GPT, X, Y, **kwargs))
    # embedding + block 0 and block 2 on rank 0; block 1 and block 3 + ln_f + head on rank 1
    assert [d["layers"] for d in hist.details] == [[(0, 2), (3, 4)], [(2, 3), (4, 7)]]


def test_hybrid_data_parallel_over_interleaved_pipelines(problem):
    X, y, single = problem
    hist = train(MLP, X, y, strategy="hybrid", workers=4, dp=2, pp=2, chunks=2,
                 micro_batches=2, schedule="interleaved_1f1b", backend="thread", **KWARGS)
    assert_same_training(hist, single)
    assert [(d["dp"], d["pp"], d["layers"]) for d in hist.details] == [
        (d, s, [[(0, 2), (4, 6)], [(2, 4), (6, 9)]][s]) for d in range(2) for s in range(2)]


def test_tensor_parallel_chunks_in_a_dp_tp_pp_grid(problem):
    X, y, _ = problem
    model_fn = functools.partial(nn.mlp, [6, 8, 8, 8, 8, 8, 8, 8, 3], seed=1)  # 15 layers
    kwargs = {"steps": 3, "batch_size": 24, "lr": 0.2}
    hist = train(model_fn, X, y, strategy="hybrid", workers=8, dp=2, tp=2, pp=2, chunks=2,
                 micro_batches=2, schedule="interleaved_1f1b", cuts=[4, 8, 12],
                 backend="thread", **kwargs)
    assert_same_training(hist, train(model_fn, X, y, **kwargs))
    # each chunk (Linear, ReLU, Linear, ReLU) is a Megatron block split over tp = 2
    assert hist.details[0]["shard"].count("ColumnParallelLinear(") == 2
    # rank 0 holds chunks 0 and 2: half of Linear(6→8) and of Linear(8→8) by columns (W and
    # b), half of two Linear(8→8) by rows (W; b whole)
    assert hist.details[0]["param_bytes"] == 8 * ((6 * 4 + 4) + (8 * 4 + 4) + 2 * (4 * 8 + 8))


@pytest.mark.parametrize("options, error, match", [
    ({"micro_batches": 3, "chunks": 2}, ValueError,
     "needs micro_batches divisible by the 2 pipeline stages, got micro_batches=3"),
    ({"chunks": 0}, ValueError, "chunks must be an integer >= 1, got 0"),
    ({"chunks": 1.5}, TypeError, "chunks must be an integer"),
    ({"chunks": 2, "schedule": "1f1b"}, ValueError,
     "chunks=2 needs schedule='interleaved_1f1b': schedule='1f1b'"),
    ({"chunks": 5}, ValueError,
     "2 pipeline stages × chunks=5 = 10 chunks, more than the model's 9 layers"),
    ({"chunks": 2, "cuts": [2, 4]}, ValueError, r"cuts must be 3 increasing layer indices"),
])
def test_bad_interleaved_jobs_are_named(problem, options, error, match):
    X, y, _ = problem
    with pytest.raises(error, match=match):
        train(MLP, X, y, **{**INTERLEAVED, "workers": 2, "micro_batches": 2, **options},
              backend="thread", steps=1)


def test_bad_schedule_calls_are_named():
    with pytest.raises(ValueError, match="needs micro_batches divisible by the 2 pipeline"):
        schedule_ops("interleaved_1f1b", 0, 2, 3, 2)
    with pytest.raises(ValueError, match="chunks=2 needs schedule='interleaved_1f1b'"):
        simulate("gpipe", 2, 2, chunks=2)
    X, y = data.make_classification(24, 6, 3, seed=0)
    with pytest.raises(ValueError, match="chunks=2 needs at least 2 pipeline stages, got 1"):
        train(MLP, X, y, strategy="hybrid", workers=2, dp=2, chunks=2,
              schedule="interleaved_1f1b", backend="thread", steps=1, batch_size=24)
