import itertools

import numpy as np
import pytest

from minidist import nn, train
from minidist.parallel.pipeline import (
    balanced_cuts,
    bubble_formula,
    schedule_ops,
    simulate,
    stage_bounds,
)
from minidist.trace import bubble_fraction

STEPS = 20


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(1, 3), (2, 1), (3, 2), (4, 4), (4, 8), (3, 7)])
def test_schedules_run_every_micro_batch_once_forward_before_backward(schedule, p, m):
    for stage in range(p):
        ops = schedule_ops(schedule, stage, p, m)
        assert sorted(ops) == sorted([("F", j) for j in range(m)] + [("B", j) for j in range(m)])
        assert all(ops.index(("F", j)) < ops.index(("B", j)) for j in range(m))
        held, peak = 0, 0
        for op, _ in ops:
            held += 1 if op == "F" else -1
            peak = max(peak, held)
        assert peak == (m if schedule == "gpipe" else min(p - stage, m))


def test_1f1b_alternates_after_the_warm_up():
    assert schedule_ops("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3),
                                             ("B", 1), ("B", 2), ("B", 3)]
    assert schedule_ops("1f1b", 2, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    with pytest.raises(ValueError, match="unknown schedule 'zb'"):
        schedule_ops("zb", 0, 2, 2)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (3, 5), (4, 8), (4, 1)])
def test_ideal_timeline_has_the_formula_bubble(schedule, p, m):
    events = simulate(schedule, p, m, forward=1.0, backward=2.0)
    assert bubble_fraction(events)[0] == pytest.approx(bubble_formula(p, m), rel=1e-12)
    assert bubble_formula(4, 8) == pytest.approx(3 / 11)
    assert max(e[2] for ev in events for e in ev) == pytest.approx(3 * (m + p - 1))


@pytest.mark.parametrize("counts, stages", [([5, 0, 3, 0, 3, 0, 1], 3), ([1, 1, 1, 1], 4),
                                            ([9, 1, 1, 1, 1, 1], 2), ([2, 7, 1, 8, 2, 8], 3)])
def test_balanced_cuts_minimise_the_largest_stage(counts, stages):
    def largest(cuts):
        edges = [0, *cuts, len(counts)]
        return max(sum(counts[a:b]) for a, b in itertools.pairwise(edges))

    best = min(largest(c) for c in itertools.combinations(range(1, len(counts)), stages - 1))
    cuts = balanced_cuts(counts, stages)
    assert len(cuts) == stages - 1 and largest(cuts) == best


def test_stage_bounds_checks_its_cuts():
    model = nn.mlp([8, 16, 12, 4])  # 5 layers
    assert stage_bounds(model, 2, [3]) == [(0, 3), (3, 5)]
    assert stage_bounds(model, 1) == [(0, 5)]
    for cuts in ([0], [5], [3, 2], [2, 2, 4]):
        with pytest.raises(ValueError, match="cuts must be"):
            stage_bounds(model, 3 if len(cuts) == 2 else 2, cuts)
    with pytest.raises(ValueError, match="cannot cut 5 layers into 6 pipeline stages"):
        stage_bounds(model, 6)


@pytest.fixture(scope="module")
def problem(small_mlp_problem):
    return small_mlp_problem(30, STEPS)


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 2, 4, 8])  # 30 rows: uneven micro-batches for 4 and 8
@pytest.mark.parametrize("p", [2, 3, 4])
def test_pipeline_reproduces_single(problem, p, m, schedule, backend):
    model_fn, X, y, kwargs, reference = problem
    hist = train(model_fn, X, y, strategy="pipeline", workers=p, micro_batches=m,
                 schedule=schedule, backend=backend, **kwargs)
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
    peaks = [d["peak_activations"] for d in hist.details]
    assert peaks == [m if schedule == "gpipe" else min(p - s, m) for s in range(p)]
    assert sum(d["param_bytes"] for d in hist.details) == 8 * model_fn().num_params
    names = {e[0] for e in hist.events[p - 1]}
    assert {"forward", "backward", "recv", "optimizer"} <= names


def test_explicit_cuts_and_adam_keep_the_same_training(problem):
    model_fn, X, y, kwargs, _ = problem
    kwargs = {**kwargs, "optimizer": "adam", "lr": 0.01, "optimizer_options": {}}
    reference = train(model_fn, X, y, **kwargs)
    hist = train(model_fn, X, y, strategy="pipeline", workers=3, cuts=[1, 5], micro_batches=3,
                 backend="thread", **kwargs)
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    assert [d["layers"] for d in hist.details] == [(0, 1), (1, 5), (5, 7)]


@pytest.mark.parametrize("options, match", [
    ({"workers": 8}, "cannot cut 7 layers into 8 pipeline stages"),
    ({"workers": 2, "micro_batches": 0}, "micro_batches must be an integer >= 1"),
    ({"workers": 2, "schedule": "zb"}, "unknown schedule 'zb'"),
    ({"workers": 2, "cuts": [9]}, r"cuts must be 1 increasing layer indices in \(0, 7\)"),
    ({"workers": 2, "micro_batches": 40}, "batch_size=30 cannot give dp=1 replicas 40 micro"),
])
def test_bad_pipeline_jobs_are_named(problem, options, match):
    model_fn, X, y, kwargs, _ = problem
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, y, strategy="pipeline", backend="thread", steps=1, batch_size=30,
              **options)


def test_a_deadlocked_timeline_says_who_waits_for_what(monkeypatch):
    from minidist.parallel import pipeline

    monkeypatch.setattr(pipeline, "schedule_ops", lambda *args: [("B", 0), ("F", 0)])
    with pytest.raises(RuntimeError, match=r"schedule '1f1b' deadlocks with 1 stages: stage 0 "
                       r"waits at its op 0, \('B', 0, 0\), for the forward of micro-batch 0 "
                       r"through global chunk 0"):
        pipeline.simulate("1f1b", 1, 1)
