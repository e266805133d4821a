"""Mixture-of-experts blocks: the router and every expert against finite differences (with and
without capacity drops, the routing held fixed), the routing and the load-balancing loss
against a loop over tokens, the activation ledger, causality, recompute, the layout and the
errors (tests/test_moe_training.py trains it with every strategy)."""

import math
from fractions import Fraction

import numpy as np
import pytest

from minidist import memory, nn
from minidist.gradcheck import numerical_gradient, relative_error
from minidist.nn.moe import aux_loss, moe_layers

D, D_FF, E = 4, 6, 3
X_SEQ = np.random.default_rng(3).normal(size=(3, 5, D))
CASES = [(1, None), (1, 0.5), (2, None), (2, 0.6)]  # (top_k, capacity_factor)


def randomised(model, seed=1, scale=0.3):
    model.params = np.random.default_rng(seed).normal(0.0, scale, model.num_params)
    return model


def routes(model):
    return [(m.assignment.copy(), m.kept.copy()) for m in moe_layers(model.layers)]


def fixed_routing(model, loss):
    """loss(_) that also checks that the routing is the one model has now: finite differences
    must not cross a change of the top-k choice or of a capacity drop."""
    before = routes(model)

    def f(_):
        value = loss()
        for (a, k), (a2, k2) in zip(before, routes(model), strict=True):
            assert np.array_equal(a, a2) and np.array_equal(k, k2), "the routing changed"
        return value
    return f


def errors_by_part(model, analytic, numeric):
    """The relative error of each parameter's slice, by its name in model.slices."""
    return {name: relative_error(analytic[part], numeric[part])
            for name, part in model.slices.items()}


@pytest.mark.parametrize("top_k, capacity_factor", CASES)
def test_the_moe_layer_matches_finite_differences(top_k, capacity_factor):
    layer = nn.MoE(D, D_FF, E, top_k, capacity_factor, aux_loss_coef=0.5)
    model = randomised(nn.Sequential([layer], nn.MSELoss()))
    X, R = X_SEQ.copy(), np.random.default_rng(2).normal(size=X_SEQ.shape)

    def loss():  # what backward(R) differentiates: Σ R ⊙ y + coef · aux
        return float(np.sum(layer.forward(X) * R)) + layer.aux_loss_coef * layer.aux_loss

    loss()
    f = fixed_routing(model, loss)
    dX = layer.backward(R)
    analytic = model.grads.copy()
    parts = errors_by_part(model, analytic, numerical_gradient(f, model.params))
    assert max(parts.values()) < 1e-7, parts
    assert relative_error(dX, numerical_gradient(f, X)) < 1e-7
    assert np.abs(analytic[model.slices["0.router.W"]]).max() > 1e-3  # the router learns
    if capacity_factor is not None:
        assert layer.dropped > 0 and not layer.kept.all(axis=2).all()
    if top_k == 1 and capacity_factor:  # some token dropped by its only expert
        assert (~layer.kept[..., 0]).any()


def test_an_expert_without_tokens_gets_zero_gradients():
    layer = nn.MoE(D, D_FF, E)
    model = randomised(nn.Sequential([layer], nn.MSELoss()))
    layer.router.params["b"][...] = [0.0, 0.0, -50.0]  # nobody's first choice: expert 2
    model.grads = np.full(model.num_params, np.nan)  # no stale gradient may survive
    layer.forward(X_SEQ)
    layer.backward(np.ones_like(X_SEQ))
    assert layer.counts[2] == 0 and layer.counts.sum() == 15
    assert np.isfinite(model.grads).all()
    assert not any(model.grads[model.slices[f"0.experts.2.{w}"]].any()
                   for w in ("fc.W", "fc.b", "proj.W", "proj.b"))


def reference_moe(layer, X):
    """The MoE layer's output, aux and routing, token by token in plain Python loops."""
    W, b = layer.router.params["W"], layer.router.params["b"]
    N, T, _ = X.shape
    out, assignment, kept = np.zeros_like(X), [], []
    f, P = np.zeros((N, E)), np.zeros((N, E))
    for n in range(N):
        taken = [0] * E
        for t in range(T):
            z = X[n, t] @ W + b
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            chosen = sorted(range(E), key=lambda e, p=p: (-p[e], e))[:layer.top_k]
            room = []
            for e in chosen:
                room.append(layer.capacity is None or taken[e] < layer.capacity)
                taken[e] += 1
                if room[-1]:
                    x = X[n, t] @ layer.experts[e].fc.params["W"] + layer.experts[e].fc.params["b"]
                    x = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
                    h = x @ layer.experts[e].proj.params["W"] + layer.experts[e].proj.params["b"]
                    out[n, t] += p[e] * h
            assignment.append(chosen)
            kept.append(room)
            f[n, chosen[0]] += 1 / T
            P[n] += p / T
    aux = E * (f * P).sum(axis=1).mean()
    return out, aux, np.reshape(assignment, (N, T, -1)), np.reshape(kept, (N, T, -1))


@pytest.mark.parametrize("top_k, capacity_factor", CASES + [(3, 0.4)])
def test_routing_and_aux_loss_match_a_loop_over_tokens(top_k, capacity_factor):
    layer = nn.MoE(D, D_FF, E, top_k, capacity_factor)
    randomised(nn.Sequential([layer], nn.MSELoss()), seed=4, scale=0.8)
    X = X_SEQ.copy()
    y = layer.forward(X)
    expected_capacity = None if capacity_factor is None else math.ceil(
        Fraction(str(capacity_factor)) * top_k * 5 / E)  # exact: 0.4·3·5/3 = 2, not 2.0…04
    assert layer.capacity == expected_capacity
    out, aux, assignment, kept = reference_moe(layer, X)
    np.testing.assert_allclose(y, out, rtol=0, atol=1e-13)
    assert layer.aux_loss == pytest.approx(aux, rel=1e-13)
    np.testing.assert_array_equal(layer.assignment, assignment)
    np.testing.assert_array_equal(layer.kept, kept)
    counts = np.bincount(assignment[kept], minlength=E)
    np.testing.assert_array_equal(layer.counts, counts)
    assert layer.dropped == (~kept).sum()
    np.testing.assert_allclose(layer.probs.sum(axis=2), 1.0, rtol=1e-14)
    gone = ~kept.any(axis=2)  # dropped by every expert it chose: no MLP output at all
    assert np.all(y[gone] == 0.0)
    if capacity_factor is not None:
        assert gone.any() or top_k > 1
        per_sequence = [np.bincount(assignment[n][kept[n]], minlength=E) for n in range(3)]
        assert np.max(per_sequence) <= layer.capacity


@pytest.mark.parametrize("top_k, capacity_factor", [(2, 0.6), (1, None)])
def test_the_activation_ledger_counts_what_the_layer_keeps(top_k, capacity_factor):
    """Kept for backward, with R = N·T rows and A = R·k − dropped kept assignments: the input
    R·d (the router's), probs R·E, gates R·k, expert outputs A·d, each expert's fc, GELU and
    proj inputs A·(d + 2·d_ff), f N·E (float64), and the routing: assignment R·k and the
    dispatch order A (int64), counts E (int64), kept R·k (bool)."""
    layer = nn.MoE(D, D_FF, E, top_k, capacity_factor)
    randomised(nn.Sequential([layer], nn.MSELoss(), dtype=np.float32))
    layer.forward(X_SEQ.astype(np.float32))
    R, A, N = 15, 15 * top_k - layer.dropped, 3
    floats = R * D + R * E + R * top_k + A * D + A * (D + 2 * D_FF)
    assert memory.activation_bytes([layer]) == 4 * floats + 8 * (N * E + R * top_k + A + E) + (
        R * top_k)


def moe_gpt(**kwargs):
    return nn.gpt(**{"vocab_size": 5, "context": 4, "d_model": 4, "n_heads": 2, "n_layers": 2,
                     "d_ff": D_FF, "n_experts": E, "aux_loss_coef": 0.5, **kwargs})


@pytest.mark.parametrize("kwargs", [{"top_k": 1, "capacity_factor": 0.5},
                                    {"top_k": 2, "capacity_factor": 0.6},
                                    {"top_k": 2, "recompute": True}], ids=str)
def test_the_moe_gpt_matches_finite_differences(kwargs):
    model = randomised(moe_gpt(**kwargs))
    x = np.random.default_rng(4).integers(0, 5, (3, 4))
    y = np.random.default_rng(5).integers(0, 5, (3, 4))
    model.loss_and_grad(x, y)
    analytic = model.grads.copy()
    if kwargs.get("recompute"):  # the routing is let go after each forward: not watched
        f = lambda _: model.loss(x, y)  # noqa: E731
    else:
        f = fixed_routing(model, lambda: model.loss(x, y))
    assert relative_error(analytic, numerical_gradient(f, model.params)) < 1e-7
    if "capacity_factor" in kwargs:
        assert all(m.dropped > 0 for m in moe_layers(model.layers))


def test_the_loss_adds_each_blocks_aux_loss():
    x = np.random.default_rng(6).integers(0, 5, (4, 4))
    y = np.random.default_rng(7).integers(0, 5, (4, 4))
    with_aux, without = randomised(moe_gpt(top_k=2)), randomised(moe_gpt(aux_loss_coef=0.0,
                                                                         top_k=2))
    loss, task = with_aux.loss(x, y), without.loss(x, y)
    blocks = moe_layers(with_aux.layers)
    assert len(blocks) == 2 and all(m.aux_loss > 0 for m in blocks)
    assert loss - task == pytest.approx(0.5 * sum(m.aux_loss for m in blocks), rel=1e-12)
    assert aux_loss(with_aux.layers) == loss - task


def test_a_position_sees_only_the_tokens_before_it_and_sequences_route_alone():
    model = randomised(moe_gpt(vocab_size=7, context=6, top_k=2, capacity_factor=0.5),
                       scale=0.8)
    x = np.random.default_rng(8).integers(0, 7, (3, 6))
    before = model.forward(x)
    assert all(m.dropped > 0 for m in moe_layers(model.layers))
    for n in range(3):  # a sequence alone routes as in the batch: capacity is per sequence
        np.testing.assert_allclose(model.forward(x[n:n + 1]), before[n:n + 1], rtol=0,
                                   atol=1e-13)
    for t in range(6):
        changed = x.copy()
        changed[:, t] = (changed[:, t] + 1) % 7
        after = model.forward(changed)
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-13)
        assert np.abs(after[:, t] - before[:, t]).max() > 1e-6


def test_recompute_gives_the_same_gradients_and_keeps_less():
    x = np.random.default_rng(9).integers(0, 5, (4, 4))
    y = np.random.default_rng(10).integers(0, 5, (4, 4))
    plain, again = randomised(moe_gpt(top_k=2, capacity_factor=0.6)), randomised(
        moe_gpt(top_k=2, capacity_factor=0.6, recompute=True))
    loss = plain.loss_and_grad(x, y)
    held = memory.activation_bytes(plain.layers + [plain.criterion])
    assert again.loss(x, y) == loss
    assert memory.activation_bytes(again.layers + [again.criterion]) < held
    assert all(m.probs is None and m.H is None for m in moe_layers(again.layers))
    again.backward()
    np.testing.assert_allclose(again.grads, plain.grads, rtol=0, atol=1e-13)


@pytest.mark.parametrize("V, d, L, experts, d_ff", [(11, 8, 2, 3, 32), (7, 4, 1, 1, 6)])
def test_parameter_count_layout_and_init(V, d, L, experts, d_ff):
    model = nn.gpt(V, 5, d_model=d, n_heads=2, n_layers=L, d_ff=d_ff, n_experts=experts)
    dense = nn.gpt(V, 5, d_model=d, n_heads=2, n_layers=L, d_ff=d_ff)
    mlp = 2 * d * d_ff + d_ff + d
    assert model.num_params == dense.num_params + L * (d * experts + experts + (experts - 1) * mlp)
    names = [name.split(".", 1)[1] for name in model.slices if name.startswith("1.")]
    assert names[8:] == ["moe.router.W", "moe.router.b"] + [
        f"moe.experts.{e}.{w}" for e in range(experts) for w in ("fc.W", "fc.b", "proj.W",
                                                                 "proj.b")]
    for e in range(experts):  # expert e: ONE contiguous slice of the flat buffer
        parts = [model.slices[f"1.moe.experts.{e}.{w}"] for w in ("fc.W", "fc.b", "proj.W",
                                                                  "proj.b")]
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False)) and (
            parts[-1].stop - parts[0].start == mlp)
    p = {name: model.params[part] for name, part in model.slices.items()}
    if d_ff == 32:
        for name in ("1.moe.router.W", "1.moe.experts.0.fc.W", "2.moe.experts.2.fc.W"):
            assert p[name].std() == pytest.approx(0.02, rel=0.25)
        assert p["1.moe.experts.1.proj.W"].std() == pytest.approx(0.02 / np.sqrt(2 * L),
                                                                  rel=0.25)
    assert not p["1.moe.router.b"].any() and not p["1.moe.experts.0.proj.b"].any()
    for none in (None, 0):
        same = nn.gpt(V, 5, d_model=d, n_heads=2, n_layers=L, d_ff=d_ff, n_experts=none)
        np.testing.assert_array_equal(same.params, dense.params)
        assert list(same.slices) == list(dense.slices) and repr(same) == repr(dense)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_experts": -1}, ValueError, "n_experts must be an integer >= 1, got -1"),
    ({"n_experts": 2.0}, TypeError, "n_experts must be an integer >= 1"),
    ({"n_experts": 2, "top_k": 3}, ValueError, "top_k=3 must be <= n_experts=2"),
    ({"n_experts": 2, "top_k": 0}, ValueError, "top_k must be an integer >= 1, got 0"),
    ({"n_experts": 2, "capacity_factor": 0}, ValueError,
     "capacity_factor must be None or a finite number > 0, got 0"),
    ({"n_experts": 2, "capacity_factor": np.nan}, ValueError, "capacity_factor must be None"),
    ({"n_experts": 2, "capacity_factor": "1"}, TypeError, "capacity_factor must be None or"),
    ({"n_experts": 2, "aux_loss_coef": -0.1}, ValueError,
     "aux_loss_coef must be a finite number >= 0, got -0.1"),
    ({"aux_loss_coef": True}, TypeError, "aux_loss_coef must be a finite number >= 0"),
    ({"top_k": 2}, ValueError, "top_k=2 and capacity_factor=None route tokens to experts: "
                               "they need n_experts >= 1"),
    ({"n_experts": 0, "capacity_factor": 1.0}, ValueError, "they need n_experts >= 1"),
])
def test_bad_moe_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.gpt(7, 5, d_model=8, n_heads=2, **kwargs)


def test_moe_input_must_be_a_batch_of_sequences():
    layer = nn.MoE(D, D_FF, E)
    nn.Sequential([layer], nn.MSELoss())
    with pytest.raises(ValueError, match=r"expects input of shape \(N, T, 4\), got \(5, 4\)"):
        layer.forward(np.zeros((5, D)))


def test_capacity_is_the_exact_ceiling_not_a_rounded_float():
    """⌈1.1 · 1 · 50 / 5⌉ = 11: in floats the product is 11.000000000000002, whose ceiling is 12."""
    from minidist.nn.moe import MoE

    layer = MoE(8, 16, 5, top_k=1, capacity_factor=1.1)
    layer.bind(*[{k: np.zeros(s) for k, s in layer.param_shapes().items()} for _ in range(2)])
    layer.forward(np.random.default_rng(0).normal(size=(1, 50, 8)))
    assert layer.capacity == 11
