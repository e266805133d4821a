"""ZeRO's memory formulas (minidist.zero_memory, re-exported by minidist.memory): the paper's
arithmetic, minidist's padded shards, and the peak with the transient buffers, checked against
numbers counted by hand and against the peaks each rank's ledger measures in train(); and that
ledger against the arrays a rank's frames reach, walked at every hook and collective."""

import functools
import itertools
import sys

import numpy as np
import pytest

from minidist import data, memory, nn, train
from minidist.nn import UnitHooks
from minidist.nn.layers import drop_activations
from minidist.parallel import fsdp, zero
from minidist.parallel.buckets import units
from minidist.parallel.job import Clock

X, Y = data.load_digits()
# uneven layers and unit cuts: (sizes, bucket_bytes) -> units of 1 to 4 layers
MODELS = [([64, 29, 11, 10], 4000),        # units: layers 2-4 (450 elements), layer 0 (1885)
          ([64, 23, 41, 7, 10], 1),        # one unit per Linear: 80, 294, 984, 1495
          ([64, 9, 70, 33, 10], 24000),    # layers 4-6 (2683), layers 0-2 (1285)
          ([64, 50, 10], 1 << 20)]         # one unit of 3760
BATCH = 37  # split 37 = 19 + 18, 13 + 12 + 12, 10 + 9 + 9 + 9: ranks hold different activations


def _run(sizes, optimizer="sgd", batch=BATCH, **options):
    kwargs = {"optimizer": "adam", "lr": 0.01} if optimizer == "adam" else {
        "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
    return train(functools.partial(nn.mlp, sizes, seed=0), X, Y, backend="thread", steps=2,
                 batch_size=batch, **options, **kwargs)


def _predicted(sizes, bucket_bytes, stage, workers, rank, optimizer="sgd", overlap=False,
               batch=BATCH):
    """(zero_peak_bytes, zero_moments) of `rank`, its activations by mlp_unit_activations."""
    cut = units(nn.mlp(sizes), bucket_bytes)
    lo, hi = data.shard_bounds(batch, rank, workers)
    act = memory.mlp_unit_activations(hi - lo, sizes, cut)
    unit_sizes = [u.size for u in cut]
    return (memory.zero_peak_bytes(unit_sizes, stage, workers, 8, optimizer, act, overlap),
            memory.zero_moments(unit_sizes, stage, workers, 8, act, overlap))


# ---- the peak against the ledger's measured peak ----------------------------------------------

@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_peak_is_the_measured_peak_of_every_rank(stage, workers, overlap):
    for (sizes, bucket_bytes), optimizer in zip(MODELS, itertools.cycle(["sgd", "adam"])):
        hist = _run(sizes, optimizer, strategy="zero", stage=stage,
                    workers=workers, bucket_bytes=bucket_bytes, overlap=overlap)
        for rank, held in enumerate(hist.memory):
            peak, moments = _predicted(sizes, bucket_bytes, stage, workers, rank, optimizer,
                                       overlap)
            assert held["peak"] == peak, (sizes, rank, moments)
            # an int A (the ledger's "activations") bounds it, at most A above
            bound = memory.zero_peak_bytes(
                [u.size for u in units(nn.mlp(sizes), bucket_bytes)], stage, workers, 8,
                optimizer, held["activations"], overlap)
            assert peak <= bound <= peak + held["activations"]
            if stage == 1 and not overlap:
                assert bound == peak


# the fullest moment is each term in turn (optimizer sgd; rank 0's batch rows: ⌈batch/N⌉)
@pytest.mark.parametrize("model, stage, workers, overlap, batch, fullest", [
    (2, 1, 1, False, 200, "loss"),         # the activations outweigh any buffer
    (3, 1, 2, False, 4, "gather 0"),       # the one unit's gathered rows beside θ's chunks
    (0, 1, 4, False, 4, "reduce 1"),       # unit 1's copy beside the ∇ shard (= "gather 1")
    (1, 1, 1, False, 4, "step"),           # θ's working chunks and the ∇ shard
    (2, 1, 4, True, 100, "backward 0"),    # unit 0's copy in flight beside the activations
    (2, 1, 4, True, 4, "backward 1"),      # every unit's copy in flight at the end
    (1, 1, 2, True, 4, "∇ shard"),         # the ∇ shard made beside units 1-3's copies
    (3, 2, 2, False, 100, "backward 0"),   # the unit's gradient buffer as its backward begins
    (0, 2, 4, False, 100, "backward 1"),   # the largest unit's, beside the batch
    (1, 2, 4, True, 37, "backward 3"),     # ... and units 0-2's still in flight
    (0, 2, 1, False, 4, "gather 1"),       # the largest unit's rows beside θ's chunks
    (1, 3, 1, False, 37, "forward 2"),     # unit 2 gathered, beside its activations
    (3, 3, 3, False, 200, "backward 0"),   # the unit's θ and ∇ as its backward begins
    (0, 3, 4, False, 4, "backward 1"),     # θ and ∇ of the largest unit
    (0, 3, 4, True, 4, "backward 1"),      # ... and unit 0's reduce-scatter in flight
    (1, 3, 1, True, 200, "loss"),          # all activations and unit 0's prefetch
])
def test_each_transient_term_is_the_peak_somewhere(model, stage, workers, overlap, batch,
                                                  fullest):
    sizes, bucket_bytes = MODELS[model]
    hist = _run(sizes, batch=batch, strategy="zero", stage=stage, workers=workers,
                bucket_bytes=bucket_bytes, overlap=overlap)
    peak, moments = _predicted(sizes, bucket_bytes, stage, workers, 0, overlap=overlap,
                               batch=batch)
    assert max(moments, key=moments.get) == fullest, moments
    held = hist.memory[0]
    assert held["peak"] == peak
    state = held["params"] + held["grads"] + held["optimizer"]
    assert (peak > state + held["activations"]) == (fullest != "loss" or stage == 3)


@pytest.mark.parametrize("overlap", [False, True])
def test_stage_0_is_data_parallel_the_state_and_the_activations(overlap):
    sizes = MODELS[1][0]
    hist = _run(sizes, strategy="data_parallel", workers=3, overlap=overlap, bucket_bytes=1)
    psi = nn.mlp(sizes).num_params
    for rank, held in enumerate(hist.memory):
        lo, hi = data.shard_bounds(BATCH, rank, 3)
        assert held["peak"] == memory.zero_peak_bytes(
            [psi], 0, 3, activations=memory.mlp_activation_bytes(hi - lo, sizes),
            overlap=overlap)


# ---- what a rank holds, walked independently of the ledger --------------------------------------

def _held_bytes():
    """Bytes of the arrays that ZeRO's methods on this thread reach now (their locals, through
    minidist objects, lists and dicts; each address range once), but the clock, the layout,
    the batch X, y (the data's) and freed views (one element, strides 0)."""
    spans, seen, todo, frame = [], set(), [], sys._getframe()
    while frame is not None:
        code = frame.f_code  # worker's frame holds the job (the data) and the batch's indices
        if code.co_filename in (zero.__file__, fsdp.__file__) and code.co_name != "worker":
            todo += [v for k, v in frame.f_locals.items() if k not in ("X", "y")]
        frame = frame.f_back
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (Clock, zero.Layout)):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray) and obj.size and 0 not in obj.strides:
            start = obj.__array_interface__["data"][0]
            spans.append((start, start + obj.nbytes))
        elif isinstance(obj, (list, tuple, dict)):
            todo += obj.values() if isinstance(obj, dict) else obj
        elif hasattr(obj, "__dict__") and any(  # not a Work (slots): its result is in flight
                c.__module__.startswith("minidist.") for c in type(obj).__mro__[:-1]):
            todo += [v for k, v in vars(obj).items() if k != "comm"]
    total, end = 0, 0
    for lo, hi in sorted(spans):
        total, end = total + max(0, hi - max(lo, end)), max(end, hi)
    return total


class _Walking(Clock):
    """A Clock that walks what its rank holds (_held_bytes) before each collective it times or
    waits for, and after each hook (_walking); the most into `most`, by rank."""
    most = {}

    def walk(self):
        rank = self.ledger.rank
        self.most[rank] = max(self.most.get(rank, 0), _held_bytes())

    def timed(self, *args, **kwargs):
        self.walk()
        return super().timed(*args, **kwargs)

    def wait(self, work):
        self.walk()
        return super().wait(work)


def _walking(cls):
    hooks = ("before_forward", "after_forward", "before_backward", "after_backward")
    return type(cls.__name__, (cls,), {name: lambda self, i, name=name: (
        getattr(cls, name)(self, i), self.clock.walk()) for name in hooks})


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_ledger_sees_the_most_a_rank_holds(monkeypatch, stage, overlap):
    """Walked at every hook and before every collective, what a rank holds never passes the
    peak its ledger saw (the moments shown come after each buffer is made)."""
    monkeypatch.setattr(zero, "Clock", _Walking)
    monkeypatch.setattr(zero, "Zero", _walking(zero.Zero))
    monkeypatch.setattr(fsdp, "FSDP", _walking(fsdp.FSDP))
    for (sizes, bucket_bytes), workers in zip(MODELS, (2, 1, 3, 4), strict=True):
        _Walking.most.clear()
        hist = _run(sizes, "adam", strategy="zero", stage=stage, workers=workers,
                    bucket_bytes=bucket_bytes, overlap=overlap)
        for rank, held in enumerate(hist.memory):
            state = held["params"] + held["grads"] + held["optimizer"]
            assert state < _Walking.most[rank] <= held["peak"], (sizes, rank)


# ---- the activations at each moment ----------------------------------------------------------

class Watch(UnitHooks):
    """Records the activation bytes after each unit's forward and backward, letting each layer's
    activations go after its backward (as Zero does)."""

    def __init__(self, model, cut):
        self.model, self.parts = model, [*model.layers, model.criterion]
        self.by_first = {u.first: k for k, u in enumerate(cut)}
        self.by_last = {u.last: k for k, u in enumerate(cut)}
        self.forward, self.backward, self.begin = {}, {}, {}

    def after_forward(self, i):
        if i in self.by_last:
            self.forward[self.by_last[i]] = memory.activation_bytes(self.parts)

    def before_backward(self, i):
        if i == len(self.model.layers) - 1:
            drop_activations([self.model.criterion])
        if i in self.by_last:
            self.begin[self.by_last[i]] = memory.activation_bytes(self.parts)

    def after_backward(self, i):
        drop_activations([self.model.layers[i]])
        if i in self.by_first:
            self.backward[self.by_first[i]] = memory.activation_bytes(self.parts)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("sizes, bucket_bytes", [*MODELS, ([64, 10], 1)])
def test_mlp_unit_activations_are_what_the_layers_keep(sizes, bucket_bytes, activation):
    model, n = nn.mlp(sizes, activation=activation), 13
    cut = units(model, bucket_bytes)
    watch = Watch(model, cut)
    with watch.attached(model):
        model.loss(X[:n], Y[:n])
        loss = memory.activation_bytes(watch.parts)
        model.backward()
    got = memory.mlp_unit_activations(n, sizes, cut)
    assert got == (loss, *(tuple(kept[k] for k in range(len(cut)))
                           for kept in (watch.forward, watch.backward, watch.begin)))
    assert got.loss == memory.mlp_activation_bytes(n, sizes, activation)


# ---- the moments by hand ---------------------------------------------------------------------

def test_the_moments_counted_by_hand():
    # units of 10 and 7 elements over N = 3, 8 bytes: c = 4, 3; g = 96, 72; shard s = 56; with
    # overlap, unit 0's reduce-scatter in flight holds its copy and its chunk: 96 + 32 = 128
    act = memory.UnitActivations(loss=100, forward=(30, 80), backward=(10, 0), begin=(40, 20))
    moments = functools.partial(memory.zero_moments, [10, 7], world_size=3, activations=act)
    step = {"step": 112, "gather 0": 56 + 96, "gather 1": 56 + 72}  # θ's chunks, the rows
    assert moments(stage=0) == {"loss": 100}
    assert moments(stage=1) == {"loss": 100, "reduce 0": 96, "reduce 1": 56 + 72,
                                "∇ shard": 56, **step}
    assert moments(stage=1, overlap=True) == {"loss": 100, "backward 0": 10 + 96,
                                              "backward 1": 0 + 72 + 128,
                                              "∇ shard": 56 + 72 + 24, **step}
    step["step"] = 56  # stage 2: the ∇ shard is persistent
    assert moments(stage=2) == {"loss": 100, "backward 0": 40 + 96, "backward 1": 20 + 72,
                                **step}
    assert moments(stage=2, overlap=True) == {"loss": 100, "backward 0": 136,
                                              "backward 1": 20 + 72 + 128, **step}
    assert moments(stage=3) == {"loss": 100, "forward 0": 30 + 96, "forward 1": 80 + 72,
                                "backward 0": 40 + 2 * 96, "backward 1": 20 + 2 * 72,
                                "step": 0}
    assert moments(stage=3, overlap=True) == {
        "loss": 100 + 96, "forward 0": 126, "forward 1": 80 + 72 + 96,
        "backward 0": 40 + 96 + 96 + 72, "backward 1": 20 + 72 + 72 + 128, "step": 0}
    # peak = persistent (zero_state_bytes: 56 + 56 + 2·56 with Adam) + the fullest moment
    assert memory.zero_peak_bytes([10, 7], 3, 3, optimizer="adam", activations=act,
                                  overlap=True) == 4 * 56 + 304
    assert memory.zero_peak_bytes([10, 7], 1, 3, activations=100) == 136 + 136 + 56 + 152


def test_bad_arguments_are_named():
    act = memory.UnitActivations(1, (1,), (1,), (1, 1))
    with pytest.raises(ValueError, match=r"one value per unit \(2\), got 1, 1 and 2"):
        memory.zero_moments([10, 7], 3, 2, activations=act)
    with pytest.raises(TypeError, match="activations must be an integer number of bytes"):
        memory.zero_peak_bytes([10], 3, 2, activations=1.5)
    with pytest.raises(ValueError, match="activations must be an integer >= 0"):
        memory.zero_peak_bytes([10], 3, 2, activations=memory.UnitActivations(-1, (0,), (0,), (0,)))
    with pytest.raises(TypeError, match="overlap must be True or False"):
        memory.zero_peak_bytes([10], 3, 2, overlap="yes")
    with pytest.raises(ValueError, match="stage must be a ZeRO stage"):
        memory.zero_peak_bytes([10], 4, 2)
    with pytest.raises(ValueError, match="unit_list must hold units of this mlp"):
        memory.mlp_unit_activations(4, [6, 5, 3], units(nn.mlp([6, 5, 3, 2]), 1))
    with pytest.raises(ValueError, match="sizes needs an input and an output width"):
        memory.mlp_unit_activations(4, [6], [])


# ---- ZeRO's model states: the paper's arithmetic and minidist's padded shards ---------------

def test_zero_model_state_bytes_is_the_papers_figure_1():
    """Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5 B, N = 64, mixed-precision Adam (K = 12):
    120 GB, 31.4 GB, 16.6 GB and 1.9 GB per device for stages 0, 1, 2, 3."""
    psi, n = 7_500_000_000, 64
    totals = [sum(memory.zero_model_state_bytes(psi, stage, n).values()) for stage in range(4)]
    assert totals == [16 * psi, (4 + 12 / n) * psi, (2 + 14 / n) * psi, 16 * psi / n]
    assert [round(t / 1e9, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]


def test_zero_model_state_bytes_small_exact_cases():
    assert memory.zero_model_state_bytes(12, 0, 4, "fp64", "sgd") == \
        memory.model_state_bytes(12, "fp64", "sgd") == {"params": 96, "grads": 96,
                                                        "optimizer": 96}
    assert memory.zero_model_state_bytes(12, 1, 4, "fp64", "sgd") == {
        "params": 96, "grads": 96, "optimizer": 24}
    assert memory.zero_model_state_bytes(12, 2, 4, "fp32", "adam") == {
        "params": 48, "grads": 12, "optimizer": 24}
    assert memory.zero_model_state_bytes(10, 3, 4) == {"params": 5, "grads": 5,
                                                       "optimizer": 30}  # fp16 Adam: 2, 2, 12
    with pytest.raises(ValueError, match="stage must be a ZeRO stage 0, 1, 2 or 3, got 4"):
        memory.zero_model_state_bytes(10, 4, 2)
    with pytest.raises(TypeError, match="stage must be an integer"):
        memory.zero_model_state_bytes(10, 1.0, 2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        memory.zero_model_state_bytes(10, 1, 0)


def test_zero_state_bytes_pads_each_unit_to_a_multiple_of_n():
    # units of 10 and 7 elements over N = 3: shards of ⌈10/3⌉ + ⌈7/3⌉ = 4 + 3 = 7, Ψ = 17
    assert memory.zero_state_bytes([10, 7], 0, 3) == {"params": 136, "grads": 272,
                                                      "optimizer": 136}
    assert memory.zero_state_bytes([10, 7], 1, 3) == {"params": 136, "grads": 136,
                                                      "optimizer": 56}
    assert memory.zero_state_bytes([10, 7], 2, 3, optimizer="adam") == {
        "params": 136, "grads": 56, "optimizer": 112}
    assert memory.zero_state_bytes([10, 7], 3, 3, itemsize=4) == {"params": 28, "grads": 28,
                                                                  "optimizer": 28}
    psi = 155
    for stage in (1, 2, 3):  # one rank: the unsharded states, as single holds them
        assert memory.zero_state_bytes([psi], stage, 1, optimizer="adam") == \
            memory.model_state_bytes(psi, "fp64", "adam")
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        memory.zero_state_bytes([10], 1, 2, optimizer="lamb")
    with pytest.raises(ValueError, match="unit_sizes must be an integer >= 0"):
        memory.zero_state_bytes([10, -1], 1, 2)
