import functools

import numpy as np
import pytest

from minidist import data, nn, optim, train


@pytest.fixture
def problem():
    X, y = data.make_classification(200, 5, 3, seed=0)
    return functools.partial(nn.mlp, [5, 8, 3], seed=1), X, y


def test_single_equals_a_hand_written_loop(problem):
    model_fn, X, y = problem
    hist = train(model_fn, X, y, steps=25, batch_size=32, lr=0.2, seed=3,
                 optimizer_options={"momentum": 0.5})
    model = model_fn()
    opt = optim.SGD(model.params, lr=0.2, momentum=0.5)
    losses = []
    for idx in data.step_batches(len(X), 32, 25, seed=3):
        losses.append(model.loss_and_grad(X[idx], y[idx]))
        opt.step(model.grads)
    np.testing.assert_array_equal(hist.params, model.params)
    np.testing.assert_array_equal(hist.loss, losses)
    assert hist.loss[-1] < hist.loss[0]
    assert hist.step_time.shape == hist.comm_time.shape == (25,)
    assert hist.accuracy(X, y) == model.accuracy(X, y)


def test_adam_and_schedules_through_train(problem):
    model_fn, X, y = problem
    hist = train(model_fn, X, y, steps=5, optimizer="adam", lr=optim.linear_warmup(0.01, 3))
    assert np.all(np.isfinite(hist.params))


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "magic"}, "unknown strategy 'magic'.*single"),
    ({"workers": 0}, "workers"),
    ({"workers": 2}, "workers must be 1"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 500}, "batch_size=500"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"bucket_bytes": 10}, "bucket_bytes"),
])
def test_bad_arguments_are_named(problem, kwargs, match):
    model_fn, X, y = problem
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, y, steps=kwargs.pop("steps", 2), **kwargs)


def test_divergence_is_reported(problem):
    model_fn, X, y = problem
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match="diverged"):
            train(model_fn, 1e3 * X, y, steps=50, lr=1e6)


def test_history_plot_draws_the_loss(problem):
    import matplotlib

    matplotlib.use("Agg")
    model_fn, X, y = problem
    hist = train(model_fn, X, y, steps=4)
    ax = hist.plot()
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), hist.loss)
