
import numpy as np
import pytest

from minidist import cost, nn, run, train
from minidist.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    block_bytes,
    check_split,
    plan,
)

STEPS = 20


def _split_block(comm, W1, b1, W2, b2, X, dZ):
    """column → ReLU → row on this rank; returns the output, ∂X and this rank's gradients."""
    rank, t = comm.rank, comm.world_size
    col = ColumnParallelLinear(*W1.shape, comm)
    row = RowParallelLinear(*W2.shape, comm)
    for layer, full in ((col, (W1, b1)), (row, (W2, b2))):
        params = layer.take(*full, rank, t)
        layer.bind({k: v.copy() for k, v in params.items()},
                   {k: np.zeros_like(v) for k, v in params.items()})
    relu = nn.ReLU()
    Z = row.forward(relu.forward(col.forward(X)))
    dX = col.backward(relu.backward(row.backward(dZ)))
    return Z, dX, col.grads, row.grads


@pytest.mark.parametrize("t", [1, 2, 3])
def test_column_and_row_parallel_linear_match_the_whole_block(t):
    rng = np.random.default_rng(0)
    W1, b1 = rng.normal(size=(5, 6)), rng.normal(size=6)
    W2, b2 = rng.normal(size=(6, 4)), rng.normal(size=4)
    X, dZ = rng.normal(size=(7, 5)), rng.normal(size=(7, 4))
    H = np.maximum(X @ W1 + b1, 0)  # the reference: plain numpy
    dH = (dZ @ W2.T) * (H > 0)
    results = run(_split_block, t, args=(W1, b1, W2, b2, X, dZ), backend="thread")
    for k, (Z, dX, col_grads, row_grads) in enumerate(results):
        cols = slice(k * 6 // t, (k + 1) * 6 // t)
        np.testing.assert_allclose(Z, H @ W2 + b2, rtol=1e-12)  # g: the all-reduce forward
        np.testing.assert_allclose(dX, dH @ W1.T, rtol=1e-12)  # f: the all-reduce backward
        np.testing.assert_allclose(col_grads["W"], (X.T @ dH)[:, cols], rtol=1e-12)
        np.testing.assert_allclose(col_grads["b"], dH.sum(0)[cols], rtol=1e-12)
        np.testing.assert_allclose(row_grads["W"], (H.T @ dZ)[cols], rtol=1e-12)
        np.testing.assert_allclose(row_grads["b"], dZ.sum(0), rtol=1e-12)


def test_the_plan_pairs_linear_activation_linear():
    model = nn.mlp([8, 16, 12, 16, 4])  # L R L R L R L
    assert plan(model.layers) == [(0, "column"), (1, "whole"), (2, "row"), (3, "whole"),
                                  (4, "column"), (5, "whole"), (6, "row")]
    assert plan(nn.mlp([8, 16, 4]).layers, 1) == [(1, "whole"), (2, "whole")]
    with pytest.raises(ValueError, match=r"layer 0 Linear\(8→6\) has 6 outputs, not divisible "
                                         r"by tp=4"):
        check_split(nn.mlp([8, 6, 4]).layers, 4)


@pytest.fixture(scope="module")
def problem(small_mlp_problem):
    return small_mlp_problem(32, STEPS)


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_tensor_parallel_reproduces_single(problem, t, backend):
    model_fn, X, y, kwargs, reference = problem
    hist = train(model_fn, X, y, strategy="tensor_parallel", workers=t, backend=backend, **kwargs)
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
    assert hist.step_time.shape == (STEPS,)


def test_each_rank_stores_its_share_and_sends_what_the_formula_says(problem):
    model_fn, X, y, kwargs, _ = problem
    t = 2
    hist = train(model_fn, X, y, strategy="tensor_parallel", workers=t, backend="thread",
                 algorithm="ring", **kwargs)
    # by hand: block 1 = W 8×16 (split), b 16 (split), W 16×12 (split), b 12 (whole) ...
    by_hand = ((8 * 16 + 16 + 16 * 12) / t + 12) + ((12 * 16 + 16 + 16 * 4) / t + 4)
    assert [d["param_bytes"] for d in hist.details] == [8 * by_hand] * t
    whole = model_fn().num_params * 8
    split = whole - 8 * (12 + 4)  # everything but the two row biases is split
    assert hist.details[0]["param_bytes"] == split / t + 8 * (12 + 4)
    first = block_bytes(32, 8, 16, 12, t)
    second = block_bytes(32, 12, 16, 4, t, first=False)
    assert first["param_bytes"] + second["param_bytes"] == 8 * by_hand
    ring = cost.bytes_per_rank("all_reduce", "ring", 32 * 12, 8, t)[0][0]
    assert ring == 2 * (t - 1) / t * 32 * 12 * 8  # the ring's 2(t−1)/t·n
    per_step = first["bytes_sent_per_step"] + second["bytes_sent_per_step"]
    assert per_step == ring + 2 * (t - 1) / t * 32 * (4 + 12) * 8
    assert hist.bytes_sent == [STEPS * per_step] * t


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 3}, r"layer 0 Linear\(8→16\) has 16 outputs, not divisible by tp=3"),
    ({"workers": 2, "algorithm": "gossip"}, "all-reduce algorithm 'gossip'"),
    ({"workers": 2, "micro_batches": 2}, r"does not take \['micro_batches'\]"),
])
def test_bad_tensor_parallel_jobs_are_named(problem, kwargs, match):
    model_fn, X, y, _, _ = problem
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, y, strategy="tensor_parallel", backend="thread", steps=1, **kwargs)
