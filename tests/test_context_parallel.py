"""Context parallelism with ring attention: the online-softmax combine against a full softmax,
ring attention against CausalSelfAttention, training equal to one process (float64, 1e-10),
and every rank's bytes and activations equal to their formulas (minidist.context_cost,
minidist.context_memory), exactly.

The model: vocab 11, context 8, d_model 16, 4 heads, 2 blocks, d_ff 32; batches of 8."""

import functools
import math

import numpy as np
import pytest

from minidist import cost, launch, memory, nn, run, train
from minidist.nn import CausalSelfAttention
from minidist.parallel.ring_attention import RingAttention, chunks, combine

V, T, STEPS, BATCH = 11, 8, 3, 8
KWARGS = {"steps": STEPS, "batch_size": BATCH, "lr": 0.1}
TOKENS = np.random.default_rng(0).integers(0, V, (32, T + 1))
X, Y = TOKENS[:, :-1], TOKENS[:, 1:]


def gpt(recompute=False):
    return nn.gpt(V, T, d_model=16, n_heads=4, n_layers=2, d_ff=32, seed=1, recompute=recompute)


@functools.cache
def single(recompute=False):
    return train(functools.partial(gpt, recompute), X, Y, **KWARGS)


@functools.cache
def cp_run(c, load_balance=False, recompute=False, backend="thread"):
    return train(functools.partial(gpt, recompute), X, Y, strategy="context_parallel",
                 workers=c, backend=backend, load_balance=load_balance, algorithm="ring",
                 **KWARGS)


def assert_same_training(hist, reference):
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)


# ---- the combine rule ------------------------------------------------------------------------

def _block(scores, v):
    """(m, l, o) of one block, written out: a row with every score −∞ gives (−∞, 0, 0)."""
    m = scores.max(axis=-1)
    seen = np.isfinite(m)
    p = np.zeros_like(scores)
    p[seen] = np.exp(scores[seen] - m[seen, None])
    return m, p.sum(axis=-1), p @ v


def test_combine_merges_partial_softmaxes_into_the_full_one_in_any_order():
    rng = np.random.default_rng(3)
    scores, v = 4 * rng.normal(size=(6, 12)), rng.normal(size=(12, 3))
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    scores[1, 3:7] = scores[4, 7:] = -np.inf  # rows that see nothing in a whole block
    scores[:, 0] = rng.normal(size=6)  # every row sees key 0: the softmax is defined
    full = np.exp(scores - scores.max(axis=1, keepdims=True))
    want_lse = np.log(full.sum(axis=1)) + scores.max(axis=1)
    want = (full / full.sum(axis=1, keepdims=True)) @ v
    parts = [_block(scores[:, a:b], v[a:b]) for a, b in ((0, 3), (3, 7), (7, 12))]
    assert np.isneginf(parts[1][0][1]) and parts[1][1][1] == 0  # a masked row's partial
    empty = (np.full(6, -np.inf), np.zeros(6), np.zeros((6, 3)))
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        m, l_, o = empty
        for i in order:
            m, l_, o = combine(m, l_, o, *parts[i])
        np.testing.assert_allclose(o / l_[:, None], want, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(m + np.log(l_), want_lse, rtol=1e-13)
    tree = combine(*parts[0], *combine(*parts[1], *parts[2]))  # associative: any tree
    np.testing.assert_allclose(tree[2] / tree[1][:, None], want, rtol=1e-13, atol=1e-15)
    m, l_, o = combine(*empty, *empty)  # nothing seen on either side: no NaN
    assert np.isneginf(m).all() and not l_.any() and not o.any()


# ---- ring attention against CausalSelfAttention ----------------------------------------------

def test_chunks_give_rank_r_chunks_r_and_2c_minus_1_minus_r_with_load_balance():
    assert [chunks(8, 2, r) for r in range(2)] == [[(0, 4)], [(4, 8)]]
    assert [chunks(8, 2, r, True) for r in range(2)] == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]]
    held = sorted(p for r in range(4) for p in chunks(16, 4, r, True))
    assert held == [(2 * i, 2 * i + 2) for i in range(8)]  # every position exactly once


N, D, H = 2, 12, 3
RNG = np.random.default_rng(5)
SHAPES = CausalSelfAttention(D, H).param_shapes()
PARAMS = {n: RNG.normal(0.0, 1.5 / math.sqrt(D), s) for n, s in SHAPES.items()}
XS, DYS = RNG.normal(size=(N, T, D)), RNG.normal(size=(N, T, D))


def _ring_rank(comm, load_balance):
    layer = RingAttention(D, H, comm, load_balance)
    layer.bind(PARAMS, {n: np.zeros(s) for n, s in SHAPES.items()})
    pos = np.concatenate([np.arange(a, b) for a, b in chunks(T, comm.world_size, comm.rank,
                                                             load_balance)])
    Y_ = layer.forward(XS[:, pos])
    kept = {name for name, value in vars(layer).items() if isinstance(value, np.ndarray)}
    return pos, Y_, layer.backward(DYS[:, pos]), dict(layer.grads), kept, layer.lse.shape


@pytest.mark.parametrize("c, load_balance", [(1, False), (2, False), (2, True), (4, False),
                                             (4, True)])
def test_ring_attention_forward_and_backward_equal_causal_self_attention(c, load_balance):
    full = CausalSelfAttention(D, H)
    full.bind(PARAMS, {n: np.zeros(s) for n, s in SHAPES.items()})
    want_Y = full.forward(XS)
    want_dX = full.backward(DYS)
    ranks = run(_ring_rank, c, args=(load_balance,), backend="thread")
    for pos, Y_, dX, _, kept, lse_shape in ranks:
        np.testing.assert_allclose(Y_, want_Y[:, pos], rtol=0, atol=1e-12)
        np.testing.assert_allclose(dX, want_dX[:, pos], rtol=0, atol=1e-12)
        assert kept == {"X", "Q", "K", "V", "O", "lse"}  # no P: recomputed from lse
        assert lse_shape == (N, H, T // c)
    for name in SHAPES:  # the parameter gradients, summed over the ring
        np.testing.assert_allclose(sum(r[3][name] for r in ranks), full.grads[name], rtol=0,
                                   atol=1e-12)


# ---- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
@pytest.mark.parametrize("load_balance", [False, True], ids=["contiguous", "balanced"])
@pytest.mark.parametrize("c", [2, 4])
def test_context_parallel_reproduces_single_and_its_formulas(c, load_balance, recompute):
    hist, model = cp_run(c, load_balance, recompute), gpt(recompute)
    assert_same_training(hist, single(recompute))
    for r in range(c):
        assert (hist.details[r]["dp"], hist.details[r]["cp"]) == (0, r)
        sent = cost.context_parallel_bytes_per_rank(model, BATCH, T, c, r, "ring", load_balance,
                                                    by="collective")
        assert hist.bytes_sent[r] == STEPS * sent["total"] > 0
        for op in ("send", "all_reduce"):
            assert hist.stats[r][op]["bytes_sent"] == STEPS * sent[op]
        assert hist.stats[r]["recv"]["bytes_received"] == STEPS * sent["send"]  # a ring
        assert hist.memory[r]["activations"] == memory.context_activation_bytes(
            BATCH, T, model, c, load_balance)
        assert hist.memory[r]["params"] == hist.memory[r]["grads"] == 8 * model.num_params
        assert hist.memory[r]["peak"] == memory.context_peak_bytes(BATCH, T, model, c,
                                                                   load_balance)


@pytest.mark.parametrize("load_balance", [False, True], ids=["contiguous", "balanced"])
def test_the_peak_counts_the_ring_blocks_in_flight_for_three_ranks(load_balance):
    """c = 3 on T = 6: the peak is the model states, the activations and the backward's two
    stacked (K, V, ∂K, ∂V) blocks, one sent and one received: 8·N·(T/c)·d·b."""
    model, c, T6 = gpt(), 3, 6
    hist = train(gpt, X[:, :T6], Y[:, :T6], strategy="context_parallel", workers=c,
                 backend="thread", load_balance=load_balance, **KWARGS)
    assert_same_training(hist, train(gpt, X[:, :T6], Y[:, :T6], **KWARGS))
    in_flight = 8 * BATCH * (T6 // c) * 16 * 8
    for held in hist.memory:
        assert held["peak"] == memory.context_peak_bytes(BATCH, T6, model, c, load_balance)
        assert held["peak"] == 3 * 8 * model.num_params + held["activations"] + in_flight
        assert held["activations"] == memory.context_activation_bytes(BATCH, T6, model, c)


def test_bytes_per_part_follow_the_ring():
    model, c = gpt(recompute=True), 4
    B = BATCH * (T // c) * 16 * 8  # one rank's K (or V) of one block, all heads
    parts = cost.context_parallel_bytes_per_rank(model, BATCH, T, c, 1)
    assert parts["forward"] == 2 * (c - 1) * 2 * B  # 2 blocks
    assert parts["backward"] == 2 * ((c - 1) * 4 * B + 2 * B)
    assert parts["recompute"] == parts["forward"]
    assert parts["gradients"] == cost.bytes_per_rank("all_reduce", "ring", model.num_params,
                                                     8, c)[1][0]
    assert cost.context_parallel_bytes_per_rank(model, BATCH, T, 1)["total"] == 0
    for d, rows in enumerate((4, 3)):  # dp × cp: 7 sequences over 2 replicas, 4 + 3
        hybrid = cost.context_parallel_bytes_per_rank(model, 7, T, c, 1, dp=2, dp_rank=d)
        plain = cost.context_parallel_bytes_per_rank(model, rows, T, c, 1)
        assert all(hybrid[part] == plain[part] for part in ("forward", "backward", "recompute"))
        assert hybrid["gradients"] == cost.bytes_per_rank("all_reduce", "ring",
                                                          model.num_params, 8, 2 * c)[d * c + 1][0]


@pytest.mark.usefixtures("leaves_nothing_behind")
def test_process_ranks_reproduce_single():
    hist = cp_run(2, True, backend="process")
    assert_same_training(hist, single())
    assert hist.bytes_sent == cp_run(2, True).bytes_sent


def test_activations_are_one_cth_and_ring_attention_keeps_no_softmax():
    model, one = gpt(), cp_run(1)
    assert_same_training(one, single())
    assert one.bytes_sent == [0]
    P = 8 * model.n_layers * model.n_heads * BATCH * T * T  # the softmax single keeps
    for c in (2, 4):
        held = cp_run(c).memory[0]["activations"]
        lse = 8 * model.n_layers * model.n_heads * BATCH * T // c
        assert held * c == one.memory[0]["activations"]  # exactly 1/c: all of it is per position
        assert c * (held - lse) + P == single().memory[0]["activations"]
        print(f"c={c}: activations per rank {held} B = 1/{c} of context_parallel on one rank, "
              f"{held / single().memory[0]['activations']:.3f} of single's")


def test_load_balance_gives_every_rank_the_same_attention_work():
    for c in (2, 4):
        plain, balanced = cp_run(c), cp_run(c, load_balance=True)
        assert [d["block_pairs"] for d in plain.details] == [
            {"computed": r + 1, "skipped": c - 1 - r} for r in range(c)]
        assert [d["block_pairs"] for d in balanced.details] == [
            {"computed": 2 * c + 1, "skipped": 2 * c - 1}] * c
        work = {name: [d["block_pairs"]["computed"] * d["chunk_len"] ** 2 for d in h.details]
                for name, h in (("contiguous", plain), ("balanced", balanced))}
        assert max(work["balanced"]) < max(work["contiguous"])  # (2c+1)/(4c) of the slowest
        for name, h in (("contiguous", plain), ("balanced", balanced)):
            seconds = [f"{d['compute_time'].sum() * 1e3:.1f}" for d in h.details]
            print(f"c={c} {name}: scores computed per rank (per sequence and head) "
                  f"{work[name]}, compute ms {seconds}")


# ---- errors --------------------------------------------------------------------------------

def _no_ranks(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("ranks started")

    monkeypatch.setattr(launch, "run", started)


@pytest.mark.parametrize("model_fn, X_, Y_, options, error, match", [
    (gpt, X[:, :6], Y[:, :6], {"workers": 4}, ValueError,
     r"over c=4 ranks cuts each sequence of T=6 positions into 4 equal chunks: T must be "
     r"divisible by 4"),
    (gpt, X[:, :6], Y[:, :6], {"workers": 2, "load_balance": True}, ValueError,
     r"into 2c = 4 equal chunks \(load_balance=True\): T must be divisible by 4"),
    (functools.partial(nn.mlp, [8, 11]), np.zeros((32, 8)), np.zeros(32, int), {"workers": 2},
     ValueError, r"strategy='context_parallel' splits sequences of tokens over ranks: it needs "
     r"a GPT \(minidist.nn.gpt\), got Sequential"),
    (gpt, X, Y, {"workers": 2, "load_balance": 1}, TypeError,
     r"load_balance must be True or False \(its default is False\), got 1"),
    (gpt, X, Y, {"workers": 2, "algorithm": "fast"}, ValueError,
     r"unknown all-reduce algorithm 'fast'"),
], ids=["T", "T-balanced", "mlp", "load_balance", "algorithm"])
def test_bad_jobs_are_named_before_any_rank_starts(monkeypatch, model_fn, X_, Y_, options,
                                                   error, match):
    _no_ranks(monkeypatch)
    with pytest.raises(error, match=match):
        train(model_fn, X_, Y_, strategy="context_parallel", backend="thread", **options,
              **KWARGS)


def test_the_formulas_refuse_layouts_that_cannot_run():
    model = gpt()
    for call, match in [
        (lambda: memory.context_activation_elements(8, 7, model, 2), "T=7"),
        (lambda: memory.context_activation_elements(8, 8, model, 8, True), "divisible by 16"),
        (lambda: memory.context_activation_elements(8, 9, model), "context"),
        (lambda: memory.context_activation_elements(8, 8, nn.mlp([4, 2])), "GPT"),
        (lambda: cost.context_parallel_bytes_per_rank(model, 8, 8, 2, rank=2), "rank"),
        (lambda: cost.context_parallel_bytes_per_rank(model, 8, 8, 2, by="op"), "by"),
        (lambda: cost.context_parallel_bytes_per_rank(model, 8, 8, 2, dp=2, dp_rank=2),
         r"dp_rank must be an integer in \[0, 2\) for dp=2, got 2"),
        (lambda: cost.context_parallel_bytes_per_rank(model, 1, 8, 2, dp=2), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
