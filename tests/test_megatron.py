"""Megatron tensor parallelism for the GPT (heads, MLP, vocabulary; sequence parallelism): the
same SGD as one process (float64, 1e-10), and every rank's bytes, parameters and activations
equal to their formulas (minidist.megatron_cost, minidist.megatron_memory), exactly.

The model: vocab 11 (an uneven split over 2 and over 4 ranks: 6 + 5, 3 + 3 + 3 + 2), context
8, d_model 16, 4 heads, 2 blocks, d_ff 32."""

import functools
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from minidist import cost, launch, memory, nn, run, train
from minidist.data import shard_bounds
from minidist.parallel.hybrid import Topology
from minidist.parallel.tensor_parallel import plan
from minidist.parallel.vocab_parallel import VocabParallelCrossEntropy

V, T, STEPS, BATCH = 11, 8, 3, 8
KWARGS = {"steps": STEPS, "batch_size": BATCH, "lr": 0.1}
HAS_MPI = importlib.util.find_spec("mpi4py") is not None and bool(
    (Path(sys.executable).parent / "mpiexec").exists() or shutil.which("mpiexec"))


def gpt(recompute=False, n_heads=4, d_ff=32):
    return nn.gpt(V, T, d_model=16, n_heads=n_heads, n_layers=2, d_ff=d_ff, seed=1,
                  recompute=recompute)


TOKENS = np.random.default_rng(0).integers(0, V, (32, T + 1))
X, Y = TOKENS[:, :-1], TOKENS[:, 1:]


@functools.cache
def single(recompute=False):
    """strategy="single"'s History: the reference."""
    return train(functools.partial(gpt, recompute), X, Y, **KWARGS)


@functools.cache
def tp_run(t, sequence_parallel, recompute=False, backend="thread"):
    """strategy="tensor_parallel" over t ranks, ring collectives (as the byte formula)."""
    return train(functools.partial(gpt, recompute), X, Y, strategy="tensor_parallel",
                 workers=t, backend=backend, sequence_parallel=sequence_parallel,
                 algorithm="ring", **KWARGS)


def assert_same_training(hist, reference):
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)


def test_plan_names_a_gpts_layers_and_an_mlps_last_linear_stays_whole():
    assert plan(gpt().layers) == [(0, "embedding"), (1, "block"), (2, "block"), (3, "whole"),
                                  (4, "head")]
    assert plan(gpt().layers, 2, 5) == [(2, "block"), (3, "whole"), (4, "head")]
    assert plan(nn.mlp([8, 4]).layers) == [(0, "whole")]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("t", [2, 4])
def test_tensor_parallel_gpt_reproduces_single(t, sequence_parallel):
    hist = tp_run(t, sequence_parallel)
    assert_same_training(hist, single())
    assert "ParallelBlock(d_model=16, heads " + f"{4 // t} of 4, d_ff {32 // t} of 32)" in \
        hist.details[0]["shard"]
    names = {event[0] for event in hist.events[0]}  # the timeline names the collectives
    assert ({"all_gather", "reduce_scatter"} <= names) == sequence_parallel
    assert "all_reduce" in names


def test_recompute_with_sequence_parallel_reproduces_single_and_reruns_the_forward_traffic():
    hist, plain = tp_run(2, True, recompute=True), tp_run(2, True)
    assert_same_training(hist, single(recompute=True))
    model = gpt(recompute=True)
    for r in range(2):
        parts = cost.megatron_bytes_per_rank(model, BATCH, T, 2, True, r)
        rerun = cost.bytes_per_rank("reduce_scatter", "ring", (T, BATCH, 16), 8, 2)[r][0] + \
            cost.bytes_per_rank("all_gather", "ring", (T // 2, BATCH, 16), 8, 2)[r][0]
        assert parts["recompute"] == 2 * 2 * rerun  # 2 blocks, each g and f again
        assert hist.bytes_sent[r] == STEPS * parts["total"]
        assert hist.bytes_sent[r] - plain.bytes_sent[r] == STEPS * parts["recompute"]
        assert hist.memory[r]["activations"] == memory.megatron_activation_bytes(
            BATCH, T, model, 2, True, r)
        assert hist.memory[r]["activations"] < plain.memory[r]["activations"]


@pytest.mark.usefixtures("leaves_nothing_behind")
def test_process_ranks_reproduce_single():
    assert_same_training(tp_run(2, True, backend="process"), single())


@pytest.mark.skipif(not HAS_MPI, reason="needs mpi4py and mpiexec: pip install 'minidist[mpi]'")
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.timeout(120)
def test_mpi_ranks_reproduce_single():
    assert_same_training(tp_run(2, True, backend="mpi"), single())


def test_sequence_parallel_with_one_rank_is_plain_training():
    hist = train(gpt, X, Y, strategy="tensor_parallel", workers=1, backend="thread",
                 sequence_parallel=True, **KWARGS)
    assert_same_training(hist, single())
    assert hist.bytes_sent == [0]


def test_hybrid_2x2x2_with_sequence_parallel_reproduces_single_and_its_formulas():
    topology, model, m = Topology(2, 2, 2), gpt(), 2
    hist = train(gpt, X, Y, strategy="hybrid", workers=8, dp=2, tp=2, pp=2, micro_batches=m,
                 sequence_parallel=True, backend="thread", algorithm="ring", **KWARGS)
    assert_same_training(hist, single())
    for r, details in enumerate(hist.details):
        here, layers = topology.coords(r), details["layers"]
        sent = cost.megatron_bytes_per_rank(model, BATCH, T, 2, True, here["tp"], layers, m,
                                            2, here["dp"], by="collective")
        assert {op: hist.stats[r].get(op, {}).get("bytes_sent", 0) for op in sent
                if op != "total"} == {op: STEPS * v for op, v in sent.items() if op != "total"}
        assert hist.bytes_sent[r] == STEPS * sent["total"]
        # stages send their local chunk of the sequence: (micro-batch, T/tp, d)
        assert sent["send"] == m * (BATCH // 2 // m) * (T // 2) * 16 * 8
        assert hist.memory[r]["params"] == 8 * sum(memory.megatron_param_elements(
            model, 2, here["tp"], layers).values())
        assert hist.memory[r]["activations"] == details["peak_activations"] * \
            memory.megatron_activation_bytes(BATCH // 2 // m, T, model, 2, True, here["tp"],
                                             layers)
    assert [d["layers"] for d in hist.details] == [(0, 2), (0, 2), (2, 5), (2, 5)] * 2


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("t", [2, 4])
def test_every_rank_sends_what_the_formula_says(t, sequence_parallel):
    hist, model = tp_run(t, sequence_parallel), gpt()
    for r in range(t):
        sent = cost.megatron_bytes_per_rank(model, BATCH, T, t, sequence_parallel, r,
                                            by="collective")
        assert hist.bytes_sent[r] == STEPS * sent["total"] > 0
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            assert hist.stats[r].get(op, {}).get("bytes_sent", 0) == STEPS * sent[op]


@pytest.mark.parametrize("t", [2, 4])
def test_sequence_parallel_sends_plain_tensor_parallels_bytes_plus_the_regathers(t):
    model, a = gpt(), BATCH * T * 16
    plain_run, sp_run = tp_run(t, False), tp_run(t, True)
    for r in range(t):
        ring = cost.bytes_per_rank("all_reduce", "ring", a, 8, t)[r][0]
        split = (cost.bytes_per_rank("reduce_scatter", "ring", (T, BATCH, 16), 8, t)[r][0]
                 + cost.bytes_per_rank("all_gather", "ring", (T // t, BATCH, 16), 8, t)[r][0])
        assert split == ring == 2 * (t - 1) * a * 8 // t  # an all-reduce is RS + AG
        plain = cost.megatron_bytes_per_rank(model, BATCH, T, t, False, r)
        sp = cost.megatron_bytes_per_rank(model, BATCH, T, t, True, r)
        assert plain["blocks"] == sp["blocks"] == 2 * 4 * ring  # per block: 2 forward, 2 back
        for part in ("embedding", "head", "cross_entropy"):
            assert plain[part] == sp[part] == (ring if part != "cross_entropy" else
                                               plain[part])
        assert sp["regather"] == (2 * 2 + 1) * (t - 1) * a * 8 // t  # QKV, fc ×2, the head
        assert sp["total"] - plain["total"] == sp["regather"] + sp["layernorm_grads"]
        measured = [run.stats[r] for run in (plain_run, sp_run)]
        assert (measured[1]["reduce_scatter"]["bytes_sent"]
                + measured[1]["all_gather"]["bytes_sent"] - STEPS * sp["regather"]
                == measured[0]["all_reduce"]["bytes_sent"] - STEPS * plain["cross_entropy"])


@pytest.mark.parametrize("t", [2, 4])
def test_activation_and_parameter_bytes_equal_the_formulas(t):
    model = gpt()
    plain, sp = tp_run(t, False), tp_run(t, True)
    for r in range(t):
        for hist, flag in ((plain, False), (sp, True)):
            assert hist.memory[r]["activations"] == memory.megatron_activation_bytes(
                BATCH, T, model, t, flag, r)
            assert hist.memory[r]["params"] == 8 * sum(
                memory.megatron_param_elements(model, t, r).values())
            assert hist.details[r]["param_bytes"] == hist.memory[r]["params"]
        assert sp.memory[r]["activations"] < plain.memory[r]["activations"]
    lo, hi = shard_bounds(V, t - 1, t)
    assert memory.megatron_param_elements(model, t, t - 1)["embedding"] == (hi - lo) * 16 + \
        T * 16  # the last rank's wte rows and the whole wpe
    # one rank: the single process's counts
    assert sum(memory.megatron_param_elements(model).values()) == model.num_params
    assert memory.megatron_activation_elements(BATCH, T, model) == \
        memory.gpt_activation_elements(BATCH, T, model)
    assert single().memory[0]["activations"] == memory.megatron_activation_bytes(BATCH, T,
                                                                                 model)


def _vocab_parallel_cross_entropy(comm, logits, labels):
    lo, hi = shard_bounds(logits.shape[-1], comm.rank, comm.world_size)
    loss = VocabParallelCrossEntropy(logits.shape[-1], comm, algorithm="ring")
    value = loss.forward(np.ascontiguousarray(logits[..., lo:hi]), labels)
    return value, loss.backward(), comm.stats.as_dict()


@pytest.mark.parametrize("t", [2, 3, 4])
def test_vocab_parallel_cross_entropy_is_softmax_cross_entropy_without_gathering(t):
    N, S = 3, 4
    rng = np.random.default_rng(t)
    logits, labels = 3 * rng.normal(size=(N, S, V)), rng.integers(0, V, (N, S))
    shifted = logits - logits.max(axis=-1, keepdims=True)  # the reference, in numpy
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    onehot = np.eye(V)[labels]
    loss = -np.mean(np.log((probs * onehot).sum(axis=-1)))
    whole = nn.SoftmaxCrossEntropy()
    assert whole.forward(logits, labels) == pytest.approx(loss, rel=1e-12)
    for r, (value, grad, stats) in enumerate(run(_vocab_parallel_cross_entropy, t,
                                                 args=(logits, labels), backend="thread")):
        lo, hi = shard_bounds(V, r, t)
        assert value == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(grad, ((probs - onehot) / (N * S))[..., lo:hi], rtol=0,
                                   atol=1e-12)
        np.testing.assert_allclose(grad, whole.backward()[..., lo:hi], rtol=0, atol=1e-12)
        # max, then [Σ exp, target logit]: 3·N·T numbers, never the N·T·V logits
        assert set(stats) == {"all_reduce"} and stats["all_reduce"]["calls"] == 2
        assert stats["all_reduce"]["bytes_sent"] == sum(
            cost.bytes_per_rank("all_reduce", "ring", k * N * S, 8, t)[r][0] for k in (1, 2))


def _no_ranks(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("ranks started")

    monkeypatch.setattr(launch, "run", started)


@pytest.mark.parametrize("model_fn, X_, options, error, match", [
    (functools.partial(gpt, n_heads=2), X, {"workers": 4}, ValueError,
     r"layer 1 Block\(d_model=16, heads=2, d_ff=32\): tensor parallelism splits the attention "
     r"heads and the MLP's hidden width over tp=4 ranks, so n_heads=2 and d_ff=32 must both "
     r"be divisible by tp=4"),
    (functools.partial(gpt, d_ff=30), X, {"workers": 4}, ValueError,
     r"n_heads=4 and d_ff=30 must both be divisible by tp=4"),
    (gpt, X[:, :6], {"workers": 4, "sequence_parallel": True}, ValueError,
     r"splits each sequence of T=6 positions over tp=4 ranks: T must be divisible by tp"),
    (functools.partial(nn.mlp, [8, 16, 11]), np.zeros((32, 8)), {"workers": 2,
                                                                  "sequence_parallel": True},
     ValueError, r"sequence_parallel=True splits sequences of tokens: it needs a GPT"),
    (gpt, X, {"workers": 2, "sequence_parallel": 1}, TypeError,
     r"sequence_parallel must be True or False \(its default is False\), got 1"),
    (gpt, X, {"workers": 2, "sequence_parallel": "yes"}, TypeError,
     r"sequence_parallel must be True or False"),
    (gpt, X, {"workers": 2, "algorithm": "native"}, ValueError,
     r"unknown all-reduce algorithm 'native' for model parallelism; allowed: .* \(not "
     r"'native': the tp, pp and dp groups are sub-communicators"),
    (gpt, np.where(np.arange(X.size).reshape(X.shape) == 27, V, X), {"workers": 2}, ValueError,
     rf"token {V} at \[3, 3\] is outside the vocabulary: tokens must lie in \[0, {V}\)"),
], ids=["n_heads", "d_ff", "T", "mlp", "int", "str", "native", "token"])
def test_bad_jobs_are_named_before_any_rank_starts(monkeypatch, model_fn, X_, options, error,
                                                   match):
    _no_ranks(monkeypatch)
    labels = Y[:, :X_.shape[1]] if X_.ndim == 2 and X_.dtype.kind == "i" else np.zeros(32, int)
    with pytest.raises(error, match=match):
        train(model_fn, X_, labels, strategy="tensor_parallel", backend="thread", **options,
              **KWARGS)
    with pytest.raises(error, match=match):  # the hybrid strategy checks the same
        train(model_fn, X_, labels, strategy="hybrid", backend="thread", tp=options["workers"],
              **options, **KWARGS)


def test_check_options_names_a_bad_sequence_parallel():
    from minidist.parallel import tensor_parallel

    with pytest.raises(TypeError, match="sequence_parallel must be True or False, got 'no'"):
        tensor_parallel.check_options({"sequence_parallel": "no"})


@pytest.mark.usefixtures("leaves_nothing_behind")
def test_interleaved_chunks_keep_sequence_parallelism():
    """tp=2 × pp=2 with two chunks per rank and sequence parallelism: each chunk's blocks are
    split (their LayerNorm gradients summed over the tp group) and the run is single's."""
    deep = functools.partial(nn.gpt, V, T, d_model=16, n_heads=4, n_layers=4, d_ff=32, seed=1)
    reference = train(deep, X, Y, **KWARGS)
    runs = {sp: train(deep, X, Y, strategy="hybrid", workers=4, tp=2, pp=2,
                      schedule="interleaved_1f1b", chunks=2, micro_batches=2,
                      sequence_parallel=sp, backend="thread", algorithm="ring", **KWARGS)
            for sp in (False, True)}
    for hist in runs.values():
        assert_same_training(hist, reference)
    assert all(len(d["layers"]) == 2 for d in runs[True].details)
    assert runs[True].stats[0]["reduce_scatter"]["calls"] > 0
    assert "reduce_scatter" not in runs[False].stats[0] or \
        runs[False].stats[0]["reduce_scatter"]["calls"] == 0
    assert all(sp["activations"] < plain["activations"]
               for sp, plain in zip(runs[True].memory, runs[False].memory, strict=True))


def test_bad_layouts_are_refused_by_every_formula():
    g = nn.gpt(11, 8, d_model=16, n_heads=4, n_layers=2, d_ff=32)
    for call, match in [
        (lambda: cost.megatron_bytes_per_rank(g, 8, 7, tp=2, sequence_parallel=True), "T=7"),
        (lambda: memory.megatron_activation_elements(8, 7, g, 2, True), "T=7"),
        (lambda: cost.megatron_bytes_per_rank(g, 8, 8, tp=3), "n_heads=4"),
        (lambda: memory.megatron_param_elements(g, 3), "n_heads=4"),
        (lambda: cost.megatron_bytes_per_rank(g, 8, 8, tp=0), "tp"),
        (lambda: cost.megatron_bytes_per_rank(g, 8, 9), "context"),
        (lambda: cost.megatron_bytes_per_rank(g, 8, 8, layers=(3, 1)), "layers"),
        (lambda: memory.megatron_param_elements(g, layers=(0, 99)), "layers"),
        (lambda: cost.megatron_bytes_per_rank(g, 2, 8, micro_batches=4), "micro-batches"),
        (lambda: cost.megatron_bytes_per_rank(g, 8, 8, tp=2, tp_rank=5), "rank"),
        (lambda: memory.megatron_param_elements(nn.mlp([4, 2])), "GPT"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.usefixtures("leaves_nothing_behind")
def test_model_parallel_ranks_share_their_replicas_rows_so_one_row_serves_them_all():
    """tp and pp ranks do not split the batch: a batch of 1 sequence trains on 4 ranks."""
    reference = train(gpt, X, Y, steps=2, batch_size=1, lr=0.1)
    hist = train(gpt, X, Y, strategy="hybrid", workers=4, tp=2, pp=2, micro_batches=1,
                 sequence_parallel=True, backend="thread", steps=2, batch_size=1, lr=0.1)
    assert_same_training(hist, reference)
