import functools
import json

import numpy as np
import pytest

from minidist import data, nn, train
from minidist.parallel.pipeline import simulate
from minidist.trace import Trace, bubble_fraction, chrome_trace, seconds_by_kind


def test_idle_fills_the_gaps_within_a_step():
    trace = Trace()
    trace.add("forward", 1.0, 2.0)
    trace.add("all_reduce", 1.5, 1.8)  # nested in the forward: no gap
    trace.add("backward", 3.0, 5.0)
    trace.step = 1
    trace.add("forward", 7.0, 8.0)  # a new step: the time between steps is not idle
    events = trace.with_idle()
    assert [(e[0], e[1], e[2], e[3]) for e in events] == [
        ("forward", 1.0, 2.0, 0), ("all_reduce", 1.5, 1.8, 0), ("idle", 2.0, 3.0, 0),
        ("backward", 3.0, 5.0, 0), ("forward", 7.0, 8.0, 1)]
    assert seconds_by_kind(events)["idle"] == 1.0
    assert Trace(enabled=False).timed("forward", max, 1, 2) == 2


def test_chrome_trace_has_one_complete_event_per_span():
    events = simulate("1f1b", 2, 3, forward=1e-3, backward=2e-3)
    doc = json.loads(json.dumps(chrome_trace(events)))
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 2 * 2 * 3
    assert {e["tid"] for e in spans} == {0, 1}
    first = min(spans, key=lambda e: e["ts"])
    assert first["ts"] == 0 and first["dur"] == pytest.approx(1000)  # microseconds
    assert first["args"] == {"step": 0, "micro_batch": 0}
    names = [e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"]
    assert names == ["rank 0", "rank 1"]


def test_bubble_fraction_of_a_hand_made_timeline():
    # rank 0 busy 0-1 and 3-4, rank 1 busy 1-3: span 4, busy 2 each -> bubble 1/2
    events = [[("forward", 0, 1, 0, 0), ("backward", 3, 4, 0, 0)],
              [("forward", 1, 2, 0, 0), ("recv", 2, 2.5, 0, 0), ("backward", 2, 3, 0, 0)]]
    np.testing.assert_allclose(bubble_fraction(events), [0.5])


@pytest.fixture(scope="module")
def problem():
    X, y = data.make_classification(120, 6, 3, seed=0)
    return functools.partial(nn.mlp, [6, 8, 3], seed=1), X, y


@pytest.mark.parametrize("strategy, options", [
    ("data_parallel", {}), ("distributed_gd", {}), ("tensor_parallel", {}),
    ("pipeline", {"micro_batches": 2}), ("hybrid", {"dp": 1, "tp": 2})])
def test_every_strategy_records_a_timeline(problem, strategy, options, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model_fn, X, y = problem
    hist = train(model_fn, X, y, strategy=strategy, workers=2, backend="thread", steps=3,
                 batch_size=16, **options)
    assert len(hist.events) == 2
    for events in hist.events:
        names = {e[0] for e in events}
        assert {"forward", "backward"} <= names
        assert names & {"all_reduce", "send", "recv"}
        assert all(end >= start for _, start, end, *_ in events)
        assert {e[3] for e in events} == {0, 1, 2}
    doc = json.loads(hist.save_trace(tmp_path / "traces" / "trace.json").read_text())
    assert sum(e["ph"] == "X" for e in doc["traceEvents"]) == sum(map(len, hist.events))
    ax = hist.timeline(steps=[1])
    assert len(ax.patches) == sum(e[3] == 1 for events in hist.events for e in events)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]


def test_plot_schedules_titles_carry_the_measured_bubble():
    import matplotlib

    matplotlib.use("Agg")
    from minidist import viz

    fig = viz.plot_schedules(3, 5)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["GPipe: bubble 0.286 (formula 0.286)",
                          "1F1B: bubble 0.286 (formula 0.286)"]
    held = [patch.get_width() for patch in fig.axes[2].patches]
    assert held == [5, 5, 5, 3, 2, 1]  # GPipe keeps m; 1F1B keeps p − s


def test_pipeline_explorer_is_a_panel_of_two_sliders():
    pytest.importorskip("ipywidgets")
    from minidist import widgets

    panel = widgets.pipeline_explorer()
    sliders = panel.children[0].children
    assert [s.description for s in sliders] == ["stages p", "micro-batches m"]
