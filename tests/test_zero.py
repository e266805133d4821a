"""ZeRO stages 1, 2 and 3: the same training as one process (float64, 1e-10), the sharded
memory each rank measures against the padded-shard arithmetic, the bytes each rank sends
against the ZeRO paper's count, a memory budget only sharding meets, the timeline drawn unit by
unit (stage 3: each unit's bar after its all-gather), and bad options named."""

import functools
import importlib.util
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from minidist import OutOfMemory, data, nn, run, train
from minidist.parallel.buckets import units
from minidist.parallel.fsdp import FSDP
from minidist.parallel.job import Clock, Job
from minidist.parallel.zero import Zero
from minidist.trace import COMPUTE

# Ψ = 1885 + 330 + 120 = 2335: neither Ψ nor the first layer's 1885 is divisible by 2, 3 or 4
MODEL = functools.partial(nn.mlp, [64, 29, 11, 10], seed=0)
SGD = {"steps": 4, "batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
ADAM = {"steps": 4, "batch_size": 64, "lr": 0.01, "optimizer": "adam"}
UNITS = 4000  # bucket_bytes: two units, layers 2-4 (450 elements) and layer 0 (1885)
STATE_ARRAYS = {"sgd": 1, "adam": 2}  # SGD's velocity; Adam's m and v

MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAS_MPI = importlib.util.find_spec("mpi4py") is not None and (
    MPIEXEC.exists() or shutil.which("mpiexec") is not None)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@functools.cache
def single(optimizer, model_fn=MODEL):
    X, y = data.load_digits()
    return train(model_fn, X, y, **(SGD if optimizer == "sgd" else ADAM))


def shard_elements(model_fn, workers, bucket_bytes):
    """Σ c_u, c_u = ⌈u/N⌉ over the units: what one rank's shard holds."""
    return sum(-(-unit.size // workers) for unit in units(model_fn(), bucket_bytes))


def assert_same_training(hist, reference):
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_as_one_process(digits, stage, optimizer, workers, overlap):
    kwargs = SGD if optimizer == "sgd" else ADAM
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=workers,
                 backend="thread", bucket_bytes=UNITS, overlap=overlap, **kwargs)
    assert len(units(MODEL(), UNITS)) == 2
    assert_same_training(hist, single(optimizer))
    assert hist.options == {"stage": stage, "bucket_bytes": UNITS, "overlap": overlap}


@pytest.mark.parametrize("bucket_bytes", [1, 1 << 20])  # a unit per layer; one unit
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_any_cut_into_units_trains_the_same(digits, stage, bucket_bytes):
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=3, backend="thread",
                 bucket_bytes=bucket_bytes, overlap=stage == 3, **SGD)
    assert_same_training(hist, single("sgd"))


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("stage, optimizer, overlap", [(1, "adam", True), (2, "sgd", False),
                                                       (3, "sgd", True)])
def test_process_ranks_train_as_one_process(digits, stage, optimizer, overlap):
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=2, backend="process",
                 bucket_bytes=UNITS, overlap=overlap, **(SGD if optimizer == "sgd" else ADAM))
    assert_same_training(hist, single(optimizer))


@pytest.mark.skipif(not HAS_MPI, reason="needs mpi4py and mpiexec: pip install 'minidist[mpi]'")
@pytest.mark.usefixtures("leaves_no_mpi_job_behind")
@pytest.mark.parametrize("stage, optimizer, overlap", [(1, "sgd", False), (2, "adam", True),
                                                       (3, "adam", True)])
def test_mpi_ranks_train_as_one_process(digits, stage, optimizer, overlap):
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=2, backend="mpi",
                 bucket_bytes=UNITS, overlap=overlap, **(SGD if optimizer == "sgd" else ADAM))
    assert_same_training(hist, single(optimizer))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_stage_3_trains_a_gpt_as_one_process(overlap, recompute):
    gpt = functools.partial(nn.gpt, 11, 8, d_model=16, n_heads=2, n_layers=2, seed=1,
                            recompute=recompute)
    rng = np.random.default_rng(0)
    X, Y = rng.integers(0, 11, (32, 8)), rng.integers(0, 11, (32, 8))
    kwargs = {"steps": 3, "batch_size": 8, "lr": 0.1}
    hist = train(gpt, X, Y, strategy="zero", stage=3, workers=3, backend="thread",
                 bucket_bytes=1, overlap=overlap, **kwargs)  # a unit per layer, 5 of them
    assert_same_training(hist, train(gpt, X, Y, **kwargs))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_memory_is_the_sharded_state_and_peaks_below_data_parallel(digits, workers, optimizer):
    """Persistent bytes per rank, b = 8, S state arrays, Σc the padded shard: stage 1 holds
    θ Ψb, ∇ Ψb, optimizer S·Σc·b; stage 2 ∇ Σc·b; stage 3 θ Σc·b too. Every peak (with the
    transient gathered and gradient units) stays below data_parallel's."""
    kwargs = SGD if optimizer == "sgd" else ADAM
    psi, shard = MODEL().num_params * 8, shard_elements(MODEL, workers, UNITS) * 8
    S = STATE_ARRAYS[optimizer]
    replica = train(MODEL, *digits, strategy="data_parallel", workers=workers,
                    backend="thread", **kwargs).memory
    expected = {1: (psi, psi, S * shard), 2: (psi, shard, S * shard),
                3: (shard, shard, S * shard)}
    for stage, (params, grads, state) in expected.items():
        for overlap in (False, True):
            hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=workers,
                         backend="thread", bucket_bytes=UNITS, overlap=overlap, **kwargs)
            for rank, held in enumerate(hist.memory):
                assert (held["params"], held["grads"], held["optimizer"]) == (
                    params, grads, state), (stage, overlap, rank)
                assert held["activations"] == replica[rank]["activations"]
                assert held["params"] + held["grads"] + held["optimizer"] + \
                    held["activations"] <= held["peak"] < replica[rank]["peak"]


@pytest.mark.parametrize("workers", [1, 3, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bytes_per_rank_are_the_zero_papers(digits, stage, workers):
    """Per step, each rank sends (N−1)·Σc·b reduce-scattering and as many all-gathering θ
    (stage 3: twice, before the forward and before the backward); the final θ, gathered
    after the training, is not counted."""
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=workers,
                 backend="thread", bucket_bytes=UNITS, overlap=stage == 2, **SGD)
    per_step = (workers - 1) * shard_elements(MODEL, workers, UNITS) * 8
    for stats in hist.stats:
        assert set(stats) == {"broadcast", "reduce_scatter", "all_gather"}  # broadcast: θ₀
        assert stats["reduce_scatter"]["bytes_sent"] == SGD["steps"] * per_step
        assert stats["all_gather"]["bytes_sent"] == SGD["steps"] * per_step * (
            2 if stage == 3 else 1)


def test_a_budget_data_parallel_cannot_meet_and_stage_3_can(digits):
    wide = functools.partial(nn.mlp, [64, 256, 256, 10], seed=0)  # Ψ = 85 002: 680 kB
    kwargs = {**SGD, "steps": 2}
    budget = 2_000_000  # data parallelism holds 4 · 680 kB before any activation; ZeRO-3 its
    # shards (3 · 170 kB) and, at its fullest, the 526 kB layer's gathered θ and ∇ beside them
    with pytest.raises(OutOfMemory):
        train(wide, *digits, strategy="data_parallel", workers=4, backend="thread",
              max_memory_per_rank=budget, **kwargs)
    hist = train(wide, *digits, strategy="zero", stage=3, workers=4, backend="thread",
                 bucket_bytes=1, overlap=True, max_memory_per_rank=budget, **kwargs)
    assert max(held["peak"] for held in hist.memory) <= budget
    assert_same_training(hist, train(wide, *digits, **kwargs))


def _of_step(events, t):
    """One step's events, idle left out, in order of start."""
    return [e for e in events if e[3] == t and e[0] != "idle"]


def _bars(events):
    """The compute bars (forward, backward) as (name, micro): micro is the unit, −1 for none."""
    return [(e[0], e[4]) for e in events if e[0] in COMPUTE]


@pytest.mark.parametrize("overlap", [False, True])
def test_stage_3_draws_a_bar_per_unit_after_its_gather(digits, overlap):
    """bucket_bytes=1: units 0, 1, 2 are layers 4, 2, 0 (last first), the ReLUs 1 and 3 between
    them (fused into the forward's Linear bars). Each unit's bar begins after its all-gather
    ended; without prefetch everything runs one after the other: gather, compute, (reduce-
    scatter, then a bar of no unit: freeing, the ReLU's backward), gather, compute, ..."""
    hist = train(MODEL, *digits, strategy="zero", stage=3, workers=2, backend="thread",
                 bucket_bytes=1, overlap=overlap, **{**SGD, "steps": 2})
    after = [("backward", -1)] if not overlap else []  # what follows a blocking reduce-scatter
    expected = [("forward", 2), ("forward", 1), ("forward", 0), ("backward", -1),
                ("backward", 0), *after, ("backward", 1), *after, ("backward", 2), *after]
    for events in hist.events:
        for t in range(2):
            step = _of_step(events, t)
            assert _bars(step) == expected
            gathers = [e for e in step if e[0] == "all_gather"]  # in the order issued
            units_bars = [e for e in step if e[0] in COMPUTE and e[4] >= 0]
            assert len(gathers) == len(units_bars) == 6
            assert all(g[2] <= bar[1] for g, bar in zip(gathers, units_bars, strict=True))
            if not overlap:
                assert [e[0] for e in step] == ["all_gather", "forward"] * 3 + ["backward"] + [
                    "all_gather", "backward", "reduce_scatter", "backward"] * 3 + ["optimizer"]
                assert all(a[2] <= b[1] for a, b in itertools.pairwise(step))  # one by one


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_bars_hold_the_compute_seconds(digits, stage):
    """Stages 1, 2 with overlap block nowhere in a pass: the bars tile both passes, so they and
    the optimizer's event add up to the step's compute seconds. Stage 3 blocks on its first
    gather at least: the bars hold no more than the compute seconds."""
    hist = train(MODEL, *digits, strategy="zero", stage=stage, workers=2, backend="thread",
                 bucket_bytes=UNITS, overlap=True, **{**SGD, "steps": 2})
    for t in range(2):  # History.compute_time is rank 0's
        step = _of_step(hist.events[0], t)
        assert _bars(step) == [("forward", 1), ("forward", 0), ("backward", -1),
                               ("backward", 0), ("backward", 1)]
        busy = sum(e[2] - e[1] for e in step if e[0] in (*COMPUTE, "optimizer"))
        if stage < 3:
            assert busy == pytest.approx(hist.compute_time[t], rel=0, abs=1e-6)  # float rounding
        else:
            assert busy <= hist.compute_time[t] + 1e-6


def _after_a_step(comm, stage, overlap):
    """One step of ZeRO-`stage` on this rank: what still holds buffers afterwards."""
    X, y = data.load_digits()
    job = Job(MODEL, X, y, 1, 64, 0.1, "sgd", {}, 0)
    model, clock = MODEL(), Clock(1)
    zero = (FSDP if stage == 3 else Zero)(comm, clock, model, job.make_optimizer, {
        "stage": stage, "bucket_bytes": UNITS, "overlap": overlap})
    with zero.attached(model):
        clock.begin(0)
        zero.forward_backward(X[:32], y[:32], 0.5)
        zero.step()
    views = [v for layer in model.layers for side in ("params", "grads")
             for v in getattr(layer, side, {}).values()]
    return (model._params, model._grads, [v.flags.writeable for v in views],
            np.isnan(np.concatenate([v.ravel() for v in views])).all(), dict(zero.live),
            zero.pending, zero.grads)


def test_stage_3_lets_the_full_buffers_go():
    for params, grads, writeable, nan, live, pending, _ in run(_after_a_step, 2, backend="thread",
                                                               args=(3, True)):
        assert params is None and grads is None  # the model's own flat buffers are gone
        assert not any(writeable) and nan  # every view points at a freed placeholder
        assert live == pending == {}


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_of_stages_1_and_2_leaves_no_temporary(stage, overlap):
    """After the step: no gathered rows, θ-chunk copy or gradient copy held, nothing in flight;
    stage 1 let go of its ∇ shard, stage 2 keeps it (Σc) and never the model's ∇ buffer."""
    shard = shard_elements(MODEL, 2, UNITS)
    for params, grads, _, _, live, pending, shard_grads in run(
            _after_a_step, 2, backend="thread", args=(stage, overlap)):
        assert live == pending == {} and params.size == MODEL().num_params
        if stage == 1:
            assert shard_grads is None and grads.size == params.size
        else:
            assert shard_grads.size == shard and grads is None


@pytest.mark.parametrize("options, error, words", [
    ({"stage": 0}, ValueError, "stage must be 1"),
    ({"stage": 4}, ValueError, "stage must be 1"),
    ({"stage": 2.0}, TypeError, "stage must be an integer"),
    ({"bucket_bytes": 0}, ValueError, "bucket_bytes"),
    ({"overlap": "yes"}, TypeError, "overlap must be True or False"),
    ({"accumulate": 2}, ValueError, "does not take ['accumulate']"),
])
def test_bad_options_are_named(digits, options, error, words):
    with pytest.raises(error, match=f"^.*{words.replace('[', '.').replace(']', '.')}"):
        train(MODEL, *digits, strategy="zero", workers=2, backend="thread", **SGD, **options)


def test_refuses_a_model_it_cannot_shard(digits):
    with pytest.raises(ValueError, match="needs a minidist.nn.Sequential model on the numpy"):
        train(lambda: object(), *digits, strategy="zero", workers=2, backend="thread", **SGD)
    with pytest.raises(ValueError, match="precision='fp16' runs with strategy 'single' or"):
        train(functools.partial(nn.mlp, [64, 10], dtype=np.float32), *digits, strategy="zero",
              workers=2, backend="thread", precision="fp16", **SGD)
