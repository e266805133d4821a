"""Every synchronous strategy trains the GPT exactly as one process does (float64, 1e-10):
the blocks are layers, so pipelines cut between them; tensor parallelism splits their heads
(tests/test_megatron.py has its formulas)."""

import functools

import numpy as np
import pytest

from minidist import nn, train
from minidist.parallel.pipeline import stage_bounds

GPT = functools.partial(nn.gpt, 11, 8, d_model=16, n_heads=2, n_layers=2, seed=1)
GPT_RECOMPUTE = functools.partial(GPT, recompute=True)
KWARGS = {"steps": 3, "batch_size": 8, "lr": 0.1}


@pytest.fixture(scope="module")
def reference():
    """Random tokens (32 sequences of 8), their targets, and strategy="single"'s History."""
    rng = np.random.default_rng(0)
    X, Y = rng.integers(0, 11, (32, 8)), rng.integers(0, 11, (32, 8))
    return X, Y, train(GPT, X, Y, **KWARGS)


def assert_same_training(hist, single):
    np.testing.assert_allclose(hist.params, single.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, single.loss, rtol=1e-10)


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("strategy, options", [
    ("distributed_gd", {"workers": 2}),
    ("data_parallel", {"workers": 2}),
    ("data_parallel", {"workers": 4, "bucket_bytes": 4096}),
    ("tensor_parallel", {"workers": 1}),
    ("hybrid", {"workers": 4, "dp": 2, "pp": 2, "micro_batches": 2}),
])
def test_data_parallel_strategies_reproduce_single(reference, strategy, options):
    X, Y, single = reference
    assert_same_training(train(GPT, X, Y, strategy=strategy, backend="thread", **options,
                               **KWARGS), single)


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("strategy, options", [
    ("parameter_server", {"workers": 2, "consistency": "bsp"}),
    ("pipeline", {"workers": 2, "micro_batches": 2, "schedule": "1f1b"}),
])
def test_process_ranks_reproduce_single(reference, strategy, options):
    X, Y, single = reference
    assert_same_training(train(GPT, X, Y, strategy=strategy, backend="process", **options,
                               **KWARGS), single)


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("model_fn", [GPT, GPT_RECOMPUTE], ids=["plain", "recompute"])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("workers", [2, 3])
def test_pipelines_reproduce_single(reference, workers, schedule, model_fn):
    X, Y, single = reference
    hist = train(model_fn, X, Y, strategy="pipeline", workers=workers, micro_batches=2,
                 schedule=schedule, backend="thread", **KWARGS)
    assert_same_training(hist, single)
    stages = [(0, 2), (2, 5)] if workers == 2 else [(0, 1), (1, 2), (2, 5)]
    assert [d["layers"] for d in hist.details] == stages


def test_balanced_cuts_keep_whole_blocks_and_put_the_ends_on_the_end_stages():
    model = GPT()  # parameters per layer: embedding 304, blocks 3280 each, ln_f 32, head 187
    counts = [sum(int(np.prod(s)) for s in layer.param_shapes().values())
              for layer in model.layers]
    assert counts == [304, 3280, 3280, 32, 187]
    assert stage_bounds(model, 2) == [(0, 2), (2, 5)]
    assert stage_bounds(model, 3) == [(0, 1), (1, 2), (2, 5)]
    assert stage_bounds(nn.gpt(11, 8, d_model=16, n_heads=2, n_layers=6), 3) == [
        (0, 3), (3, 5), (5, 9)]


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("strategy, options", [
    ("tensor_parallel", {"workers": 2}),
    ("tensor_parallel", {"workers": 2, "sequence_parallel": True}),
    ("hybrid", {"workers": 4, "dp": 2, "tp": 2}),
    ("hybrid", {"workers": 4, "tp": 2, "pp": 2, "micro_batches": 2, "sequence_parallel": True}),
])
def test_tensor_parallelism_splits_the_blocks_heads_and_reproduces_single(reference, strategy,
                                                                          options):
    X, Y, single = reference
    hist = train(GPT, X, Y, strategy=strategy, backend="thread", **options, **KWARGS)
    assert_same_training(hist, single)
    assert "ParallelBlock(d_model=16, heads 1 of 2, d_ff 32 of 64)" in hist.details[0]["shard"]
