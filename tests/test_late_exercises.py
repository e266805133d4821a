"""Lessons 9, 10 and 11's checkers pass the reference solutions, explain typical mistakes, and
put the learner's piece inside a real run (the library's hooks are restored after)."""

import functools

import numpy as np
import pytest

from minidist import data, exercises, nn, train
from minidist.exercises import catalog
from minidist.exercises import planning as layout_checker
from minidist.exercises import transformers as transformer_checkers
from minidist.exercises.solutions import planning as planning_solutions
from minidist.exercises.solutions import sharding as sharding_solutions
from minidist.exercises.solutions import transformers as transformer_solutions
from minidist.nn.attention import CausalSelfAttention
from minidist.nn.gpt_layers import LayerNorm
from minidist.parallel.hybrid import Topology


@pytest.mark.parametrize("lesson", [9, 10, 11])
def test_every_exercise_passes_its_reference_solution(lesson):
    checks = catalog.grade(lesson, catalog.solutions(lesson))
    assert len(checks) == 2 and all(checks), checks
    kinds = [exercise.kind for exercise in catalog.exercises(lesson)]
    assert kinds.count("formula") <= 1 and "build" in kinds


# ----- lesson 9: model states (a formula) and the rank layout (a build) ----------------------

def test_model_states_checker():
    assert exercises.check_model_states(planning_solutions.model_states)
    cases = {
        "dp does not divide": lambda psi, dp, tp, pp: 16 * psi / (dp * tp * pp),
        "divide by tp·pp": lambda psi, dp, tp, pp: 16 * psi,
        "divide by pp too": lambda psi, dp, tp, pp: 16 * psi / tp,
        "divide by tp too": lambda psi, dp, tp, pp: 16 * psi / pp,
        "add the optimizer": lambda psi, dp, tp, pp: 4 * psi / (tp * pp),
        "2 + 2 + 12 = 16": lambda psi, dp, tp, pp: 2 * psi / (tp * pp),
        "add 2 bytes of fp16": lambda psi, dp, tp, pp: 12 * psi / (tp * pp),
        "expected 1.6e+10 bytes": lambda psi, dp, tp, pp: 8 * psi,
        "raised TypeError": lambda psi, dp, tp, pp: None + 1,
        "return a number of bytes, not a str": lambda psi, dp, tp, pp: str(16 * psi / (tp * pp)),
    }
    for hint, fn in cases.items():
        result = exercises.check_model_states(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def dp_fastest(rank, dp, tp, pp):
    """A bijection, but the replica varies fastest: tensor-parallel peers lie dp ranks apart."""
    rest, d = divmod(rank, dp)
    k, s = divmod(rest, pp)
    return {"dp": d, "tp": k, "pp": s}


def wrong_stride(rank, dp, tp, pp):
    """The stage taken as rank // pp instead of rank // tp: right when tp = pp only."""
    return {"dp": rank // (tp * pp), "tp": rank % tp, "pp": rank // pp % pp}


def megatron_order(rank, dp, tp, pp):
    """Megatron-LM's order: tensor part fastest, then the replica, then the stage."""
    rest, k = divmod(rank, tp)
    s, d = divmod(rest, dp)
    return {"dp": d, "tp": k, "pp": s}


def test_rank_layout_checker_passes_the_solution_which_is_topologys_layout():
    check = exercises.check_rank_layout(planning_solutions.coords)
    assert check and "2×2×2, 1×4×2, 4×2×1, 2×1×4" in check.message, check
    for grid in ((2, 2, 2), (3, 2, 4), (1, 5, 1), (4, 1, 3), (2, 3, 1)):
        topology = Topology(*grid)
        for rank in range(topology.world_size):
            assert planning_solutions.coords(rank, *grid) == topology.coords(rank)
    assert "differs" not in check.message
    other = exercises.check_rank_layout(megatron_order)  # tp consecutive: a layout that works
    assert other and "(on 2×2×2 your numbering differs from minidist's Topology's, which " \
        "works too)" in other.message, other


@pytest.mark.parametrize("answer, words", [
    (dp_fastest, "with dp×tp×pp = 2×2×2, rank 0's tensor-parallel group is ranks [0, 4]. The "
                 "runs train as one process does, but a launcher places consecutive ranks on "
                 "the same server"),
    (wrong_stride, "with dp×tp×pp = 1×4×2, ranks 0 and 4 both get (dp = 0, tp = 0, pp = 0): "
                   "two ranks would hold the same part of the model"),
    (lambda rank, dp, tp, pp: (0, 0, 0), "with dp×tp×pp = 2×2×2, rank 0: return a dict of "
                                         "integers with the keys dp, tp and pp, got tuple"),
    (lambda rank, dp, tp, pp: {"dp": 0, "tp": rank, "pp": 0},
     "with dp×tp×pp = 2×2×2, rank 2: tp = 2 is out of range: 0…1"),
    (lambda rank, dp, tp, pp: {a: float(v) for a, v in planning_solutions.coords(
        rank, dp, tp, pp).items()},
     "with dp×tp×pp = 2×2×2, rank 0: coordinates are integers, got dp = 0.0 (float), "
     "tp = 0.0 (float), pp = 0.0 (float)"),
], ids=["dp-fastest", "wrong-stride", "tuple", "out-of-range", "floats"])
def test_rank_layout_checker_names_the_mistake(answer, words):
    check = exercises.check_rank_layout(answer)
    assert not check and words in check.message, check


def test_the_layout_hook_drives_the_real_run_and_is_restored():
    """Inside the hook a hybrid run places every rank where the learner's function says (its
    History's details), and trains as one process; Topology is the library's again after, also
    when the learner's function fails during the run."""
    saved = {name: Topology.__dict__[name] for name in ("coords", "rank")}
    X, y = data.make_classification(64, 8, 4, seed=0)
    model_fn = functools.partial(nn.mlp, layout_checker.MLP_SIZES, seed=0)
    single = train(model_fn, X, y, **layout_checker.RUN)
    with layout_checker.rank_layout(megatron_order):
        hist = train(model_fn, X, y, strategy="hybrid", workers=8, dp=2, tp=2, pp=2,
                     micro_batches=2, backend="thread", timeout=30, **layout_checker.RUN)
    for rank, details in enumerate(hist.details):
        assert {a: details[a] for a in ("dp", "tp", "pp")} == megatron_order(rank, 2, 2, 2)
    assert np.allclose(hist.params, single.params, rtol=0, atol=1e-10)
    assert all(Topology.__dict__[name] is f for name, f in saved.items())

    calls = []

    def fails_in_the_run(rank, dp, tp, pp):  # right when the checker asks, then raises
        calls.append(rank)
        if len(calls) > layout_checker.WORLD:
            raise RuntimeError("lost my place")
        return planning_solutions.coords(rank, dp, tp, pp)

    check = exercises.check_rank_layout(fails_in_the_run, grids=[(2, 2, 2)])
    assert not check and "driving a real hybrid run on 8 thread ranks, a rank raised " \
        "RuntimeError" in check.message and "lost my place" in check.message, check
    assert all(Topology.__dict__[name] is f for name, f in saved.items())


def test_a_layout_that_calls_topologys_own_coords_is_told_so():
    """Inside the check Topology.coords is the learner's function: delegating to it would
    recurse; the checker says so, and Topology is the library's again after."""
    saved = {name: Topology.__dict__[name] for name in ("coords", "rank")}
    check = exercises.check_rank_layout(lambda rank, dp, tp, pp: Topology(dp, tp, pp).coords(rank))
    assert not check and "your function calls Topology's own coords, which the check replaces " \
        "with yours" in check.message, check
    assert all(Topology.__dict__[name] is f for name, f in saved.items())


@pytest.mark.parametrize("bad", [{"grids": [(2, 2, 1)]}, {"grids": []}, {"grids": [(8, 1)]},
                                 {"timeout": 0}])
def test_rank_layout_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="grids|timeout"):
        exercises.check_rank_layout(planning_solutions.coords, **bad)


# ----- lesson 10: causal attention and LayerNorm's backward, inside a GPT -------------------

def causal_attention(q, k, v, scale=None, hide=1, axis=-1):
    """softmax(q kᵀ·scale + M) v with M = −∞ on np.triu(·, k=hide) (hide=None: no mask;
    hide=-1 with np.tril: the wrong side); the softmax over `axis`."""
    T = q.shape[-2]
    s = q @ k.swapaxes(-1, -2) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if hide is not None:
        hidden = np.triu(np.ones((T, T), bool), k=hide) if hide > 0 else np.tril(
            np.ones((T, T), bool), k=hide)
        s = np.where(hidden, -np.inf, s)
    p = np.exp(s - s.max(axis=axis, keepdims=True))
    return p / p.sum(axis=axis, keepdims=True) @ v


def test_causal_attention_checker():
    right = exercises.check_causal_attention(transformer_solutions.causal_attention)
    assert right and "trains on 2 data-parallel ranks as one process" in right.message, right
    assert exercises.check_causal_attention(causal_attention)

    def zeroed_after(q, k, v):  # the mask applied to the weights after the softmax
        s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        return np.tril(p / p.sum(axis=-1, keepdims=True)) @ v

    def not_implemented(q, k, v):
        raise NotImplementedError("your code here")

    def weights(q, k, v):
        T = q.shape[-2]
        s = q @ k.swapaxes(-1, -2) + np.where(np.triu(np.ones((T, T)), 1), -np.inf, 0)
        return np.exp(s) / np.exp(s).sum(axis=-1, keepdims=True)

    def scaled_in_place(q, k, v):
        q /= np.sqrt(q.shape[-1])
        return causal_attention(q, k, v, scale=1.0)

    cases = {
        "position t also sees the later positions s > t": lambda q, k, v: causal_attention(
            q, k, v, hide=None),
        "the scores are not scaled: divide q kᵀ by √d_head = √4": lambda q, k, v:
            causal_attention(q, k, v, scale=1.0),
        "wrong side": lambda q, k, v: causal_attention(q, k, v, hide=-1),
        "not 1/d_head": lambda q, k, v: causal_attention(q, k, v, scale=1 / q.shape[-1]),
        "wrong axis": lambda q, k, v: causal_attention(q, k, v, axis=-2),
        "BEFORE the softmax": zeroed_after,
        "the attention weights P": weights,
        "heads on axis 1": lambda q, k, v: causal_attention(q, k, v).transpose(0, 2, 1, 3),
        "NaN": lambda q, k, v: causal_attention(q, k, v, hide=0),  # the diagonal hidden too
        "off by one: position t also sees s = t + 1": lambda q, k, v: causal_attention(
            q, k, v, hide=2),
        "differs from CausalSelfAttention": lambda q, k, v: causal_attention(q, k, v) + 1e-3,
        "your function changed q in place": scaled_in_place,
        "raised NotImplementedError": not_implemented,
    }
    with np.errstate(invalid="ignore"):
        for hint, fn in cases.items():
            result = exercises.check_causal_attention(fn)
            assert not result and hint in result.message and "✘" in repr(result), (hint, result)
            assert "with q, k, v of shape (2, 3, 5, 4) (N, H, T, d_head)" in result.message \
                or "raised" in result.message


def test_causal_attention_runs_inside_a_data_parallel_gpt_and_is_restored():
    """The run calls the learner's function once per block, rank and step, on each rank's
    half of the batch; a function that goes wrong only there is caught by the run's loss."""
    saved = CausalSelfAttention.__dict__["attend"]
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return causal_attention(q, k, v)

    assert exercises.check_causal_attention(spy)
    steps, batch = transformer_checkers.GPT_RUN["steps"], transformer_checkers.GPT_RUN[
        "batch_size"]
    run = calls[len(transformer_checkers.ATTENTION_CASES):]
    T = transformer_checkers.CONTEXT
    assert run[:2] == [(1, 4, T, 4)] * 2  # train's check of the output's shape, on one row
    assert run[2:] == [(batch // 2, 4, T, 4)] * (steps * 2 * 2)  # steps × ranks × blocks
    assert CausalSelfAttention.__dict__["attend"] is saved

    def stateful(q, k, v):  # right on the direct problems, then wrong inside the model
        calls.append(q.shape)
        return causal_attention(q, k, v) * (1.0 if len(calls) <= 3 else 1.5)

    calls.clear()
    result = exercises.check_causal_attention(stateful)
    assert not result and "right on the random problems, but in a GPT trained on 2 " \
        "data-parallel thread ranks with your attention in its 2 blocks, the run's loss " \
        "differs from single at step 0" in result.message, result
    assert CausalSelfAttention.__dict__["attend"] is saved

    def raises_in_the_run(q, k, v):
        if q.shape[0] == 4:  # a rank's half of the batch of 8
            raise RuntimeError("out of heads")
        return causal_attention(q, k, v)

    result = exercises.check_causal_attention(raises_in_the_run)
    assert not result and "2 blocks, a rank raised RuntimeError" in result.message \
        and "out of heads" in result.message and "keep state" not in result.message, result
    assert CausalSelfAttention.__dict__["attend"] is saved


def layernorm_backward(dy, x, gamma, eps=1e-5, mean_path=True, variance_path=True):
    centred = x - x.mean(axis=-1, keepdims=True)
    inv = 1 / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    x_hat, g = centred * inv, gamma * dy
    dx = g - (g.mean(axis=-1, keepdims=True) if mean_path else 0)
    dx = inv * (dx - (x_hat * (g * x_hat).mean(axis=-1, keepdims=True) if variance_path else 0))
    d = x.shape[-1]
    return dx, (dy * x_hat).reshape(-1, d).sum(axis=0), dy.reshape(-1, d).sum(axis=0)


def test_layernorm_backward_checker():
    right = exercises.check_layernorm_backward(transformer_solutions.layernorm_backward)
    assert right and "every LayerNorm trains on 2 data-parallel ranks" in right.message, right
    assert exercises.check_layernorm_backward(layernorm_backward)

    def replace(i, make):
        def fn(dy, x, gamma, eps=1e-5):
            grads = list(layernorm_backward(dy, x, gamma, eps))
            x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
            grads[i] = make(dy, x_hat, grads)
            return tuple(grads)
        return fn

    cases = {
        "with x of shape (5, 5) and eps = 1e-05, dx misses the mean's path": lambda dy, x, g,
            eps=1e-5: layernorm_backward(dy, x, g, eps, mean_path=False),
        "with x of shape (5, 5) and eps = 1e-05, dgamma is Σ ∂y, which is dbeta": replace(
            1, lambda dy, x_hat, grads: grads[2]),
        "variance's path": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g, eps,
                                                                        variance_path=False),
        "treats μ and σ as constants": lambda dy, x, g, eps=1e-5: layernorm_backward(
            dy, x, g, eps, mean_path=False, variance_path=False),
        "multiply ∂y by γ": lambda dy, x, g, eps=1e-5: layernorm_backward(
            dy, x, np.ones_like(g), eps)[:1] + layernorm_backward(dy, x, g, eps)[1:],
        "use the eps you are given": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g),
        "dgamma is summed over the wrong axis": replace(1, lambda dy, x_hat, grads: (
            dy * x_hat).sum(axis=-1)),
        "dgamma should have shape (4,), got (3, 4)": replace(1, lambda dy, x_hat, grads: (
            dy * x_hat).sum(axis=0)),
        "dbeta is Σ ∂y ⊙ x̂": replace(2, lambda dy, x_hat, grads: grads[1]),
        "dbeta differs from finite differences": replace(2, lambda dy, x_hat, grads: 2 * grads[2]),
        "three arrays": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g, eps)[:2],
        "raised ZeroDivisionError": lambda dy, x, g, eps=1e-5: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_layernorm_backward(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_layernorm_backward_runs_inside_a_data_parallel_gpt_and_is_restored():
    """Every LayerNorm's backward of the run is the learner's (5 per GPT, each rank and step);
    float32 arithmetic passes finite differences and is caught by the run."""
    saved = {name: LayerNorm.__dict__[name] for name in ("forward", "backward")}
    shapes = []

    def spy(dy, x, gamma, eps=1e-5):
        shapes.append(x.shape)
        return layernorm_backward(dy, x, gamma, eps)

    assert exercises.check_layernorm_backward(spy)
    steps = transformer_checkers.GPT_RUN["steps"]
    assert shapes[len(transformer_checkers.LAYERNORM_CASES):] == [(4, 8, 16)] * (5 * steps * 2)
    assert all(LayerNorm.__dict__[name] is f for name, f in saved.items())

    def in_float32(dy, x, gamma, eps=1e-5):
        return tuple(a.astype(np.float32) for a in layernorm_backward(
            dy.astype(np.float32), x.astype(np.float32), gamma.astype(np.float32), eps))

    result = exercises.check_layernorm_backward(in_float32)
    assert not result and "agree with finite differences, but in a GPT trained on 2 " \
        "data-parallel thread ranks with your backward in its 5 LayerNorms, the run's loss " \
        "differs from single at step 1" in result.message and "float64" in result.message, result
    assert all(LayerNorm.__dict__[name] is f for name, f in saved.items())


@pytest.mark.parametrize("checker", [exercises.check_causal_attention,
                                     exercises.check_layernorm_backward])
def test_transformer_checkers_refuse_a_bad_timeout(checker):
    with pytest.raises(ValueError, match="timeout"):
        checker(transformer_solutions.causal_attention, timeout=-1)


# ----- lesson 11: the ZeRO-1 step and the bucket hooks --------------------------------------

def zero1_with_all_reduce(comm, params, grads, optimizer):
    """Right numbers, data parallelism's traffic."""
    p, r = comm.world_size, comm.rank
    c = len(params) // p
    comm.all_reduce(grads)
    optimizer.step(grads[r * c:(r + 1) * c].copy())
    params[:] = comm.all_gather(optimizer.params).reshape(-1)


def zero1_without_gather(comm, params, grads, optimizer):
    """Each rank updates only its own shard of params."""
    p, r = comm.world_size, comm.rank
    c = len(params) // p
    optimizer.step(comm.reduce_scatter(grads.reshape(p, -1))[0])
    params[r * c:(r + 1) * c] = optimizer.params


def zero1_rebinding(comm, params, grads, optimizer):
    """The new θ bound to the local name: the caller's params never change."""
    optimizer.step(comm.reduce_scatter(grads.reshape(comm.world_size, -1))[0])
    params = comm.all_gather(optimizer.params).reshape(-1)  # noqa: F841 - the mistake


def test_zero1_checker_passes_the_solution():
    check = exercises.check_zero1_step(sharding_solutions.zero1_step)
    assert check and "(1, 2, 3, 4) ranks" in check.message, check
    assert "momentum" in check.message and "1/p" not in check.message


@pytest.mark.parametrize("answer, words", [
    (zero1_with_all_reduce, "with p = 2 ranks (Ψ = 1810, shards of c = 905), the result is "
                            "right but you all-reduced"),
    (zero1_without_gather, "with p = 2 ranks (Ψ = 1810, shards of c = 905), rank 0's θ after 4 "
                           "steps differs from single-process training by up to"),
    (zero1_rebinding, "with p = 1 ranks (Ψ = 1810, shards of c = 1810), rank 0's θ is still the "
                      "initial θ after 4 steps: params was not changed in place (write "
                      "params[:] = …"),
], ids=["all-reduce", "no-all-gather", "rebinding"])
def test_zero1_checker_explains(answer, words):
    check = exercises.check_zero1_step(answer)
    assert not check and words in check.message, check
    if answer is zero1_without_gather:
        assert "No all_gather ran" in check.message


def test_a_zero1_stub_is_reported_not_raised():
    def stub(comm, params, grads, optimizer):
        raise NotImplementedError("write the ZeRO-1 step")

    check = exercises.check_zero1_step(stub)
    assert not check and "), rank 0 raised NotImplementedError: write the ZeRO-1 step" \
        in check.message and check.message.count("NotImplementedError") == 1, check


class LateHooks(sharding_solutions.BucketHooks):
    """Every unit launched at the very end of the backward: right numbers, no overlap."""

    def __init__(self, comm, model, units, buffer):
        super().__init__(comm, model, units, buffer)
        self.units = units

    def after_backward(self, i):
        if i == 0:
            for unit in self.units:
                self.by_first = {unit.first: unit}
                super().after_backward(unit.first)


class NoCopy(sharding_solutions.BucketHooks):
    """Launches on the buffer without copying the unit's gradients into it."""

    def after_backward(self, i):
        unit = self.by_first.get(i)
        if unit is not None:
            self.handles.append(self.comm.all_reduce(self.buffer[unit.part], op="mean",
                                                     async_op=True))


class WaitsInside(sharding_solutions.BucketHooks):
    """Launches each unit's all-reduce, then waits for it: the backward stalls."""

    def after_backward(self, i):
        super().after_backward(i)
        if i in self.by_first:
            self.handles[-1].wait()


class Blocking(sharding_solutions.BucketHooks):
    """A blocking all-reduce: what it keeps is the averaged array, not a handle."""

    def after_backward(self, i):
        unit = self.by_first.get(i)
        if unit is not None:
            self.buffer[unit.part] = self.model.grads[unit.part]
            self.handles.append(self.comm.all_reduce(self.buffer[unit.part], op="mean"))


def test_bucket_hooks_checker_passes_the_solution():
    check = exercises.check_bucket_hooks(sharding_solutions.BucketHooks)
    assert check and "(1, 2, 3) ranks" in check.message, check


@pytest.mark.parametrize("answer, words", [
    (LateHooks, "with p = 1 ranks, the all-reduce of the unit starting at layer 2 was launched "
                "after the backward had moved on"),
    (NoCopy, "with p = 1 ranks, θ after 4 steps differs from single-process training by up to"),
    (WaitsInside, "with p = 1 ranks, rank 0: step 0: you waited for the all-reduce of the unit "
                  "starting at layer 2 inside the hook: the backward stalled on it"),
    (Blocking, "with p = 1 ranks, rank 0: step 0: hooks.handles holds a numpy.ndarray: the "
               "handles must be the Work objects comm.all_reduce returns with async_op=True"),
], ids=["late", "no-copy", "waits-inside", "blocking"])
def test_bucket_hooks_checker_explains(answer, words):
    from minidist.comm.work import Work

    wait = Work.__dict__["wait"]
    check = exercises.check_bucket_hooks(answer)
    assert not check and words in check.message, check
    assert Work.__dict__["wait"] is wait  # the checker's watch on wait is taken off again


@pytest.mark.parametrize("checker", [exercises.check_zero1_step, exercises.check_bucket_hooks])
@pytest.mark.parametrize("sizes", [(), (5,), (0,), [True], (2.0,)])
def test_sharding_checkers_refuse_world_sizes_they_cannot_check(checker, sizes):
    if checker is exercises.check_zero1_step and sizes == (5,):
        pytest.skip("any world size works for the ZeRO-1 step")
    with pytest.raises(ValueError, match="world_sizes"):
        checker(sharding_solutions.zero1_step, world_sizes=sizes)


@pytest.mark.parametrize("checker", [exercises.check_zero1_step, exercises.check_bucket_hooks])
@pytest.mark.parametrize("timeout", [0, -1, "20", True])
def test_sharding_checkers_refuse_a_bad_timeout(checker, timeout):
    with pytest.raises(ValueError, match="timeout"):
        checker(sharding_solutions.zero1_step, timeout=timeout)
