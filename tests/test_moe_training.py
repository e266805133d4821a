"""A mixture-of-experts GPT in training: every data- and pipeline-parallel strategy against one
process (float64, 1e-10), the loss the History reports, tensor parallelism's refusal and mixed
precision's loss scale on the aux gradient."""

import functools

import numpy as np
import pytest
from test_moe import routes

from minidist import nn, optim, train
from minidist.data import step_batches
from minidist.gradcheck import relative_error
from minidist.nn.moe import aux_loss
from minidist.precision import MixedPrecision


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 11, (32, 8)), rng.integers(0, 11, (32, 8))


GPT = functools.partial(nn.gpt, 11, 8, d_model=16, n_heads=2, n_layers=2, seed=1, n_experts=4,
                        top_k=2, capacity_factor=0.75, aux_loss_coef=0.5)
KWARGS = {"steps": 3, "batch_size": 8, "lr": 0.1}


@pytest.mark.usefixtures("leaves_nothing_behind")
@pytest.mark.parametrize("model_fn, strategy, options", [
    (GPT, "data_parallel", {"workers": 2}),
    (GPT, "data_parallel", {"workers": 2, "backend": "process"}),
    (GPT, "zero", {"workers": 2, "stage": 3}),
    (functools.partial(GPT, aux_loss_coef=0.0), "pipeline", {"workers": 2, "micro_batches": 2}),
    (GPT, "pipeline", {"workers": 2, "micro_batches": 2}),
    (GPT, "pipeline", {"workers": 2, "micro_batches": 2, "schedule": "interleaved_1f1b",
                       "chunks": 2}),
    (GPT, "hybrid", {"workers": 4, "dp": 2, "pp": 2, "micro_batches": 2}),
], ids=["data_parallel", "data_parallel-process", "zero3", "pipeline-no-aux", "pipeline",
        "interleaved", "hybrid"])
def test_strategies_reproduce_single(data, model_fn, strategy, options):
    X, Y = data
    single = train(model_fn, X, Y, **KWARGS)
    hist = train(model_fn, X, Y, strategy=strategy, **{"backend": "thread", **options},
                 **KWARGS)
    np.testing.assert_allclose(hist.params, single.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, single.loss, rtol=1e-10)


def test_the_history_reports_the_loss_with_the_aux_loss(data):
    X, Y = data
    hist = train(GPT, X, Y, steps=1, batch_size=8)
    task = train(functools.partial(GPT, aux_loss_coef=0.0), X, Y, steps=1, batch_size=8)
    model = GPT()
    rows = next(iter(step_batches(32, 8, 1, seed=0)))  # train's first batch
    assert hist.loss[0] == model.loss(X[rows], Y[rows])
    assert hist.loss[0] - task.loss[0] == pytest.approx(aux_loss(model.layers), rel=1e-12)


@pytest.mark.parametrize("options", [{"strategy": "tensor_parallel", "workers": 2},
                                     {"strategy": "hybrid", "workers": 4, "tp": 2, "pp": 2}])
def test_tensor_parallelism_refuses_moe_blocks_before_any_rank_starts(data, options,
                                                                       monkeypatch):
    import minidist.launch

    monkeypatch.setattr(minidist.launch, "run", lambda *a, **k: pytest.fail("ranks started"))
    with pytest.raises(ValueError, match=r"layer 1 Block\(.*experts=4, top_k=2\): "
                       r"mixture-of-experts blocks are split by expert parallelism, not "
                       r"tensor parallelism"):
        train(GPT, *data, backend="thread", **options, **KWARGS)


@pytest.mark.parametrize("precision, tolerance", [("fp16", 2e-3), ("bf16", 1e-2)])
def test_mixed_precision_scales_the_aux_gradient_with_the_loss(precision, tolerance):
    """fp16 starts backward from S·∂L (S = 2¹⁶): the aux loss's gradient must be scaled by S
    too. Its share of the router's gradient here is ~100%, so a missing S would show."""
    x = np.random.default_rng(4).integers(0, 11, (4, 8))
    y = np.random.default_rng(5).integers(0, 11, (4, 8))

    def router_grads(precision, coef=1.0):
        model = GPT(dtype=np.float32, aux_loss_coef=coef, capacity_factor=1.0)
        model.params = np.random.default_rng(1).normal(0, 0.3, model.num_params)
        mixed = MixedPrecision(model, lambda p: optim.make("sgd", p, 0.1), precision)
        with mixed.running():
            loss = model.loss(x, y)
            chosen = routes(model)
            model.backward()
        grads = model.grads.astype(np.float64) / mixed.scale
        router = [grads[part] for name, part in model.slices.items() if ".router." in name]
        return loss, np.concatenate(router), chosen

    loss32, g32, routes32 = router_grads(None)
    loss16, g16, routes16 = router_grads(precision)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(routes32, routes16, strict=True))
    assert loss16 == pytest.approx(loss32, rel=tolerance)
    assert relative_error(g16, g32) < tolerance
    assert relative_error(router_grads(None, coef=0.0)[1], g32) > 0.5  # the aux's share


def test_context_parallelism_and_the_dense_formulas_refuse_a_mixture_of_experts(data):
    from minidist import memory

    X, Y = data
    with pytest.raises(ValueError, match="does not take mixture-of-experts GPTs: their "
                       "routing is per sequence"):
        train(GPT, X, Y, strategy="context_parallel", workers=2, backend="thread", **KWARGS)
    with pytest.raises(ValueError, match="blocks are mixtures of experts"):
        memory.gpt_activation_elements(2, 8, GPT())
    with pytest.raises(ValueError, match="a mixture-of-experts GPT is not split"):
        memory.megatron_param_elements(GPT())
