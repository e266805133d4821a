"""A model on "cuda": buffers stay on the device, and training matches the numpy run."""

import functools

import numpy as np
import pytest

from minidist import data, kernels, nn, optim, train
from minidist.kernels import cuda as cuda_ops

SIZES = [64, 16, 10]  # the digits MLP, narrow enough for the simulator


@pytest.fixture(scope="module")
def digits():
    X, y = data.load_digits()
    return X[:200], y[:200]


@pytest.mark.parametrize("optimizer, options, activation", [
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}, "relu"),
    ("adam", {}, "tanh"),
])
def test_training_on_cuda_matches_numpy(digits, optimizer, options, activation):
    X, y = digits
    runs = {}
    for device in ("numpy", "cuda"):
        model_fn = functools.partial(nn.mlp, SIZES, activation=activation, seed=3, device=device)
        runs[device] = train(model_fn, X, y, strategy="single", steps=3, batch_size=8,
                             lr=0.05, optimizer=optimizer, optimizer_options=options, seed=1)
    assert isinstance(runs["cuda"].params, np.ndarray)
    np.testing.assert_allclose(runs["cuda"].loss, runs["numpy"].loss, rtol=1e-12)
    np.testing.assert_allclose(runs["cuda"].params, runs["numpy"].params, rtol=1e-10,
                               atol=1e-12)
    assert not np.allclose(runs["numpy"].params, nn.mlp(SIZES, seed=3).params)  # it trained


def test_a_training_step_leaves_only_the_batch_in_and_the_loss_out(digits):
    X, y = digits[0][:8], digits[1][:8]
    model = nn.mlp(SIZES, seed=0, device="cuda")
    reference = nn.mlp(SIZES, seed=0)
    np.testing.assert_array_equal(kernels.to_host(model.params), reference.params)
    assert kernels.is_device_array(model.params) and kernels.is_device_array(model.grads)
    opt = optim.SGD(model.params, lr=0.1, momentum=0.9)
    assert kernels.is_device_array(opt.state["velocity"])
    cuda_ops.reset_transfers()
    loss = model.loss_and_grad(X, y)
    opt.step(model.grads)
    # in: the batch (X and the labels); out: one number, the loss
    assert cuda_ops.transfers["to_device"] == 2 and cuda_ops.transfers["to_host"] == 1
    assert cuda_ops.transfers["bytes"] == X.nbytes + y.nbytes + 8
    assert loss == pytest.approx(reference.loss_and_grad(X, y), rel=1e-12)
    np.testing.assert_allclose(kernels.to_host(model.grads), reference.grads, rtol=1e-10,
                               atol=1e-13)


def test_use_cuda_makes_models_live_there_and_back(digits):
    X, y = digits
    previous = kernels.use("cuda")
    try:
        model = nn.logistic_regression(64, 10, seed=0)
        assert model.device == "cuda" and kernels.is_device_array(model.params)
    finally:
        kernels.use(previous)
    host = nn.logistic_regression(64, 10, seed=0)
    assert host.device == "numpy" and isinstance(host.params, np.ndarray)
    model.params = host.params + 1.0  # the setter copies host values onto the device
    host.params = model.params        # and device values back
    np.testing.assert_array_equal(host.params, kernels.to_host(model.params))
    assert model.accuracy(X, y) == host.accuracy(X, y)
    with pytest.raises(ValueError, match=r"params must have shape \(650,\), got \(3,\)"):
        model.params = np.ones(3)


def test_regression_and_optimizer_state_on_cuda():
    X, w = np.random.default_rng(0).normal(size=(20, 3)), np.array([1.0, -2.0, 0.5])
    models = [nn.linear_regression(3, seed=0, device=d) for d in ("numpy", "cuda")]
    opts = [optim.Adam(m.params, lr=0.1) for m in models]
    for model, opt in zip(models, opts, strict=True):
        for _ in range(3):
            model.loss_and_grad(X, X @ w)
            opt.step(model.grads)
    np.testing.assert_allclose(kernels.to_host(models[1].params), models[0].params, rtol=1e-12)
    state = opts[1].state_dict()
    assert isinstance(state["m"], np.ndarray)
    np.testing.assert_allclose(state["v"], opts[0].state_dict()["v"], rtol=1e-12)
    opts[1].load_state_dict(opts[0].state_dict())
    np.testing.assert_array_equal(kernels.to_host(opts[1].state["m"]), opts[0].state["m"])
