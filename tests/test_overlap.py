"""DDP-style overlap (data_parallel with overlap=True): each layer-aligned bucket's all-reduce is
launched asynchronously from the backward hook the moment its gradients are written, and waited
for before the optimizer step. References: strategy="single" (float64, 1e-10), the same run
without overlap, the bucket layout of buckets.units, and the events the ranks recorded."""

import functools
import json

import numpy as np
import pytest

from minidist import data, nn, train
from minidist.parallel.buckets import units

X, Y = data.load_digits()
MLP = functools.partial(nn.mlp, [64, 32, 16, 10], seed=0)  # 3 Linear layers: 2080, 528, 170
KWARGS = {"steps": 6, "batch_size": 64, "lr": 0.05}  # 64 rows: uneven for 3 workers
OPTIMIZERS = {"sgd": {"momentum": 0.9}, "adam": {}}


@functools.cache
def single(optimizer):
    return train(MLP, X, Y, optimizer=optimizer, optimizer_options=OPTIMIZERS[optimizer],
                 **KWARGS)


def overlapped(optimizer, **options):
    return train(MLP, X, Y, strategy="data_parallel", overlap=True, optimizer=optimizer,
                 optimizer_options=OPTIMIZERS[optimizer], **KWARGS, **options)


def _relative_gap(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_the_buckets_are_several_units():
    model = MLP()
    assert [(u.first, u.last) for u in units(model, 1)] == [(4, 4), (2, 2), (0, 0)]
    assert [(u.first, u.last) for u in units(model, 8000)] == [(2, 4), (0, 0)]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("accumulate, bucket_bytes", [(1, 1), (2, 8000)])
def test_overlap_equals_single_on_threads(optimizer, workers, accumulate, bucket_bytes):
    hist = overlapped(optimizer, workers=workers, backend="thread", accumulate=accumulate,
                      bucket_bytes=bucket_bytes)
    reference = single(optimizer)
    assert _relative_gap(hist.params, reference.params) < 1e-10
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)


@pytest.mark.parametrize("backend, optimizer, accumulate", [
    ("process", "sgd", 2), ("process", "adam", 1), ("mpi", "adam", 2), ("mpi", "sgd", 1)])
def test_overlap_equals_single_across_processes(backend, optimizer, accumulate):
    hist = overlapped(optimizer, workers=2, backend=backend, accumulate=accumulate,
                      bucket_bytes=1)
    assert _relative_gap(hist.params, single(optimizer).params) < 1e-10
    assert hist.exposed_comm_time.shape == hist.comm_time.shape == (KWARGS["steps"],)


def test_buckets_launch_during_the_backward_in_reverse_layer_order():
    hist = overlapped("sgd", workers=2, backend="thread", accumulate=2, bucket_bytes=1)
    firsts = [u.first for u in units(MLP(), 1)]  # last layer first
    for events, details in zip(hist.events, hist.details, strict=True):
        launches = details["launches"]
        assert len(launches) == KWARGS["steps"] * len(firsts)  # the first micro-batch: no_sync
        for t in range(KWARGS["steps"]):
            mine = [(first, issued) for step, first, issued in launches if step == t]
            assert [first for first, _ in mine] == firsts
            issued = [stamp for _, stamp in mine]
            assert issued == sorted(issued)
            # the last backward of the step: the second micro-batch's, which launched them
            _, start, end, *_ = max((e for e in events if e[0] == "backward" and e[3] == t),
                                    key=lambda e: e[2])
            assert all(start < stamp < end for stamp in issued)
            assert sum(e[0] == "all_reduce" and e[3] == t for e in events) == len(firsts)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_exposed_communication_is_at_most_the_communication(backend):
    """The step waits from its backward's end to its last bucket's finish; an op runs in part
    of that, so exposed ≤ comm + the moments in it when no op ran: before the first op
    started and between two ops (the progress thread's scheduling, visible in the events)."""
    hist = overlapped("sgd", workers=2, backend=backend, bucket_bytes=1)
    assert np.all(hist.exposed_comm_time >= 0) and np.all(hist.comm_time > 0)
    for t in range(KWARGS["steps"]):
        mine = [e for e in hist.events[0] if e[3] == t]
        ended = max(e[2] for e in mine if e[0] == "backward")
        ops = sorted((start, end) for name, start, end, *_ in mine if name == "all_reduce")
        idle = max(0.0, ops[0][0] - ended) + sum(
            max(0.0, start - end) for (_, end), (start, _) in zip(ops, ops[1:], strict=False))
        assert hist.exposed_comm_time[t] <= hist.comm_time[t] + idle + 1e-9
        np.testing.assert_allclose(hist.comm_time[t], sum(b - a for a, b in ops), rtol=1e-12)


@pytest.mark.parametrize("strategy", ["data_parallel", "distributed_gd"])
def test_a_run_that_only_blocks_is_all_exposed(strategy):
    hist = train(MLP, X, Y, strategy=strategy, workers=2, backend="thread", **KWARGS)
    np.testing.assert_array_equal(hist.exposed_comm_time, hist.comm_time)
    assert np.all(hist.comm_time > 0)
    np.testing.assert_array_equal(single("sgd").exposed_comm_time, np.zeros(KWARGS["steps"]))


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_16_bit_overlap_equals_16_bit_data_parallel(half):
    mlp32 = functools.partial(nn.mlp, [64, 32, 16, 10], seed=0, dtype=np.float32)
    X32 = X.astype(np.float32)
    runs = [train(mlp32, X32, Y, strategy="data_parallel", workers=2, backend="thread",
                  precision=half, overlap=overlap, bucket_bytes=2000, **KWARGS)
            for overlap in (False, True)]
    np.testing.assert_array_equal(runs[0].params, runs[1].params)  # a + b in either bucketing
    assert runs[0].bytes_sent == runs[1].bytes_sent
    np.testing.assert_array_equal(runs[0].skipped_steps, runs[1].skipped_steps)


@pytest.mark.parametrize("options, error, match", [
    ({"compression": "topk"}, ValueError, "overlap=True .* compression .*'topk'"),
    ({"local_steps": 2}, ValueError, r"overlap=True .* local_steps > 1 \(got 2\)"),
    ({"overlap": "yes"}, TypeError, "overlap"),
])
def test_overlap_refuses_what_it_cannot_do(options, error, match):
    with pytest.raises(error, match=match):
        train(MLP, X, Y, strategy="data_parallel", workers=2, backend="thread",
              **{"overlap": True, **options}, **KWARGS)


def test_the_hooks_are_gone_after_the_run():
    made = []

    def model_fn():
        made.append(MLP())
        return made[-1]

    train(model_fn, X, Y, strategy="data_parallel", workers=2, backend="thread", overlap=True,
          **KWARGS)
    assert len(made) >= 2 and all(model.hooks is None for model in made)


def test_the_timeline_draws_communication_beneath_the_compute(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    hist = overlapped("sgd", workers=2, backend="thread", bucket_bytes=1)
    ax = hist.timeline(steps=[1])
    drawn = [e for events in hist.events for e in events if e[3] == 1]
    rows = [rank for rank, events in enumerate(hist.events) for e in events if e[3] == 1]
    assert len(ax.patches) == len(drawn)
    for (name, *_), rank, patch in zip(drawn, rows, ax.patches, strict=True):
        low, high = patch.get_y(), patch.get_y() + patch.get_height()  # the y axis points down
        if name == "all_reduce":
            assert rank + 0.15 < low < high <= rank + 0.5
        else:
            assert rank - 0.5 <= low < high < rank + 0.17
    assert "all_reduce" in [t.get_text() for t in ax.get_legend().get_texts()]
    doc = json.loads(hist.save_trace(tmp_path / "trace.json").read_text())
    for event in doc["traceEvents"]:
        if event["ph"] == "X":  # communication on its own row per rank: tid 2 + rank
            assert (event["tid"] >= 2) == (event["name"] == "all_reduce")
