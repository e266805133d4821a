import matplotlib
import numpy as np
import pytest

from minidist import widgets

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# α, β given: no ping-pong measurement; a few steps keep every test well under a second
FAST = {"steps": 8, "alpha": 2e-5, "beta": 1e-9}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def result():
    return widgets.data_parallel_experiment(4, batch_size=30, lr=0.1, **FAST)


def test_data_parallel_experiment_shapes(result):
    counts = len(result.workers)
    assert list(result.workers) == [1, 2, 3, 4]
    assert result.loss.shape == (counts, FAST["steps"])
    for name in ("compute_time", "comm_time", "step_time", "speedup", "predicted_time",
                 "predicted_speedup", "comm_share"):
        values = getattr(result, name)
        assert values.shape == (counts,) and np.all(np.isfinite(values)), name
    assert result.grad_bytes == (64 * 128 + 128 + 128 * 10 + 10) * 8
    assert result.settings["batch_size"] == 30 and result.settings["backend"] == "thread"


def test_every_worker_count_computes_the_same_sgd(result):
    # 30 is not divisible by 4: uneven shards are weighted, so the curves still agree
    np.testing.assert_allclose(result.loss, np.broadcast_to(result.loss[0], result.loss.shape),
                               rtol=1e-10, atol=0)


def test_speedups(result):
    assert result.speedup[0] == 1.0 and result.predicted_speedup[0] == 1.0
    assert np.all(result.predicted_speedup <= result.workers + 1e-12)
    assert np.all(result.predicted_speedup > 0) and np.all(result.speedup > 0)


def test_prediction_follows_the_alpha_beta_model():
    # zero communication cost: the prediction is the ideal p (or the number of cores)
    free = widgets.data_parallel_experiment([2, 4], batch_size=16, lr=0.1, steps=3, alpha=0.0,
                                            beta=0.0)
    np.testing.assert_allclose(free.predicted_speedup, [1, 2, 4])
    capped = widgets.data_parallel_experiment([4], batch_size=16, lr=0.1, steps=3, alpha=0.0,
                                              beta=0.0, cores=2)
    np.testing.assert_allclose(capped.predicted_speedup, [1, 2])
    # costly messages: more workers predicted slower; smaller buckets, more messages, slower
    slow = widgets.data_parallel_experiment([2], batch_size=16, lr=0.1, steps=3, alpha=1.0,
                                            beta=0.0)
    assert slow.predicted_speedup[1] < 1
    many = widgets.data_parallel_experiment([2], batch_size=16, lr=0.1, steps=3, alpha=1e-3,
                                            beta=0.0, bucket_bytes=8 * 1000)
    assert many.predicted_time[1] - many.compute_time[0] / 2 == pytest.approx(10 * 2e-3)


def test_plot_data_parallel_has_three_panels(result):
    fig = widgets.plot_data_parallel(result)
    assert len(fig.axes) == 3
    assert len(fig.axes[0].get_lines()) == len(result.workers)


def test_explorer_builds_without_a_display():
    ipywidgets = pytest.importorskip("ipywidgets")
    panel = widgets.data_parallel_explorer(steps=3, alpha=1e-5, beta=1e-9)
    assert isinstance(panel, ipywidgets.VBox)
    sliders = {c.description: c for c in panel.children[0].children}
    assert set(sliders) == {"workers", "global batch", "learning rate"}
    assert (sliders["workers"].min, sliders["workers"].max) == (1, 8)
    assert isinstance(panel.children[1], ipywidgets.Output)
    sliders["workers"].value = 2  # the callback re-runs the experiment; it must not raise


def test_linear_scaling_rule_tracks_the_small_batch_curve():
    runs = widgets.linear_scaling_experiment(base_batch=16, k=4, base_lr=0.05, warmup_steps=5,
                                             samples=4800)
    small, unscaled, scaled = runs
    assert [r.batch_size for r in runs] == [16, 64, 64]
    for run in runs:
        assert run.samples[-1] == 4800 and len(run.loss) == len(run.samples) == len(run.lr)
    assert unscaled.lr.max() == 0.05 and scaled.lr[-1] == pytest.approx(0.2)
    assert scaled.lr[0] < scaled.lr[-1]  # the warm-up starts low
    gap = lambda run: abs(run.final_loss - small.final_loss)  # noqa: E731
    assert gap(scaled) < gap(unscaled)
    fig = widgets.plot_linear_scaling(runs)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) == 3


def test_unresolved_beta_predicts_latency_only_and_says_so(monkeypatch):
    # the thread backend's flat ping-pong (~25 µs from 4 B to 256 KiB, a little noise that
    # does not grow with size): the fit cannot resolve β and returns 0
    def flat_ping_pong(backend, sizes, **_):
        return np.array(sizes), np.linspace(26e-6, 24e-6, len(sizes))

    monkeypatch.setattr(widgets.cost, "measure_ping_pong", flat_ping_pong)
    widgets.measured_alpha_beta.cache_clear()
    try:
        alpha, beta = widgets.measured_alpha_beta("thread")
        result = widgets.data_parallel_experiment([2, 4], batch_size=16, lr=0.1, steps=3)
    finally:
        widgets.measured_alpha_beta.cache_clear()  # later tests measure for real
    assert beta == 0.0 and alpha == pytest.approx(25e-6, rel=0.05)
    assert result.beta == 0.0 and result.bandwidth is None
    assert "unresolved" in result.model_label
    # latency only: the ring's 2(p − 1) messages of α each, on top of C₁ / p
    latency = 2 * (result.workers - 1) * alpha
    np.testing.assert_allclose(result.predicted_time - result.compute_time[0] / result.workers,
                               latency, rtol=1e-12)
    assert np.all(np.isfinite(result.predicted_speedup))
    fig = widgets.plot_data_parallel(result)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert result.model_label in labels


def test_resolved_beta_gives_the_link_bandwidth(result):
    assert result.bandwidth == pytest.approx(1 / FAST["beta"])
    assert result.model_label == "α-β prediction"


def test_measured_alpha_beta_spans_sizes_where_beta_shows():
    assert widgets.PING_PONG_SIZES[0] == 4 and widgets.PING_PONG_SIZES[-1] == 4 * 2**20


@pytest.mark.parametrize("bad", [{"alpha": -1e-6, "beta": 0.0}, {"alpha": 1e-6,
                                                                 "beta": float("nan")}])
def test_negative_or_nan_costs_are_refused(bad):
    name = "alpha" if bad["alpha"] < 0 else "beta"
    with pytest.raises(ValueError, match=name):
        widgets.data_parallel_experiment([2], batch_size=16, lr=0.1, steps=2, **bad)


def _digits_mlp():
    from minidist import nn

    return nn.mlp([64, 128, 10], seed=0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_memory_is_what_rank_0_holds(stage):
    # 3 ranks: Ψ = 9610 and its units (8320 and 1290 elements) are not multiples of 3 (padding),
    # and a batch of 31 gives rank 0 the extra row
    from minidist import data, train

    X, y = data.load_digits()
    held = widgets.zero_memory(_digits_mlp, X, y, 3, 31)
    options = {"strategy": "data_parallel"} if stage == 0 else {"strategy": "zero",
                                                                "stage": stage}
    run = train(_digits_mlp, X, y, workers=3, backend="thread", steps=1, batch_size=31,
                optimizer="adam", bucket_bytes=1, **options)
    assert held.per_rank[stage] == {k: run.memory[0][k] for k in held.per_rank[stage]}
    assert held.bytes_per_param == (8, 8, 16) and held.num_params == 9610


@pytest.mark.parametrize("bad, error, words", [({"workers": 0}, ValueError, "workers"),
                                               ({"workers": 2.5}, TypeError, "workers"),
                                               ({"batch_size": 2}, ValueError, "batch_size"),
                                               ({"optimizer": "lion"}, ValueError, "optimizer")])
def test_zero_memory_refuses_bad_input(bad, error, words):
    from minidist import data

    X, y = data.load_digits()
    args = {"workers": 4, "batch_size": 8, **bad}
    with pytest.raises(error, match=words):
        widgets.zero_memory(_digits_mlp, X, y, **args)


def test_plot_zero_stages_fills_what_each_rank_holds():
    from minidist import viz

    n, per = 4, (4, 4, 8)
    held = {s: {"params": 1, "grads": 1, "optimizer": 1, "activations": 1} for s in range(4)}
    fig = viz.plot_zero_stages(n, per, per_rank=held, stage=2, budget=3)
    assert len(fig.axes) == 5
    # ZeRO's paper per rank: 16, 4 + 4 + 8/N, 4 + 12/N, 16/N bytes per parameter
    for ax, want in zip(fig.axes[:4], [16, 10, 7, 4], strict=True):
        filled = [p for p in ax.patches if p.get_alpha() in (0.3, 1.0)]
        assert len(filled) == 3 * n
        for r in range(n):
            row = [p for p in filled if p.get_y() == pytest.approx(r - 0.4)]
            assert sum(p.get_width() for p in row) == pytest.approx(want)
    with pytest.raises(ValueError, match="bytes_per_param"):
        viz.plot_zero_stages(2, (4, 4))


def test_zero_memory_explorer_builds_without_a_display():
    ipywidgets = pytest.importorskip("ipywidgets")
    panel = widgets.zero_memory_explorer(batch_size=16)
    assert isinstance(panel, ipywidgets.VBox)
    sliders = {c.description: c for c in panel.children[0].children}
    assert set(sliders) == {"ZeRO stage", "workers N"}
    assert (sliders["ZeRO stage"].min, sliders["ZeRO stage"].max) == (0, 3)
    sliders["workers N"].value = 3  # the callback redraws; it must not raise
    sliders["ZeRO stage"].value = 1
