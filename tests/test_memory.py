"""The memory each rank reports, checked against the formulas of minidist.memory (ZeRO's model
states, Korthikanti et al.'s transformer activations, the MLP's exact count) and against
numbers counted by hand; ZeRO's own formulas are tested in test_zero_memory.py."""

import functools
import importlib

import numpy as np
import pytest

from minidist import OutOfMemory, arguments, data, launch, memory, nn, train
from minidist.parallel import distributed_gd, hybrid
from minidist.parallel.job import Job
from minidist.parallel.shard import ModelShard
from minidist.parallel.tensor_parallel import block_bytes

SIZES = [6, 8, 8, 3]
MLP = functools.partial(nn.mlp, SIZES, seed=1)
PSI = MLP().num_params  # 6·8 + 8 + 8·8 + 8 + 8·3 + 3 = 155
BATCH, STEPS = 8, 2
X, Y = data.make_classification(64, SIZES[0], SIZES[-1], seed=0)


def _ranks(worker, workers, optimizer="sgd", model_fn=MLP, **options):
    """Each rank's result dict of `worker` on the thread backend (what train() collects)."""
    job = Job(model_fn, X, Y, STEPS, BATCH, 0.05, optimizer, {}, 0, options)
    return launch.run(worker, workers, args=(job,), backend="thread", timeout=60.0)


def _check_ledger(mem):
    assert set(mem) == set(memory.KEYS)
    assert all(type(v) is int and v >= 0 for v in mem.values())
    assert mem["peak"] == mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"]


# ---- the formulas ----------------------------------------------------------------------------

def test_model_state_bytes_are_zeros_table():
    assert memory.model_state_bytes(10, "fp64", "sgd") == {"params": 80, "grads": 80,
                                                           "optimizer": 80}
    assert sum(memory.model_state_bytes(10, "fp64", "adam").values()) == 32 * 10
    assert sum(memory.model_state_bytes(10, "fp32", "sgd").values()) == 12 * 10
    assert sum(memory.model_state_bytes(10, "fp32", "adam").values()) == 16 * 10
    assert memory.model_state_bytes(10, "fp16", "adam") == {"params": 20, "grads": 20,
                                                            "optimizer": 120}  # 2 + 2 + 12
    assert memory.model_state_bytes(10, "bf16", "adam", emulated=True) == {
        "params": 80, "grads": 40, "optimizer": 80}  # fp32 working copy + master, fp32 m, v
    assert memory.model_state_bytes(10, "fp32", "adam", emulated=True) == \
        memory.model_state_bytes(10, "fp32", "adam")
    with pytest.raises(ValueError, match="unknown precision/optimizer 'fp8'"):
        memory.model_state_bytes(10, "fp8")
    with pytest.raises(ValueError, match="num_params must be an integer >= 0"):
        memory.model_state_bytes(-1)


@pytest.mark.parametrize("optimizer, states", [("sgd", 1), ("adam", 2)])
def test_optimizer_state_of_a_real_optimizer_matches_the_formula(optimizer, states):
    from minidist import optim

    for dtype, precision in ((np.float64, "fp64"), (np.float32, "fp32")):
        opt = optim.make(optimizer, np.zeros(PSI, dtype), 0.1)
        assert memory.optimizer_bytes(opt) == memory.model_state_bytes(
            PSI, precision, optimizer)["optimizer"] == states * PSI * np.dtype(dtype).itemsize


def test_transformer_activation_bytes_is_korthikanti():
    s, b, h, a, L = 16, 2, 32, 4, 3
    sbh = s * b * h
    assert memory.transformer_activation_bytes(s, b, h, a, L) == L * sbh * (34 + 5 * a * s / h)
    assert memory.transformer_activation_bytes(s, b, h, a, L, dropout=False) == \
        L * (32 * sbh + 2 * a * s * s * b)
    assert memory.transformer_activation_bytes(s, b, h, a, L, recompute=True) == L * 2 * sbh
    assert memory.transformer_activation_bytes(s, b, h, a, 1, bytes_per_value=4,
                                               dropout=False) == 4 * (16 * sbh + a * s * s * b)
    with pytest.raises(TypeError, match="a must be an integer >= 0"):
        memory.transformer_activation_bytes(s, b, h, 1.5, L)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_activations_equal_the_formula_fused_and_one_layer_at_a_time(activation):
    rows = np.arange(5)  # a copy of 5 rows, as training takes X[rows] (a view of X would
    model = nn.mlp(SIZES, activation=activation)  # hold, and count, all of X)
    model.loss(X[rows], Y[rows])
    assert memory.activation_bytes([*model.layers, model.criterion]) == \
        memory.mlp_activation_bytes(5, SIZES, activation) == 5 * sum(SIZES) * 8 + 5 * 8
    shard = ModelShard(nn.mlp(SIZES, activation=activation))  # no fused Linear + activation
    shard.loss(X[rows], Y[rows])
    extra = 5 * sum(SIZES[1:-1]) * 8 if activation == "relu" else 0  # ReLU keeps its input
    assert memory.activation_bytes([*shard.layers, shard.criterion]) == \
        memory.mlp_activation_bytes(5, SIZES, activation, fused=False) == \
        memory.mlp_activation_bytes(5, SIZES, activation) + extra
    with pytest.raises(ValueError, match="activation must be 'relu' or 'tanh'"):
        memory.mlp_activation_bytes(5, SIZES, "gelu")


# ---- what each strategy's ranks hold ---------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_distributed_gd_rank_zero_alone_holds_the_optimizer(optimizer):
    ranks = _ranks(distributed_gd.worker, 2, optimizer)
    states = memory.model_state_bytes(PSI, "fp64", optimizer)
    for rank, result in enumerate(ranks):
        mem = result["memory"]
        _check_ledger(mem)
        assert mem["params"] == states["params"]
        assert mem["grads"] == 2 * states["grads"]  # model.grads and the gradient sent
        assert mem["optimizer"] == (states["optimizer"] if rank == 0 else 0)
        assert mem["activations"] == memory.mlp_activation_bytes(BATCH // 2, SIZES)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_stages_hold_the_model_and_their_micro_batches(schedule):
    p, m = 3, 4
    ranks = _ranks(hybrid.pipeline_worker, p, micro_batches=m, schedule=schedule, cuts=[2, 4])
    mems = [r["memory"] for r in ranks]
    for mem in mems:
        _check_ledger(mem)
        assert mem["grads"] == 2 * mem["params"]  # shard.grads and run_batch's sum
        assert mem["optimizer"] == mem["params"]  # SGD's velocity
    assert sum(mem["params"] for mem in mems) == 8 * PSI
    n = BATCH // m
    per_micro = [n * (6 + 8) * 8,  # Linear(6→8)'s input, ReLU's input
                 n * (8 + 8) * 8,  # Linear(8→8)'s input, ReLU's input
                 memory.mlp_activation_bytes(n, [8, 3], fused=False)]  # Linear(8→3) and loss
    assert sum(per_micro) == memory.mlp_activation_bytes(n, SIZES, fused=False)
    held = [m if schedule == "gpipe" else min(p - s, m) for s in range(p)]
    assert [r["details"]["peak_activations"] for r in ranks] == held
    assert [mem["activations"] for mem in mems] == \
        [k * b for k, b in zip(held, per_micro, strict=True)]
    assert [r["details"]["peak_activation_bytes"] for r in ranks] == \
        [mem["activations"] for mem in mems]


def test_tensor_parallel_ranks_hold_their_part_of_the_block():
    sizes = [6, 8, 3]
    ranks = _ranks(hybrid.tensor_parallel_worker, 2, model_fn=functools.partial(nn.mlp, sizes))
    params = block_bytes(BATCH, *sizes, 2)["param_bytes"]  # (6·8 + 8 + 8·3)/2 + 3 values
    for result in ranks:
        mem = result["memory"]
        _check_ledger(mem)
        assert mem["params"] == params and mem["grads"] == 2 * params
        # the whole input, the local ReLU input and row input, the probabilities, the labels
        assert mem["activations"] == BATCH * (6 + 4 + 4 + 3) * 8 + BATCH * 8


def test_hybrid_replicas_hold_the_same_and_stages_split_the_model():
    ranks = _ranks(hybrid.worker, 4, dp=2, pp=2, micro_batches=2)
    mems = [r["memory"] for r in ranks]
    for mem in mems:
        _check_ledger(mem)
    assert mems[0] == mems[2] and mems[1] == mems[3]  # replica d = rank // 2, stage = rank % 2
    assert mems[0]["params"] + mems[1]["params"] == 8 * PSI


def test_gpt_block_activations_are_korthikanti_without_dropout():
    gpt = nn.gpt
    N, T, d, H = 2, 8, 16, 4
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, size=(N, T + 1))
    for recompute in (False, True):
        model = gpt(11, T, d_model=d, n_heads=H, n_layers=2, recompute=recompute)
        model.loss(tokens[:, :-1], tokens[:, 1:])
        blocks = model.layers[1:-2]
        per_block = memory.transformer_activation_bytes(T, N, d, H, 1, bytes_per_value=8,
                                                        dropout=False, recompute=recompute)
        norm_stats = 0 if recompute else 2 * N * T * 8  # LayerNorms' 1/σ, Korthikanti drops
        assert [memory.activation_bytes([b]) for b in blocks] == [per_block + norm_stats] * 2
        assert memory.activation_bytes(blocks) == memory.transformer_activation_bytes(
            T, N, d, H, 2, 8, dropout=False, recompute=recompute) + 2 * norm_stats


def test_parameter_server_workers_and_servers_report_what_they_hold():
    hist = train(MLP, X, Y, strategy="parameter_server", workers=2, num_servers=2,
                 backend="process", steps=STEPS, batch_size=BATCH, lr=0.05, timeout=60.0)
    assert len(hist.memory) == 2
    for mem in hist.memory:
        _check_ledger(mem)
        assert (mem["params"], mem["grads"], mem["optimizer"]) == (8 * PSI, 16 * PSI, 0)
        assert mem["activations"] == memory.mlp_activation_bytes(BATCH // 2, SIZES)
    servers = hist.ps["server_memory"]
    assert len(servers) == 2
    for mem, (lo, hi) in zip(servers, [data.shard_bounds(PSI, j, 2) for j in range(2)],
                             strict=True):
        _check_ledger(mem)
        n = hi - lo  # θ_j; push slots for 2 workers and BSP's sum; SGD's velocity
        assert (mem["params"], mem["grads"], mem["optimizer"], mem["activations"]) == \
            (8 * n, 3 * 8 * n, 8 * n, 0)


@pytest.mark.parametrize("strategy, workers, options", [
    ("single", 1, {}), ("data_parallel", 2, {}), ("distributed_gd", 2, {}),
    ("tensor_parallel", 2, {}), ("pipeline", 2, {"micro_batches": 2}),
    ("hybrid", 4, {"dp": 2, "pp": 2, "micro_batches": 2})])
def test_history_memory_has_one_ledger_per_rank(strategy, workers, options):
    hist = train(MLP, X, Y, strategy=strategy, workers=workers, backend="thread", steps=STEPS,
                 batch_size=BATCH, lr=0.05, **options)
    assert len(hist.memory) == workers
    for mem in hist.memory:
        _check_ledger(mem)
        assert mem["params"] > 0 and mem["activations"] > 0


@pytest.mark.parametrize("schedule, held", [("gpipe", 4), ("1f1b", 2)])
def test_a_gpt_pipeline_stage_holds_korthikanti_per_micro_batch(schedule, held):
    gpt = nn.gpt
    T, d, H, m = 8, 16, 4, 4
    tokens = np.random.default_rng(0).integers(0, 11, size=(32, T + 1))
    job = Job(functools.partial(gpt, 11, T, d_model=d, n_heads=H, n_layers=2), tokens[:, :-1],
              tokens[:, 1:], STEPS, BATCH, 0.05, "sgd", {}, 0,
              {"micro_batches": m, "schedule": schedule, "cuts": [2]})
    ranks = launch.run(hybrid.pipeline_worker, 2, args=(job,), backend="thread", timeout=60.0)
    n = BATCH // m  # stage 0 = [Embedding, Block]: the int64 tokens, one block
    per_micro = 8 * n * T + memory.transformer_activation_bytes(
        T, n, d, H, 1, bytes_per_value=8, dropout=False) + 8 * 2 * n * T  # + LayerNorms' 1/σ
    assert ranks[0]["details"]["peak_activations"] == held
    assert ranks[0]["memory"]["activations"] == held * per_micro


@pytest.mark.parametrize("precision, itemsize", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_single_holds_zeros_states_as_the_numpy_emulation_keeps_them(precision, itemsize):
    model_fn = functools.partial(nn.mlp, SIZES, seed=1, dtype=np.float32)
    hist = train(model_fn, X.astype(np.float32), Y, steps=STEPS, batch_size=BATCH, lr=0.01,
                 optimizer="adam", precision=precision)
    (mem,) = hist.memory
    _check_ledger(mem)
    assert {k: mem[k] for k in ("params", "grads", "optimizer")} == \
        memory.model_state_bytes(PSI, precision, "adam", emulated=True)
    assert mem["activations"] == memory.mlp_activation_bytes(BATCH, SIZES, itemsize=itemsize)


@pytest.mark.parametrize("strategy, workers", [("single", 1), ("pipeline", 2)])
def test_recompute_holds_at_most_the_inputs_and_one_rebuilt_block(strategy, workers):
    """The ledger sees recompute's worst moment: inside a block's backward, the blocks' inputs
    and everything else of the forward, plus that one block rebuilt (then dropped again)."""
    N, T, d, H, V = 4, 8, 16, 2, 11
    tokens = np.random.default_rng(1).integers(0, V, size=(N, T + 1))
    X, Y = tokens[:, :-1], tokens[:, 1:]

    def held(recompute):
        model = nn.gpt(V, T, d_model=d, n_heads=H, n_layers=2, recompute=recompute)
        model.loss(X, Y)
        return model, memory.activation_bytes([*model.layers, model.criterion])

    (full_model, full), (model, kept) = held(False), held(True)
    one_block = memory.activation_bytes([full_model.layers[1]])
    model.backward()
    assert memory.activation_bytes(model.layers[1:-2]) == 0  # dropped after backward
    options = {"micro_batches": 1} if strategy == "pipeline" else {}
    runs = {r: train(lambda r=r: nn.gpt(V, T, d_model=d, n_heads=H, n_layers=2, recompute=r),
                     X, Y, strategy=strategy, workers=workers, backend="thread", steps=1,
                     batch_size=N, **options) for r in (False, True)}
    if strategy == "single":
        assert runs[False].memory[0]["activations"] == full
        assert runs[True].memory[0]["activations"] == kept + one_block < full
    else:  # stage 0 holds [Embedding, Block], stage 1 the other block, ln_f and the head:
        # with one block a stage, recompute saves nothing and costs that block's input
        assert [m["layers"] for m in runs[True].details] == [(0, 2), (2, 5)]
        for with_, without in zip(runs[True].memory, runs[False].memory, strict=True):
            assert with_["activations"] == without["activations"] + N * T * d * 8
        np.testing.assert_allclose(runs[True].params, runs[False].params, rtol=0, atol=1e-12)


# ---- the budget: from the plan before training, and during the run --------------------------

def _budget_run(strategy, budget, workers=1, optimizer="sgd", **options):
    return train(MLP, X, Y, strategy=strategy, workers=workers, backend="thread", steps=STEPS,
                 batch_size=BATCH, lr=0.05, optimizer=optimizer, max_memory_per_rank=budget,
                 **options)


TRAINING = importlib.import_module("minidist.train")  # the module (minidist.train: train())


def _no_training(monkeypatch):
    """Make any start of training fail the test: the single trainer and launch.run."""
    def started(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(TRAINING, "_train_single", started)
    monkeypatch.setattr(launch, "run", started)


@pytest.mark.parametrize("strategy, workers, grads", [("single", 1, 1), ("data_parallel", 2, 2)])
@pytest.mark.parametrize("optimizer, states", [("sgd", 1), ("adam", 2)])
def test_a_budget_the_model_states_pass_raises_before_training(
        monkeypatch, strategy, workers, grads, optimizer, states):
    held = {"params": 8 * PSI, "grads": grads * 8 * PSI, "optimizer": states * 8 * PSI}
    total = sum(held.values())
    _no_training(monkeypatch)
    with pytest.raises(OutOfMemory) as caught:
        _budget_run(strategy, total - 1, workers, optimizer)
    err = caught.value
    assert err.rank is None and err.budget == total - 1
    assert err.held == {**held, "activations": 0, "peak": total}
    text = str(err)
    assert text.startswith(f"every rank would hold {total:,} B before training (from the plan)")
    assert all(f"{key} {value:,} B" in text for key, value in held.items())
    assert f"max_memory_per_rank={total - 1:,} B" in text


@pytest.mark.parametrize("strategy, workers", [("single", 1), ("data_parallel", 2)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_budget_that_fits_the_peak_trains_and_the_ledger_equals_the_plan(
        strategy, workers, optimizer):
    planned = arguments.planned_state(MLP(), strategy, workers, optimizer, "fp64", {})
    peak = sum(planned.values()) + memory.mlp_activation_bytes(BATCH // workers, SIZES)
    hist = _budget_run(strategy, peak, workers, optimizer)  # exactly the peak: it fits
    assert planned == (memory.model_state_bytes(PSI, "fp64", optimizer) if strategy == "single"
                       else memory.zero_state_bytes([PSI], 0, workers, 8, optimizer))
    for mem in hist.memory:
        assert {key: mem[key] for key in planned} == planned and mem["peak"] == peak


def test_a_step_that_passes_the_budget_raises_during_the_run():
    peak = 3 * 8 * PSI + memory.mlp_activation_bytes(BATCH, SIZES)
    with pytest.raises(OutOfMemory, match="rank 0 would hold .* during a step") as err:
        _budget_run("single", peak - 1)
    assert err.value.rank == 0 and err.value.held["peak"] == peak


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_plan_counts_what_16_bit_emulation_holds(monkeypatch, precision):
    model_fn = functools.partial(nn.mlp, SIZES, seed=1, dtype=np.float32)
    run = functools.partial(train, model_fn, X.astype(np.float32), Y, steps=STEPS,
                            batch_size=BATCH, lr=0.01, backend="thread", precision=precision)
    states = memory.model_state_bytes(PSI, precision, "sgd", emulated=True)
    hist = run(strategy="data_parallel", workers=2)
    want = {**states, "grads": states["grads"] + 2 * PSI}  # and the 16-bit all-reduce buffer
    assert [{key: mem[key] for key in want} for mem in hist.memory] == [want] * 2
    _no_training(monkeypatch)
    for strategy, workers, held in (("single", 1, states), ("data_parallel", 2, want)):
        with pytest.raises(OutOfMemory, match="before training"):
            run(strategy=strategy, workers=workers,
                max_memory_per_rank=sum(held.values()) - 1)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("bucket_bytes", [1, 1 << 20])
def test_the_zero_plan_shards_over_the_units(monkeypatch, stage, bucket_bytes):
    """strategy="zero": the persistent state of zero_state_bytes over units(model,
    bucket_bytes), raised before training when it passes the budget."""
    sizes = [56, 72, 27] if bucket_bytes == 1 else [PSI]  # one unit a layer, or one in all
    held = memory.zero_state_bytes(sizes, stage, 3, 8, "adam")
    shard = sum(-(-u // 3) for u in sizes)  # 19 + 24 + 9 = 52, or ⌈155/3⌉ = 52
    assert held["optimizer"] == 2 * 8 * shard
    assert held["params"] == 8 * (shard if stage == 3 else PSI)
    assert held["grads"] == 8 * (PSI if stage == 1 else shard)
    total = sum(held.values())
    _no_training(monkeypatch)
    with pytest.raises(AssertionError, match="training started"):  # it fits: training starts
        _budget_run("zero", total, 3, "adam", stage=stage, bucket_bytes=bucket_bytes)
    with pytest.raises(OutOfMemory, match=f"every rank would hold {total:,} B before training"):
        _budget_run("zero", total - 1, 3, "adam", stage=stage, bucket_bytes=bucket_bytes)


@pytest.mark.parametrize("budget, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError),
                                           (True, TypeError), ("1 GB", TypeError)])
def test_bad_budgets_are_named(budget, error):
    with pytest.raises(error, match="max_memory_per_rank must be an integer >= 1"):
        _budget_run("single", budget)
