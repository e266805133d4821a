"""Mixed precision (minidist.precision): fp16 / bf16 compute over fp32 master weights, dynamic
loss scaling, 16-bit activations and all-reduce, and the memory each rank reports.

References: the same run in fp32 (or fp64), numpy's float16 and ml_dtypes' bfloat16 rounding,
and byte counts done by hand (Ψ parameters, N rows of the 64-32-10 digits MLP)."""

import functools
import importlib.util
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from minidist import data, memory, nn, optim, precision, train
from minidist.precision import MixedPrecision

X, Y = data.load_digits()
X = X.astype(np.float32)
SIZES = [64, 32, 10]
MLP32 = functools.partial(nn.mlp, SIZES, dtype=np.float32)
PSI = MLP32().num_params  # 64·32 + 32 + 32·10 + 10 = 2410
N = 64  # train()'s default batch_size
EPS = {"fp16": 2.0**-10, "bf16": 2.0**-7}
HALF = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def representable(x, name):
    return np.array_equal(x, x.astype(HALF[name]).astype(np.float32))


def mixed_model(name, loss_scale=2.0**16, seed=0, momentum=0.0):
    model = nn.mlp(SIZES, dtype=np.float32, seed=seed)
    mixed = MixedPrecision(model, lambda p: optim.SGD(p, 0.1, momentum=momentum), name,
                           loss_scale)
    return model, mixed


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_16_bits_train_the_digits_as_well_as_fp32(name):
    X_train, X_test, y_train, y_test = data.train_test_split(X, Y, seed=0)
    runs = {p: train(MLP32, X_train, y_train, steps=200, lr=0.1, seed=1, precision=p)
            for p in ("fp32", name)}
    assert runs[name].precision == name and runs["fp32"].precision == "fp32"
    accuracy = {p: h.accuracy(X_test, y_test) for p, h in runs.items()}
    assert accuracy["fp32"] > 0.9
    assert abs(accuracy[name] - accuracy["fp32"]) <= 0.015
    assert not np.array_equal(runs[name].params, runs["fp32"].params)  # it did round
    assert runs[name].params.dtype == np.float32  # the master weights
    scale = 2.0**16 * 2.0 ** (np.arange(200) // precision.GROWTH_INTERVAL)
    np.testing.assert_array_equal(runs[name].loss_scale, scale if name == "fp16" else 1.0)
    assert runs[name].skipped_steps.size == 0


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_weights_activations_and_gradients_are_rounded_and_stored_in_16_bits(name):
    model, mixed = mixed_model(name, loss_scale=1024.0)
    reference = nn.mlp(SIZES, dtype=np.float32)  # the same init, in fp32
    rows = np.arange(256)
    assert representable(model.params, name)
    np.testing.assert_array_equal(mixed.master, reference.params)  # the master is not rounded
    z, z32 = model.forward(X[rows]), reference.forward(X[rows])
    assert representable(z, name)
    rel = np.sqrt(np.mean((z - z32) ** 2) / np.mean(z32**2))  # about ε: 0.3-0.6 ε measured
    assert 0.1 * EPS[name] < rel < 2 * EPS[name]
    loss, loss32 = model.loss(X[rows], Y[rows]), reference.loss(X[rows], Y[rows])
    assert loss != loss32 and abs(loss - loss32) < EPS[name] * loss32
    linear0, relu, linear1 = model.layers
    assert linear0.X.dtype == relu.X.dtype == model.criterion.probs.dtype == HALF[name]
    assert relu.X is linear1.X  # one array, kept by both, as in fp32
    assert model.criterion.labels.dtype == np.int64
    model.backward()  # each layer worked from fp32 copies, and let go of them after
    assert memory.activation_bytes([*model.layers, model.criterion]) == 0
    reference.params = model.params  # fp32 at the same (rounded) weights: ReLU masks agree
    reference.loss_and_grad(X[rows], Y[rows])
    scale = 1024.0 if name == "fp16" else 1.0  # backward starts from S·∂L/∂z
    g, g32 = model.grads / scale, reference.grads
    assert np.linalg.norm(g - g32) < EPS[name] * np.linalg.norm(g32)  # 0.1 ε measured


def test_16_bit_activations_take_exactly_half_the_bytes_of_fp32():
    mems = {p: train(MLP32, X, Y, steps=2, precision=p).memory[0]
            for p in ("fp32", "fp16", "bf16")}
    labels = N * 8  # int64 labels stay as they are
    assert mems["fp32"]["activations"] == N * sum(SIZES) * 4 + labels
    for name in ("fp16", "bf16"):
        assert mems[name]["activations"] - labels == (mems["fp32"]["activations"] - labels) // 2


def test_a_good_step_steps_the_master_on_the_unscaled_16_bit_gradient():
    model, mixed = mixed_model("fp16", loss_scale=1024.0, momentum=0.9)
    master = mixed.master.copy()
    grads = np.random.default_rng(0).normal(0, 100.0, PSI).astype(np.float32)
    assert mixed.step(grads)
    g16 = grads.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(mixed.master, master - np.float32(0.1) * (g16 / 1024))
    assert representable(model.params, "fp16")
    np.testing.assert_array_equal(model.params, mixed.master.astype(np.float16).astype(np.float32))


def test_an_overflowing_step_is_skipped_and_halves_the_scale():
    model, mixed = mixed_model("fp16", loss_scale=1024.0, momentum=0.9)
    mixed.step(np.ones(PSI, np.float32))
    master, params = mixed.master.copy(), model.params.copy()
    velocity, t = mixed.optimizer.state["velocity"].copy(), mixed.optimizer.t
    grads = np.ones(PSI, np.float32)
    grads[7] = 70000.0  # finite in fp32, inf in fp16
    assert not mixed.step(grads)
    np.testing.assert_array_equal(mixed.master, master)
    np.testing.assert_array_equal(model.params, params)
    np.testing.assert_array_equal(mixed.optimizer.state["velocity"], velocity)
    assert mixed.optimizer.t == t and mixed.scale == 512.0
    assert mixed.record()["skipped_steps"].tolist() == [1]
    assert mixed.record()["loss_scale"].tolist() == [1024.0, 1024.0]


def test_a_huge_loss_scale_backs_off_then_recovers():
    normal = train(MLP32, X, Y, steps=300, precision="fp16")
    huge = train(MLP32, X, Y, steps=300, precision="fp16", loss_scale=2.0**40)
    skipped = huge.skipped_steps
    k = int(np.argmin(skipped == np.arange(len(skipped))))  # the first backoff: steps 0 … k−1
    assert k >= 10
    np.testing.assert_array_equal(huge.loss_scale[:k + 1], 2.0**40 * 0.5 ** np.arange(k + 1))
    assert len(skipped) - k <= 0.05 * 300  # then rare: a scale that grew back too far
    assert abs(huge.loss[-20:].mean() - normal.loss[-20:].mean()) < 0.05
    assert huge.loss[-20:].mean() < 0.2 * huge.loss[0]
    assert normal.skipped_steps.size == 0


def test_a_run_whose_every_step_is_skipped_keeps_its_initial_weights():
    hist = train(MLP32, X, Y, steps=5, precision="fp16", loss_scale=2.0**40)
    np.testing.assert_array_equal(hist.skipped_steps, np.arange(5))
    np.testing.assert_array_equal(hist.params, MLP32().params)
    assert np.all(np.isfinite(hist.loss))  # the true loss of each skipped step, reported


def test_the_scale_doubles_after_growth_interval_good_steps():
    steps = 2 * precision.GROWTH_INTERVAL + 1
    hist = train(MLP32, X, Y, steps=steps, precision="fp16", loss_scale=2.0**8)
    assert hist.skipped_steps.size == 0
    np.testing.assert_array_equal(
        hist.loss_scale, 2.0**8 * 2.0 ** (np.arange(steps) // precision.GROWTH_INTERVAL))


@pytest.mark.parametrize("backend, half", [("thread", "fp16"), ("process", "fp16"),
                                           ("thread", "bf16"), ("process", "bf16")])
def test_16_bit_data_parallel_sends_half_and_follows_single(backend, half):
    kwargs = {"steps": 30, "lr": 0.1}
    single16 = train(MLP32, X, Y, precision=half, **kwargs)
    single32 = train(MLP32, X, Y, **kwargs)
    runs = {p: train(MLP32, X, Y, strategy="data_parallel", workers=2, backend=backend,
                     precision=p, **kwargs) for p in ("fp32", half)}
    runs["fp16"] = runs[half]
    for rank in range(2):
        stats = {p: h.stats[rank] for p, h in runs.items()}
        assert stats["fp16"]["all_reduce"]["bytes_sent"] * 2 == \
            stats["fp32"]["all_reduce"]["bytes_sent"] > 0
        assert stats["fp16"]["broadcast"]["bytes_sent"] == \
            stats["fp32"]["broadcast"]["bytes_sent"]  # the fp32 θ₀, from rank 0
        assert runs["fp32"].bytes_sent[rank] - runs["fp16"].bytes_sent[rank] == \
            stats["fp16"]["all_reduce"]["bytes_sent"]
        assert runs["fp16"].memory[rank] == {
            "params": 8 * PSI, "grads": 4 * PSI + 2 * PSI, "optimizer": 4 * PSI,
            "activations": N // 2 * (sum(SIZES) * 2 + 8),
            "peak": 18 * PSI + N // 2 * (sum(SIZES) * 2 + 8)}
        assert runs["fp32"].memory[rank]["grads"] == 4 * PSI + 4 * PSI  # + the shared buffer
    # Not equal to single: each rank rounds its weighted gradient to fp16 and the all-reduce
    # sums in fp16, where single rounds the whole batch's gradient once. Measured in fp16:
    # 2.2e-5, seven times closer to single fp16 than single fp16 is to fp32 (1.5e-4); in
    # bf16, whose ε is 8× fp16's, 5.2e-4.
    dp = runs["fp16"]
    gap = np.abs(dp.params - single16.params).max()
    assert gap < 0.1 * EPS[half] and gap < 0.3 * np.abs(single16.params - single32.params).max()
    np.testing.assert_allclose(dp.loss, single16.loss, atol=0.1 * EPS[half])
    np.testing.assert_array_equal(dp.loss_scale, single16.loss_scale)


@pytest.mark.parametrize("optimizer, states", [("sgd", 1), ("adam", 2)])
def test_history_memory_of_single_counts_every_byte(optimizer, states):
    fp64 = train(functools.partial(nn.mlp, SIZES), X.astype(np.float64), Y, steps=2,
                 optimizer=optimizer)
    assert fp64.precision == "fp64"
    activations = N * sum(SIZES) * 8 + N * 8
    persistent = 8 * PSI + 8 * PSI + states * 8 * PSI  # SGD's velocity exists at momentum 0
    assert fp64.memory == [{"params": 8 * PSI, "grads": 8 * PSI, "optimizer": states * 8 * PSI,
                            "activations": activations, "peak": persistent + activations}]
    fp16 = train(MLP32, X, Y, steps=2, optimizer=optimizer, precision="fp16")
    assert fp16.memory[0]["params"] == 4 * PSI + 4 * PSI  # the working copy and the master
    assert fp16.memory[0]["grads"] == 4 * PSI
    assert fp16.memory[0]["optimizer"] == states * 4 * PSI


def test_default_precision_is_the_models_and_other_strategies_report_no_scaling():
    default = train(functools.partial(nn.mlp, SIZES), X.astype(np.float64), Y, steps=3)
    explicit = train(functools.partial(nn.mlp, SIZES), X.astype(np.float64), Y, steps=3,
                     precision="fp64")
    np.testing.assert_array_equal(default.params, explicit.params)
    assert default.precision == "fp64" and train(MLP32, X, Y, steps=1).precision == "fp32"
    gd = train(MLP32, X, Y, strategy="distributed_gd", workers=2, backend="thread", steps=3)
    assert gd.precision == "fp32" and gd.skipped_steps.size == 0
    np.testing.assert_array_equal(gd.loss_scale, np.ones(3))
    assert len(gd.memory) == 2


MLP64 = functools.partial(nn.mlp, SIZES)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"precision": "fp8"}, ValueError, "unknown precision 'fp8'; allowed: fp64, fp32, fp16, bf16"),
    ({"precision": 16}, ValueError, "unknown precision 16"),
    ({"precision": "fp16", "model_fn": MLP64}, ValueError,
     "needs a float32 model .fp16/bf16 keep fp32 master weights.*dtype=np.float32"),
    ({"precision": "fp32", "model_fn": MLP64}, ValueError, "needs a float32 model"),
    ({"precision": "fp64"}, ValueError, "needs a float64 model.*dtype=np.float64"),
    ({"loss_scale": 0.0}, ValueError, r"loss_scale must lie in \[2\*\*-24, 2\*\*127\].*got 0.0"),
    ({"loss_scale": 1e-300}, ValueError, r"loss_scale must lie in \[2\*\*-24, 2\*\*127\]"),
    ({"loss_scale": 2.0**128}, ValueError, r"loss_scale must lie in \[2\*\*-24, 2\*\*127\]"),
    ({"loss_scale": np.inf}, ValueError, r"loss_scale must lie in \[2\*\*-24, 2\*\*127\]"),
    ({"loss_scale": np.nan}, ValueError, r"loss_scale must lie in \[2\*\*-24, 2\*\*127\]"),
    ({"loss_scale": "big"}, TypeError, "loss_scale must be a number"),
    ({"precision": "bf16", "strategy": "distributed_gd", "workers": 2}, ValueError,
     "strategy 'single' or 'data_parallel' only, not 'distributed_gd'"),
    ({"precision": "fp16", "strategy": "data_parallel", "workers": 2, "compression": "topk"},
     ValueError, "does not combine with compression or local_steps"),
    ({"precision": "fp16", "strategy": "data_parallel", "workers": 2, "local_steps": 2},
     ValueError, "does not combine with compression or local_steps"),
])
def test_bad_precision_arguments_are_named(kwargs, error, match):
    model_fn = kwargs.pop("model_fn", MLP32)
    x = X.astype(np.float64) if model_fn is MLP64 else X
    with pytest.raises(error, match=match):
        train(model_fn, x, Y, steps=1, backend="thread", **kwargs)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_gpt_in_bf16_rounds_inside_its_blocks_and_stores_half_the_bytes(recompute):
    from minidist import memory

    gpt = getattr(nn, "gpt", None)
    if gpt is None:
        pytest.skip("minidist.nn.gpt does not exist yet")
    tokens = np.random.default_rng(0).integers(0, 11, (4, 9))
    models = [gpt(11, 8, d_model=16, n_heads=2, dtype=np.float32, recompute=recompute)
              for _ in range(2)]
    MixedPrecision(models[1], lambda p: optim.SGD(p, 0.1), "bf16")
    block = models[1].layers[1]
    assert block.rounding is block.mlp.rounding is block.mlp.gelu.rounding is not None
    kept = []
    for model in models:
        model.loss(tokens[:, :-1], tokens[:, 1:])
        kept.append(memory.activation_bytes([*model.layers, model.criterion]))
        model.backward()
    ints = 2 * 4 * 8 * 8  # the int64 tokens and targets
    assert kept[1] - ints == (kept[0] - ints) // 2  # Q, K, V: still views of one array
    assert np.linalg.norm(models[1].grads - models[0].grads) < \
        4 * EPS["bf16"] * np.linalg.norm(models[0].grads)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or not (
    (Path(sys.executable).parent / "mpiexec").exists() or shutil.which("mpiexec")),
    reason="needs mpi4py and mpiexec: pip install 'minidist[mpi]'")
def test_fp16_data_parallel_runs_on_mpi_as_on_threads():
    runs = [train(MLP32, X, Y, strategy="data_parallel", workers=2, backend=backend, steps=5,
                  precision="fp16", timeout=120.0) for backend in ("mpi", "thread")]
    np.testing.assert_array_equal(runs[0].params, runs[1].params)  # a + b rounds alike
    assert runs[0].stats[0]["all_reduce"]["bytes_sent"] == \
        runs[1].stats[0]["all_reduce"]["bytes_sent"]


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_recompute_in_16_bits_is_the_same_arithmetic_and_counts_16_bit_bytes(name):
    """A recomputing block's rebuilt arrays make the stored arrays' trip through 16 bits: the
    same gradients as without recompute, bit for bit, and the rebuilt arrays counted at 16
    bits."""
    tokens = np.random.default_rng(2).integers(0, 13, size=(8, 9))
    X, Y = tokens[:, :-1], tokens[:, 1:]
    runs = {(p, r): train(functools.partial(nn.gpt, 13, 8, d_model=16, n_heads=2,
                                            dtype=np.float32, recompute=r),
                          X, Y, steps=3, batch_size=8, lr=0.05, precision=p)
            for p in ("fp32", name) for r in (False, True)}
    np.testing.assert_array_equal(runs[(name, True)].params, runs[(name, False)].params)
    np.testing.assert_array_equal(runs[(name, True)].loss, runs[(name, False)].loss)
    act = {key: h.memory[0]["activations"] for key, h in runs.items()}
    ints = 2 * 8 * 8 * 8  # tokens and targets: int64, the same in every precision
    assert act[(name, False)] - ints == (act[("fp32", False)] - ints) // 2
    # with recompute the fullest moment is inside the last block's backward, where in 16 bits
    # the layers after it have already let go of their fp32 working copies
    assert act[(name, True)] - ints <= (act[("fp32", True)] - ints) // 2
    assert act[(name, True)] < act[(name, False)]


def test_a_model_handed_out_twice_leaves_a_16_bit_run_as_it_came():
    model = MLP32()
    half = train(lambda: model, X, Y, steps=3, precision="bf16")
    assert model.precision is None and all(layer.rounding is None for layer in model.layers)
    again = train(lambda: model, X, Y, steps=3)
    assert again.precision == "fp32" and not representable(again.params, "bf16")
    assert half.precision == "bf16"
