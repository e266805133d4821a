"""Expert parallelism and hybrid's dp × cp and dp × ep: the token dispatch against a loop,
training equal to one process (float64, 1e-10), every rank's bytes equal to the exact formula
from the routing it reports, its parameters to the dense part + E/e experts per block, and the
jobs that cannot run refused before any rank starts.

The model: vocab 11, context 8, d_model 16, 2 heads, 2 blocks of 4 experts; batches of 8."""

import functools

import numpy as np
import pytest

from minidist import cost, launch, memory, nn, train
from minidist.data import shard_bounds, step_batches
from minidist.nn.moe import moe_layers
from minidist.parallel import expert_parallel
from minidist.parallel.expert_parallel import combine_chunks, dispatch_chunks

V, T, STEPS, BATCH = 11, 8, 3, 8
KWARGS = {"steps": STEPS, "batch_size": BATCH, "lr": 0.1}
TOKENS = np.random.default_rng(0).integers(0, V, (32, T + 1))
X, Y = TOKENS[:, :-1], TOKENS[:, 1:]


def moe_gpt(top_k=2, capacity_factor=0.75, recompute=False, n_experts=4):
    return nn.gpt(V, T, d_model=16, n_heads=2, n_layers=2, seed=1, n_experts=n_experts,
                  top_k=top_k, capacity_factor=capacity_factor, aux_loss_coef=0.5,
                  recompute=recompute)


@functools.cache
def single(**model):
    return train(functools.partial(moe_gpt, **model), X, Y, **KWARGS)


@functools.cache
def run(strategy, workers, backend="thread", options=(), **model):
    return train(functools.partial(moe_gpt, **model), X, Y, strategy=strategy, workers=workers,
                 backend=backend, algorithm="ring", **dict(options), **KWARGS)


def assert_same_training(hist, reference):
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)


# ---- the dispatch ------------------------------------------------------------------------------

def test_dispatch_chunks_groups_rows_by_their_experts_rank_and_combine_undoes_it():
    rng = np.random.default_rng(2)
    rows, expert = rng.normal(size=(40, 3)), rng.integers(0, 6, 40)
    expert[:5] = 5  # rank 0 (experts 0, 1) gets nothing
    expert[expert < 2] = 2
    chunks, order = dispatch_chunks(rows, expert, 2, 3)
    for j in range(3):  # written out: rank j's rows, expert by expert, each in row order
        want = [rows[i] for e in (2 * j, 2 * j + 1) for i in range(40) if expert[i] == e]
        np.testing.assert_array_equal(chunks[j], np.reshape(want, (-1, 3)))
    assert len(chunks[0]) == 0
    np.testing.assert_array_equal(np.concatenate(chunks), rows[order])
    np.testing.assert_array_equal(combine_chunks(chunks, order), rows)


# ---- training ----------------------------------------------------------------------------------

def routes(model_kwargs, e, rank, t=0):
    """What rank `rank` of e sends per block at step t = 0, from one process's own forward of
    its rows: kept assignments per expert owner (the parameters at step 0 are the initial)."""
    model = moe_gpt(**{**model_kwargs, "recompute": False})  # (recompute lets routes go)
    rows = next(iter(step_batches(len(X), BATCH, STEPS, 0)))
    start, stop = shard_bounds(BATCH, rank, e)
    model.forward(X[rows[start:stop]])
    return np.array([np.bincount(m.assignment[m.kept] // (m.n_experts // e), minlength=e)
                     for m in moe_layers(model.layers)])


@pytest.mark.parametrize("model", [{"top_k": 1, "capacity_factor": None},
                                   {"top_k": 2, "capacity_factor": None},
                                   {"top_k": 1, "capacity_factor": 0.5},
                                   {"top_k": 2, "capacity_factor": 0.75},
                                   {"top_k": 2, "capacity_factor": 0.75, "recompute": True}],
                         ids=["top1", "top2", "top1-drops", "top2-drops", "recompute"])
@pytest.mark.parametrize("e", [2, 4])
def test_expert_parallel_reproduces_single_and_its_formulas(e, model):
    hist, reference = run("expert_parallel", e, **model), single(**model)
    assert_same_training(hist, reference)
    gpt = moe_gpt(**model)
    tokens_to = [d["tokens_to"] for d in hist.details]
    for r in range(e):
        np.testing.assert_array_equal(tokens_to[r][0], routes(model, e, r))
        sent = cost.expert_parallel_bytes_per_rank(gpt, tokens_to, r, by="collective")
        assert hist.bytes_sent[r] == sent["total"] > 0
        for op in ("all_to_all", "all_reduce"):
            assert hist.stats[r][op]["bytes_sent"] == sent[op] > 0
        held = memory.expert_parallel_param_bytes(gpt, e)
        assert hist.memory[r]["params"] == hist.memory[r]["grads"] == held
        lo, hi = hist.details[r]["experts"]
        assert (lo, hi) == (r * 4 // e, (r + 1) * 4 // e)
        mine = [part.stop - part.start for name, part in gpt.slices.items()
                if ".experts." not in name or lo <= int(name.split(".")[3]) < hi]
        assert held == 8 * sum(mine)  # counted from the model's own layout
    if model["capacity_factor"]:  # drops happened: the dispatch skips them
        m = moe_gpt(**model)
        m.forward(X[:BATCH])
        assert sum(layer.dropped for layer in moe_layers(m.layers)) > 0


def test_bytes_per_part_follow_the_routing():
    hist, gpt = run("expert_parallel", 2), moe_gpt()
    n = np.array([d["tokens_to"] for d in hist.details])  # (e, steps, L, e)
    parts = cost.expert_parallel_bytes_per_rank(gpt, n, 1)
    row = 16 * 8
    assert parts["dispatch"] == n[1, ..., 0].sum() * row
    assert parts["combine"] == n[0, ..., 1].sum() * row
    assert parts["backward"] == parts["dispatch"] + parts["combine"]
    assert parts["counts"] == STEPS * 2 * 1 * 2 * 8
    dense = gpt.num_params - 2 * 4 * (2 * 16 * 64 + 64 + 16)
    assert parts["gradients"] == STEPS * cost.bytes_per_rank("all_reduce", "ring", dense, 8,
                                                             2)[1][0]


@pytest.mark.usefixtures("leaves_nothing_behind")
def test_process_ranks_reproduce_single():
    hist = run("expert_parallel", 2, "process", top_k=1, capacity_factor=0.5)
    assert_same_training(hist, single(top_k=1, capacity_factor=0.5))
    assert hist.bytes_sent == run("expert_parallel", 2, top_k=1, capacity_factor=0.5).bytes_sent


def test_the_checker_can_swap_in_its_own_dispatch(monkeypatch):
    """The worker calls expert_parallel.dispatch_chunks at run time: a learner's version is
    used (here a loop; a wrong one, every chunk reversed, changes the training)."""
    calls = []

    def loop(x_rows, expert_of_row, experts_per_rank, world_size):
        calls.append(len(x_rows))
        order = [i for e in range(experts_per_rank * world_size)
                 for i in range(len(x_rows)) if expert_of_row[i] == e]
        ranks = np.asarray(expert_of_row)[order] // experts_per_rank
        return [x_rows[[i for i, r in zip(order, ranks, strict=True) if r == j]]
                for j in range(world_size)], np.array(order)

    monkeypatch.setattr(expert_parallel, "dispatch_chunks", loop)
    hist = train(moe_gpt, X, Y, strategy="expert_parallel", workers=2, backend="thread",
                 **KWARGS)
    assert_same_training(hist, single())
    assert len(calls) == 2 * 2 * 2 * STEPS  # ranks × blocks × (forward, backward) × steps

    def reversed_chunks(*args):
        chunks, order = loop(*args)
        return [c[::-1].copy() for c in chunks], order

    monkeypatch.setattr(expert_parallel, "dispatch_chunks", reversed_chunks)
    wrong = train(moe_gpt, X, Y, strategy="expert_parallel", workers=2, backend="thread",
                  **KWARGS)
    assert np.abs(wrong.params - single().params).max() > 1e-6


# ---- hybrid: dp × ep and dp × cp ---------------------------------------------------------------

def test_dp_times_ep_reproduces_single_and_its_formulas():
    hist, gpt = run("hybrid", 4, options=(("dp", 2), ("ep", 2))), moe_gpt()
    assert_same_training(hist, single())
    for r in range(4):
        group = [d["tokens_to"] for d in hist.details[2 * (r // 2):2 * (r // 2) + 2]]
        sent = cost.expert_parallel_bytes_per_rank(gpt, group, r, dp=2, by="collective")
        assert hist.bytes_sent[r] == sent["total"]
        assert hist.stats[r]["all_to_all"]["bytes_sent"] == sent["all_to_all"] > 0
        assert hist.memory[r]["params"] == memory.expert_parallel_param_bytes(gpt, 2)
        assert (hist.details[r]["dp"], hist.details[r]["ep"]) == divmod(r, 2)


def test_dp_times_cp_reproduces_single_and_its_formulas():
    def dense():
        return nn.gpt(V, T, d_model=16, n_heads=2, n_layers=2, seed=1)

    reference = train(dense, X, Y, **KWARGS)
    hist = train(dense, X, Y, strategy="hybrid", workers=4, dp=2, cp=2, load_balance=True,
                 backend="thread", algorithm="ring", **KWARGS)
    assert_same_training(hist, reference)
    for r in range(4):  # the ring of replica r // 2 on its half of the batch; AR over all 4
        d, k = divmod(r, 2)
        sent = cost.context_parallel_bytes_per_rank(dense(), BATCH, T, 2, k, "ring", True,
                                                    by="collective", dp=2, dp_rank=d)
        assert hist.bytes_sent[r] == STEPS * sent["total"]
        for op in ("send", "all_reduce"):
            assert hist.stats[r][op]["bytes_sent"] == STEPS * sent[op] > 0
        assert hist.memory[r]["peak"] == memory.context_peak_bytes(BATCH // 2, T, dense(), 2,
                                                                   True)
        assert (hist.details[r]["dp"], hist.details[r]["cp"]) == (d, k)
        assert hist.details[r]["chunks"] == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]][k]


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_fn, options, match", [
    (moe_gpt, {"strategy": "expert_parallel", "workers": 3},
     r"n_experts=4 must be divisible by workers=3"),
    (moe_gpt, {"strategy": "expert_parallel", "workers": 2, "algorithm": "fast"},
     r"unknown all-reduce algorithm 'fast'; allowed: naive, tree, ring"),
    (functools.partial(nn.gpt, V, T, d_model=16, n_heads=2), {"strategy": "expert_parallel",
                                                               "workers": 2},
     r"needs nn.gpt\(..., n_experts=E\), got GPT\("),
    (moe_gpt, {"strategy": "hybrid", "workers": 6, "dp": 2, "ep": 3},
     r"n_experts=4 must be divisible by ep=3"),
    (moe_gpt, {"strategy": "hybrid", "workers": 4, "cp": 2, "ep": 2},
     r"cp=2 and ep=2 do not compose here"),
    (moe_gpt, {"strategy": "hybrid", "workers": 4, "ep": 2, "tp": 2},
     r"ep=2 and tp=2 do not compose here"),
    (moe_gpt, {"strategy": "hybrid", "workers": 2, "ep": 2, "micro_batches": 2},
     r"ep=2 and micro_batches do not compose here"),
    (nn.gpt, {"strategy": "hybrid", "workers": 4, "cp": 2, "pp": 2},
     r"cp=2 and pp=2 do not compose here"),
    (moe_gpt, {"strategy": "hybrid", "workers": 4, "dp": 1, "ep": 2},
     r"dp×ep = 1×2 = 2 ranks, but workers=4"),
    (nn.gpt, {"strategy": "hybrid", "workers": 2, "dp": 2, "load_balance": True},
     r"load_balance=True .* needs cp > 1"),
], ids=["E%e", "algorithm", "dense", "E%ep", "cp-ep", "ep-tp", "ep-micro", "cp-pp", "workers",
        "load_balance"])
def test_bad_jobs_are_named_before_any_rank_starts(monkeypatch, model_fn, options, match):
    monkeypatch.setattr(launch, "run", lambda *a, **k: pytest.fail("ranks started"))
    model_fn = functools.partial(model_fn, V, T) if model_fn is nn.gpt else model_fn
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, Y, backend="thread", **options, **KWARGS)
