import functools
import re

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
    ({"strategy": "magic"}, "unknown strategy .magic.*single, distributed_gd, data_parallel"),
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


def test_divergence_names_the_step_it_happened_at(problem):
    model_fn, X, y = problem
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match=r"at step (\d+)") as failure:
            train(model_fn, 30 * X, y, steps=60, lr=50.0)
        step = int(re.search(r"at step (\d+)", str(failure.value)).group(1))
        assert step > 0, "the blow-up of this run starts after a few finite steps"
        finite = train(model_fn, 30 * X, y, steps=step, lr=50.0)  # the steps before it
    assert np.all(np.isfinite(finite.loss))


def test_history_plot_draws_the_loss(problem):
    import matplotlib

    matplotlib.use("Agg")
    model_fn, X, y = problem
    hist = train(model_fn, X, y, steps=4)
    ax = hist.plot()
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), hist.loss)


def _relative_gap(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("backend", ["thread", "process", "mpi"])
@pytest.mark.parametrize("strategy", ["distributed_gd", "data_parallel"])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_synchronous_strategies_reproduce_single(digits_reference, strategy, workers, backend):
    model_fn, X, y, kwargs, reference = digits_reference
    hist = train(model_fn, X, y, strategy=strategy, workers=workers, backend=backend, **kwargs)
    assert _relative_gap(hist.params, reference.params) < 1e-10  # 64 rows: uneven for 3 and 8
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
    assert len(hist.bytes_sent) == workers
    assert (min(hist.bytes_sent) > 0) == (workers > 1)
    assert hist.step_time.shape == hist.compute_time.shape == hist.comm_time.shape == (50,)
    assert np.all(hist.step_time >= hist.compute_time)


@pytest.mark.parametrize("options", [
    {"accumulate": 3}, {"bucket_bytes": 1000}, {"algorithm": "naive"}, {"algorithm": "tree"},
    {"algorithm": "ring", "bucket_bytes": 4096}, {"algorithm": "recursive_doubling"},
    {"algorithm": "native", "accumulate": 2},
])
def test_data_parallel_options_keep_the_same_sgd(digits_reference, options):
    model_fn, X, y, kwargs, reference = digits_reference
    hist = train(model_fn, X, y, strategy="data_parallel", workers=3, backend="process",
                 **kwargs, **options)
    assert _relative_gap(hist.params, reference.params) < 1e-10
    assert hist.options["bucket_bytes"] == options.get("bucket_bytes", 1 << 20)


def test_buckets_split_the_gradient_message(digits_reference):
    model_fn, X, y, kwargs, _ = digits_reference
    kwargs = {**kwargs, "steps": 2}
    one = train(model_fn, X, y, strategy="data_parallel", workers=2, backend="thread",
                algorithm="ring", **kwargs)
    many = train(model_fn, X, y, strategy="data_parallel", workers=2, backend="thread",
                 algorithm="ring", bucket_bytes=8 * 1000, **kwargs)
    np.testing.assert_array_equal(one.params, many.params)
    assert one.bytes_sent == many.bytes_sent  # the same bytes, in more messages


@pytest.mark.parametrize("options, match", [
    ({"bucket_bytes": 0}, "bucket_bytes"), ({"accumulate": 0}, "accumulate"),
    ({"algorithm": "gossip"}, "all-reduce algorithm 'gossip'"),
    ({"momentum": 0.9}, r"does not take \['momentum'\]; its options: bucket_bytes"),
])
def test_data_parallel_rejects_bad_options(problem, options, match):
    model_fn, X, y = problem
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, y, strategy="data_parallel", workers=2, backend="thread", **options)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_divergence_is_reported_by_distributed_strategies(problem):
    model_fn, X, y = problem
    with pytest.raises(ValueError, match="the loss became (inf|nan) at step"):
        train(model_fn, 1e3 * X, y, strategy="data_parallel", workers=2, backend="thread",
              steps=50, lr=1e6)
