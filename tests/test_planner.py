"""minidist.cost.plan: checked against measured minidist runs and, on paper, against Megatron-LM.

- Bytes per rank: the planner's communication volume equals what `History.stats` counted, exactly,
  for data, tensor, pipeline and hybrid runs of a uniform MLP (the planner's "mlp" layer).
- Memory per rank: pipeline stage 0's parameter and peak activation bytes exactly; tensor
  parallel up to two known terms the planner leaves out (it divides all of Ψ by tp where
  minidist keeps each row layer's bias whole; the loss keeps the labels, 8 bytes per sample).
- Step time: only a single-process run, in CPU time, against the measured matmul speed, within
  a factor 2.5 either way, and how it grows with the batch (a shared 2-core machine is too
  noisy for more; the communication times are not asserted).
- On paper: Shoeybi et al. 2019 (Megatron-LM, arXiv:1909.08053), Table 1 and §5: GPT-2 models
  of 1.2 / 2.5 / 4.2 / 8.3 B parameters (hidden 1536 / 1920 / 2304 / 3072, 40 / 54 / 64 / 72
  layers) trained with 1 / 2 / 4 / 8-way model parallelism on 32 GB V100s, batch 8, sequence
  1024, activation checkpointing; "1.2 billion parameters fits on a single GPU whereas the 8
  billion parameter model requires 8-way model parallelism". ZeRO (Rajbhandari et al. 2020):
  Ψ = 7.5 B with mixed-precision Adam needs (2 + 2 + 12)Ψ = 120 GB per data-parallel replica.
"""

import functools
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import minidist
from minidist import cost, memory

H, BLOCKS, BATCH, STEPS = 32, 2, 32, 2
SIZES = [H] * (2 * BLOCKS + 1)  # BLOCKS × (Linear(h→h), ReLU, Linear(h→h)), ReLUs between
MLP = functools.partial(minidist.nn.mlp, SIZES, seed=0)
PSI = MLP().num_params


def _data():
    return minidist.data.make_classification(128, H, H, seed=0)  # h inputs, h classes


def _plan_layout(dp=1, tp=1, pp=1, **options):
    return cost.estimate(PSI, BLOCKS, H, BATCH, dp * tp * pp, 1e9, 1e9, 1e9, dp, tp, pp,
                         layer="mlp", recipe="fp64_sgd", **options)


def _train(strategy, workers, **options):
    X, y = _data()
    return minidist.train(MLP, X, y, strategy=strategy, workers=workers, backend="thread",
                          steps=STEPS, batch_size=BATCH, lr=0.05, algorithm="ring", **options)


def _per_step(hist, rank, op):
    return hist.stats[rank].get(op, {}).get("bytes_sent", 0) / STEPS


def test_data_parallel_bytes_equal_the_measured_all_reduce():
    hist = _train("data_parallel", 2)
    want = _plan_layout(dp=2).sent
    assert [_per_step(hist, r, "all_reduce") for r in range(2)] == [want["data"]] * 2
    assert want["data"] == 8 * PSI  # 2(p−1)/p · 8Ψ with p = 2
    assert want["tensor"] == want["pipeline"] == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_bytes_and_memory_match_the_run(tp):
    hist = _train("tensor_parallel", tp)
    lay = _plan_layout(tp=tp)
    assert [b / STEPS for b in hist.bytes_sent] == [lay.sent["tensor"]] * tp
    assert lay.sent["data"] == lay.sent["pipeline"] == 0
    for details in hist.details:  # the planner splits all of Ψ; minidist keeps the row
        # layers' biases whole (h(1 − 1/t) more per block) and the loss keeps the int64 labels
        assert details["param_bytes"] - lay.memory["params"] == 8 * BLOCKS * H * (1 - 1 / tp)
        assert details["peak_activation_bytes"] - lay.memory["activations"] == 8 * BATCH


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_bytes_and_stage_zero_memory_are_exact(schedule):
    hist = _train("pipeline", 2, micro_batches=4, schedule=schedule)
    lay = _plan_layout(pp=2, micro_batches=4, schedule=schedule)
    assert [_per_step(hist, r, "send") for r in range(2)] == [lay.sent["pipeline"]] * 2
    assert hist.details[0]["param_bytes"] == lay.memory["params"] == 8 * PSI / 2
    assert hist.details[0]["peak_activation_bytes"] == lay.memory["activations"]
    assert hist.details[0]["peak_activations"] == (2 if schedule == "1f1b" else 4)


def test_hybrid_data_over_pipeline_bytes_match_rank_by_rank():
    hist = _train("hybrid", 4, dp=2, pp=2, micro_batches=2)
    lay = _plan_layout(dp=2, pp=2, micro_batches=2)
    for rank in range(4):
        assert _per_step(hist, rank, "send") == lay.sent["pipeline"]
        assert _per_step(hist, rank, "all_reduce") == lay.sent["data"]
    assert hist.details[0]["peak_activation_bytes"] == lay.memory["activations"]


def _matmul_flops(n, h, repeats=10):
    """FLOP/s of an (n × h)·(h × h) product, by this thread's CPU time."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, h)), rng.normal(size=(h, h))
    start = time.thread_time()
    for _ in range(repeats):
        a @ b
    return 2 * n * h * h * repeats / (time.thread_time() - start)


def _cpu_seconds_per_step(model_fn, X, y, n):
    """This thread's CPU time of a step: (8 steps − 2 steps) / 6, so the set-up cancels."""
    seconds = []
    for steps in (2, 8):
        start = time.thread_time()
        minidist.train(model_fn, X, y, steps=steps, batch_size=n, lr=0.01)
        seconds.append(time.thread_time() - start)
    return (seconds[1] - seconds[0]) / 6


def test_single_process_step_time_is_within_a_factor_2_5_of_the_prediction():
    """6ΨN FLOPs at the measured matmul speed vs a measured step, both in CPU time of one
    thread with one BLAS thread (wall time on a shared 2-core machine swings by 5×); and the
    growth from a batch of 64 to 512 (predicted 8×; a fixed cost per step makes it less)."""
    h, blocks = 256, 2
    model_fn = functools.partial(minidist.nn.mlp, [h] * (2 * blocks + 1), seed=0)
    X, y = minidist.data.make_classification(512, h, 10, seed=0)
    psi, measured, predicted = model_fn().num_params, {}, {}
    with threadpool_limits(limits=1):
        for n in (64, 512):
            flops = _matmul_flops(n, h)
            measured[n] = _cpu_seconds_per_step(model_fn, X, y, n)
            predicted[n] = cost.plan(psi, blocks, h, n, 1, 1e9, 1e9, flops, layer="mlp",
                                     recipe="fp64_sgd").best.time["total"]
            assert predicted[n] == pytest.approx(6 * psi * n / flops)
    assert 1 / 2.5 < measured[512] / predicted[512] < 2.5, (measured, predicted)
    assert 8 / 3 < measured[512] / measured[64] < 12, measured


MEGATRON = [  # hidden, layers, parameters, model-parallel GPUs (Shoeybi et al. 2019, Table 1)
    (1536, 40, 1.2e9, 1), (1920, 54, 2.5e9, 2), (2304, 64, 4.2e9, 4), (3072, 72, 8.3e9, 8)]
V100 = dict(device_memory=32e9, bandwidth=100e9 / 16, flops=125e12, seq_len=1024,
            recompute=True)


@pytest.mark.parametrize(("hidden", "layers", "psi", "gpus"), MEGATRON)
def test_megatron_configurations_fit_with_their_model_parallel_size_and_not_with_half(
        hidden, layers, psi, gpus):
    fits = cost.estimate(psi, layers, hidden, 8, gpus, tp=gpus, **V100)
    assert fits.fits and fits.memory["states"] == pytest.approx(16 * psi / gpus)
    if gpus > 1:
        assert not cost.estimate(psi, layers, hidden, 8, gpus // 2, tp=gpus // 2, **V100).fits
    assert not cost.estimate(psi, layers, hidden, 8, gpus, dp=gpus, **V100).fits or gpus == 1


def test_the_8b_model_on_8_gpus_is_split_and_the_reasons_say_why():
    result = cost.plan(8.3e9, 72, 3072, 8, 8, **V100)
    assert result.best is not None and result.best.fits and result.best.tp * result.best.pp > 1
    assert result.best is min((lay for lay in result.layouts if lay.fits),
                              key=lambda lay: lay.time["total"])
    assert any("pure data parallelism does not fit" in r for r in result.reasons)
    text = str(result)
    assert "★" in text and "recommendation" in text and result.best.name in text


def test_zero_paper_example_data_parallel_model_states():
    lay = cost.estimate(7.5e9, 32, 4096, 64, 64, 32e9, 12.5e9, 1e14, dp=64, seq_len=1)
    assert lay.memory["states"] == pytest.approx(120e9)  # (2 + 2 + 12) · 7.5e9
    assert not lay.fits


def test_formulas_bubble_compute_and_recompute():
    base = dict(n_params=1e9, n_layers=24, hidden=1024, batch=64, devices=8,
                device_memory=80e9, bandwidth=1e10, flops=1e14)
    lay = cost.estimate(**base, pp=8, micro_batches=16)
    assert lay.time["bubble"] == pytest.approx(lay.time["compute"] * 7 / 16)
    assert lay.time["compute"] == pytest.approx(6 * 1e9 * 64 / (8 * 1e14))
    gpipe = cost.estimate(**base, pp=8, micro_batches=16, schedule="gpipe")
    assert gpipe.memory["activations"] == pytest.approx(lay.memory["activations"] * 16 / 8)
    again = cost.estimate(**base, pp=8, micro_batches=16, recompute=True)
    assert again.time["compute"] == pytest.approx(lay.time["compute"] * 8 / 6)
    assert again.memory["activations"] < lay.memory["activations"]


def test_nothing_fits_gives_no_best_and_says_what_to_do():
    result = cost.plan(175e9, 96, 12288, 8, 8, 80e9, 25e9, 1e14, seq_len=2048)
    assert result.best is None and not any(lay.fits for lay in result.layouts)
    assert "no layout fits" in result.reasons[0] and "recompute" in result.reasons[1]


@pytest.mark.parametrize(("change", "message"), [
    ({"n_params": 0}, "n_params must be a positive number"),
    ({"hidden": 2.5}, "hidden must be a positive integer"),
    ({"batch": -1}, "batch must be a positive integer"),
    ({"devices": 0}, "devices must be a positive integer"),
    ({"bandwidth": float("inf")}, "bandwidth must be a positive number"),
    ({"layer": "lstm"}, "unknown layer 'lstm'"),
    ({"recipe": "fp8"}, "unknown recipe 'fp8'"),
    ({"schedule": "zb"}, "unknown schedule 'zb'"),
    ({"devices": 7, "hidden": 6, "n_layers": 3, "batch": 4}, "no dp×tp×pp grid of devices=7"),
])
def test_bad_inputs_are_named(change, message):
    args = {"n_params": 1e6, "n_layers": 4, "hidden": 64, "batch": 32, "devices": 4,
            "device_memory": 1e9, "bandwidth": 1e9, "flops": 1e9, **change}
    with pytest.raises(ValueError, match=message):
        cost.plan(**args)


@pytest.mark.parametrize(("devices", "grid", "options", "message"), [
    (4, (2, 2, 2), {}, r"2×2×2 = 8 ranks, but devices=4"),
    (4, (1, 4, 1), {}, "tp=4 does not divide hidden=6"),
    (4, (1, 1, 4), {}, "pp=4 pipeline stages for n_layers=3"),
    (64, (64, 1, 1), {}, "batch=32 is smaller than dp=64"),
    (4, (2, 1, 2), {"micro_batches": 32}, "cannot give dp=2 replicas 32 micro-batches"),
    (2, (1, 1, 2), {"micro_batches": 0}, "micro_batches must be a positive integer"),
])
def test_impossible_grids_are_named(devices, grid, options, message):
    with pytest.raises(ValueError, match=message):
        cost.estimate(1e6, 3, 6, 32, devices, 1e9, 1e9, 1e9, *grid, **options)


def test_groups_inside_a_host_use_the_host_link():
    """tp groups are consecutive ranks (Topology): inside a host of 8 they use its link, a tp
    group of 16 crosses hosts; data-parallel groups span everything and use the network."""
    base = dict(n_params=1e9, n_layers=8, hidden=1024, batch=16, devices=16,
                device_memory=1e12, bandwidth=1e10, flops=1e14, latency=0.0,
                devices_per_node=8, node_bandwidth=1e11)
    inside = cost.estimate(**base, dp=2, tp=8)
    per_layer = 4 * cost.time("all_reduce", "ring", 8 * 1024 * 2, 8, 0.0, 1 / 1e11)
    assert inside.time["tensor"] == pytest.approx(8 * per_layer)  # 8 layers, 8 rows per replica
    assert inside.time["data"] == pytest.approx(
        cost.time("all_reduce", "ring", 2 * round(1e9 / 8), 2, 0.0, 1 / 1e10))
    across = cost.estimate(**base, tp=16)
    assert across.time["tensor"] == pytest.approx(
        8 * 4 * cost.time("all_reduce", "ring", 16 * 1024 * 2, 16, 0.0, 1 / 1e10))


# ---- ZeRO in the planner ---------------------------------------------------------------------

A100_CLUSTER = dict(device_memory=80e9, bandwidth=25e9, flops=0.5 * 312e12, seq_len=2048,
                    recompute=True, devices_per_node=8, node_bandwidth=300e9)  # lesson 9's
PAPER = dict(n_layers=32, hidden=4096, batch=64, devices=64, device_memory=32e9,
             bandwidth=12.5e9, flops=1e14)  # ZeRO's Ψ = 7.5 B example on 64 devices


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_model_states_equal_the_papers_formula(stage):
    psi = 7_500_000_000
    lay = cost.estimate(psi, **PAPER, dp=64, zero_stage=stage)
    want = memory.zero_model_state_bytes(psi, stage, 64)  # 2Ψ + 2Ψ + 12Ψ, stage's parts / N
    assert {key: lay.memory[key] for key in want} == pytest.approx(want, rel=1e-12)
    assert lay.memory["states"] == pytest.approx(sum(want.values()), rel=1e-12)
    assert lay.zero_stage == stage and lay.fits == (stage > 0)  # 120 GB, 31.4, 16.6, 1.9 GB
    # with tp = 2 and pp = 8 a device holds Ψ_s = Ψ/16, sharded over dp = 4
    grid = cost.estimate(psi, **PAPER, dp=4, tp=2, pp=8, zero_stage=stage)
    want = memory.zero_model_state_bytes(psi // 16, stage, 4)
    assert {key: grid.memory[key] for key in want} == pytest.approx(want, rel=1e-12)


def test_zero_data_communication_is_the_all_reduce_and_stage_3_half_more():
    psi, dp = 1_024_000, 8
    base = dict(n_params=psi, n_layers=4, hidden=64, batch=64, devices=dp, device_memory=1e12,
                bandwidth=1e10, flops=1e14, dp=dp)
    ring = 2 * (dp - 1) * (2 * psi) // dp  # a ring all-reduce of the fp16 gradient
    lays = [cost.estimate(**base, zero_stage=stage) for stage in range(4)]
    assert [lay.sent["data"] for lay in lays] == [ring, ring, ring, 3 * ring // 2]
    assert lays[3].sent["data"] == cost.zero_bytes_per_rank(3, [psi], 2, dp)["total"]
    assert lays[0].time["data"] == lays[1].time["data"] == lays[2].time["data"]
    assert lays[3].time["data"] == pytest.approx(
        lays[0].time["data"] + cost.time("all_gather", "ring", 2 * psi, dp, 5e-6, 1e-10))
    # accumulating 4 micro-batches: ZeRO-2 reduce-scatters each one's gradient (and gathers θ
    # once, after the step), ZeRO-3 also gathers θ twice for each; ZeRO-1 (and plain data
    # parallelism) sync once per step
    micro = [cost.estimate(**base, zero_stage=stage, micro_batches=4).sent["data"]
             for stage in range(4)]
    assert micro == [ring, ring, 4 * ring // 2 + ring // 2, 6 * ring]


def test_with_zero_the_175b_model_is_no_longer_a_pure_pipeline():
    """GPT-3 175B on 64 A100s (lesson 9): without ZeRO only layouts with pipeline stages fit
    and the plan is a 64-stage pipeline; with ZeRO a layout using data parallelism with a
    sharded optimizer fits and is faster."""
    before = cost.plan(175e9, 96, 12288, 512, 64, zero_stages=(0,), **A100_CLUSTER)
    assert before.best.name == "1×1×64" and before.best.kind == "pipeline"
    assert all(lay.pp > 1 for lay in before.layouts if lay.fits)
    assert all(lay.zero_stage == 0 for lay in before.layouts)
    after = cost.plan(175e9, 96, 12288, 512, 64, **A100_CLUSTER)
    best = after.best
    assert best.dp > 1 and best.zero_stage > 0
    assert best.time["total"] < before.best.time["total"]
    twin = after.find(best.dp, best.tp, best.pp)  # the same grid without ZeRO
    assert not twin.fits and best.memory["states"] < twin.memory["states"]
    assert best.memory["states"] == pytest.approx(sum(memory.zero_shard(
        {key: twin.memory[key] for key in ("params", "grads", "optimizer")},
        best.zero_stage, best.dp).values()))
    text = str(after)
    assert "ZeRO" in text.splitlines()[0] and f"{best.label} (hybrid" in text
    assert f"ZeRO-{best.zero_stage} shards the optimizer over dp={best.dp}" in text


def test_every_grid_with_data_parallelism_comes_once_per_stage():
    result = cost.plan(1e9, 8, 1024, 16, 4, 1e12, 1e10, 1e14, zero_stages=(0, 2))
    grids = [(lay.dp, lay.tp, lay.pp, lay.zero_stage) for lay in result.layouts]
    assert len(grids) == len(set(grids))
    assert {g[3] for g in grids if g[0] == 1} == {0}  # nothing to shard over one replica
    assert {g[3] for g in grids if g[0] > 1} == {0, 2}
    assert result.find(4, 1, 1, zero_stage=2).zero_stage == 2
    with pytest.raises(ValueError, match="with ZeRO stage 3 among the candidates"):
        result.find(4, 1, 1, zero_stage=3)
    plain, sharded = result.find(4, 1, 1), result.find(4, 1, 1, zero_stage=2)
    assert plain.time == sharded.time and plain.fits  # ZeRO-2 sends what the all-reduce sends
    assert result.layouts.index(plain) < result.layouts.index(sharded)  # at equal time: the
    # lower stage first


def test_zero_options_are_checked():
    args = (1e6, 4, 64, 32, 4, 1e9, 1e9, 1e9)
    for stages in ((), (4,), "0", 3):
        with pytest.raises(ValueError, match="zero_stages"):
            cost.plan(*args, zero_stages=stages)
    with pytest.raises(ValueError, match="plan takes zero_stages"):
        cost.plan(*args, zero_stage=1)
    with pytest.raises(ValueError, match="zero_stage must be a ZeRO stage 0, 1, 2 or 3"):
        cost.estimate(*args, dp=4, zero_stage=4)
    with pytest.raises(TypeError, match="zero_stage must be an integer"):
        cost.estimate(*args, dp=4, zero_stage=1.0)
