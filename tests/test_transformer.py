"""The tiny GPT: every backward against central finite differences, causality, checkpointing,
the activation ledger against Korthikanti's formula, sampling, the errors and the layout."""

import numpy as np
import pytest

from minidist import memory, nn
from minidist.gradcheck import check_model, numerical_gradient, relative_error
from minidist.memory import INT64_PARTS
from minidist.memory import gpt_activation_elements as activation_elements

V, CONTEXT, D, HEADS = 7, 5, 8, 2


def tiny(**kwargs):
    return nn.gpt(**{"vocab_size": V, "context": CONTEXT, "d_model": D, "n_heads": HEADS,
                     "n_layers": 2, **kwargs})


def tokens(N=3, T=CONTEXT, seed=0, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (N, T))


def randomised(model, seed=1, scale=0.3):
    """The model with every parameter drawn N(0, scale²): no γ = 1, no zero bias left."""
    model.params = np.random.default_rng(seed).normal(0.0, scale, model.num_params)
    return model


def check_layer(layer, X, input_grad=True):
    """Relative errors (parameters, input) of layer.backward against finite differences of
    f = Σ forward(X) ⊙ R, for random parameters and a random R."""
    model = randomised(nn.Sequential([layer], nn.MSELoss()))
    R = np.random.default_rng(2).normal(size=layer.forward(X).shape)

    def f(_):
        return float(np.sum(layer.forward(X) * R))

    layer.forward(X)
    dX = layer.backward(R)
    errors = [relative_error(model.grads, numerical_gradient(f, model.params))]
    if input_grad:
        errors.append(relative_error(dX, numerical_gradient(f, X)))
    return errors


X_SEQ = np.random.default_rng(3).normal(size=(2, 4, D))


@pytest.mark.parametrize("layer", [
    nn.LayerNorm(D), nn.GELU(), nn.CausalSelfAttention(D, HEADS),
    nn.CausalSelfAttention(D, 1), nn.Block(D, HEADS, 3 * D),
    nn.Block(D, 4, 4 * D, recompute=True),
], ids=repr)
def test_layers_match_finite_differences(layer):
    assert max(check_layer(layer, X_SEQ.copy())) < 1e-6


def test_embedding_matches_finite_differences():
    layer = nn.Embedding(V, CONTEXT, D)
    error, = check_layer(layer, tokens(T=3), input_grad=False)  # T < context: wpe[3:] gets 0
    assert error < 1e-6
    assert layer.backward(np.ones((3, 3, D))) is None


def test_gelu_is_gpt2s_tanh_approximation():
    x = np.linspace(-5, 5, 101)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(nn.GELU().forward(x), exact, rtol=1e-14, atol=1e-15)


def test_layernorm_normalises_the_last_axis():
    model = nn.Sequential([nn.LayerNorm(D)], nn.MSELoss())
    y = model.layers[0].forward(X_SEQ * 5 + 3)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1 / (1 + 1e-5 / (25 * X_SEQ.var(axis=-1))),
                               rtol=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_the_whole_gpt_matches_finite_differences(recompute):
    model = randomised(nn.gpt(5, 4, d_model=4, n_heads=2, n_layers=2, recompute=recompute))
    assert model.num_params == 557  # two evaluations of the loss each
    x, y = tokens(T=4, seed=4, vocab=5), tokens(T=4, seed=5, vocab=5)
    assert check_model(model, x, y) < 1e-6


def test_a_position_sees_only_the_tokens_before_it():
    model = randomised(tiny(), scale=0.5)
    x = tokens(N=2)
    before = model.forward(x)
    for t in range(CONTEXT):
        changed = x.copy()
        changed[:, t] = (changed[:, t] + 1) % V
        after = model.forward(changed)
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
        assert np.all(np.abs(after[:, t] - before[:, t]).max(axis=-1) > 1e-6)
        if t + 1 < CONTEXT:
            assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-6


@pytest.mark.parametrize("bad, error, match", [
    (np.array([[1, 2, 3, 70]]), ValueError,
     r"token 70 at \[0, 3\] is outside the vocabulary: tokens must lie in \[0, 7\)"),
    (np.array([[1, -1]]), ValueError, r"token -1 at \[0, 1\] is outside the vocabulary"),
    (np.zeros((1, 6), int), ValueError, "sequence length T=6 exceeds the model's context of 5"),
    (np.zeros((2, 3)), TypeError, "tokens must be integer token ids, got dtype float64"),
    (np.zeros((2, 3), bool), TypeError, "tokens must be integer token ids"),
    (np.zeros(3, int), ValueError, r"tokens must have shape \(N, T\)"),
])
def test_bad_tokens_are_named(bad, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        model.forward(bad)
    with pytest.raises(error, match=match):
        model.generate(bad, 2)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"d_model": 10, "n_heads": 4}, ValueError, "d_model=10 must be divisible by n_heads=4"),
    ({"d_model": 0}, ValueError, "d_model must be an integer >= 1, got 0"),
    ({"n_layers": 0}, ValueError, "n_layers must be an integer >= 1"),
    ({"vocab_size": 2.5}, TypeError, "vocab_size must be an integer"),
    ({"context": -1}, ValueError, "context must be an integer >= 1"),
    ({"d_ff": 0}, ValueError, "d_ff must be an integer >= 1"),
    ({"recompute": "yes"}, TypeError, "recompute must be True or False"),
    ({"dtype": np.int32}, ValueError, "model dtype must be a float type"),
])
def test_bad_sizes_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny(**kwargs)


def test_recompute_gives_the_same_gradients_and_keeps_less():
    x, y = tokens(N=4, seed=6), tokens(N=4, seed=7)
    plain, checkpointed = randomised(tiny()), randomised(tiny(recompute=True))
    loss = plain.loss_and_grad(x, y)
    held = memory.activation_bytes(plain.layers + [plain.criterion])
    assert checkpointed.loss(x, y) == loss
    held_checkpointed = memory.activation_bytes(checkpointed.layers + [checkpointed.criterion])
    for block in checkpointed.layers[1:3]:  # only the block's input survives the forward
        assert block.x is not None and block.attn.P is None and block.mlp.gelu.X is None
    checkpointed.backward()
    np.testing.assert_allclose(checkpointed.grads, plain.grads, rtol=0, atol=1e-12)
    assert held_checkpointed < held
    assert held_checkpointed == ledger_formula(4, CONTEXT, checkpointed)


def ledger_formula(N, T, model):
    parts = activation_elements(N, T, model)
    return sum(count * (8 if part in INT64_PARTS else model.dtype.itemsize)
               for part, count in parts.items())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("N, T, d_ff", [(3, 5, None), (2, 4, 12), (1, 1, None)])
def test_the_activation_ledger_equals_the_formula(N, T, d_ff, dtype):
    model = tiny(d_ff=d_ff, dtype=dtype)
    model.loss(tokens(N, T), tokens(N, T, seed=1))
    assert model.forward(tokens(N, T)).dtype == dtype
    model.loss(tokens(N, T), tokens(N, T, seed=1))
    measured = memory.activation_bytes(model.layers + [model.criterion])
    assert measured == ledger_formula(N, T, model)
    if d_ff is None:  # Korthikanti et al.'s per-block count, without dropout, in elements
        per_block = activation_elements(N, T, model)["blocks"] / model.n_layers
        assert per_block == 16 * N * T * D + HEADS * N * T * T + 2 * N * T


def test_the_mixed_precision_hook_runs_between_the_parts():
    x, y = tokens(seed=8), tokens(seed=9)
    plain, hooked = randomised(tiny()), randomised(tiny())
    plain.loss_and_grad(x, y)
    calls = []

    def to_float32(a):
        calls.append(a.shape)
        return a.astype(np.float32).astype(np.float64)

    for block in hooked.layers[1:3]:
        for layer in [block, *block.sublayers(), *block.mlp.sublayers()]:
            layer.rounding = to_float32
    hooked.loss(x, y)
    forward_calls = len(calls)
    hooked.backward()
    assert forward_calls == 2 * 7 and len(calls) == 2 * (7 + 5)
    assert 0 < relative_error(hooked.grads, plain.grads) < 1e-5


def test_generate_samples_from_the_model():
    model = randomised(tiny(), scale=0.5)
    prompt = tokens(N=2, T=CONTEXT - 1)
    out = model.generate(prompt, 6, seed=3)
    assert out.shape == (2, CONTEXT + 5) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :CONTEXT - 1], prompt)
    assert out.min() >= 0 and out.max() < V
    np.testing.assert_array_equal(model.generate(prompt, 6, seed=3), out)
    assert not np.array_equal(model.generate(prompt, 6, seed=4), out)
    np.testing.assert_array_equal(model.generate(prompt, 0), prompt)


def test_a_low_temperature_picks_the_argmax():
    model = randomised(tiny(), scale=0.5)
    greedy = tokens(N=3, T=2)
    for _ in range(8):  # the window slides past the context of 5
        logits = model.forward(greedy[:, -CONTEXT:])[:, -1]
        greedy = np.concatenate([greedy, logits.argmax(axis=1)[:, None]], axis=1)
    np.testing.assert_array_equal(model.generate(greedy[:, :2], 8, temperature=1e-6), greedy)
    # so small that logits / temperature would overflow: still the argmax, never NaN
    np.testing.assert_array_equal(model.generate(greedy[:, :2], 8, temperature=1e-320), greedy)


@pytest.mark.parametrize("bad, match", [
    (np.array([[1, 2, 9]]), r"target 9 at \[0, 2\] is outside the vocabulary: targets must lie "
                           r"in \[0, 7\)"),
    (np.array([[1, 2]]), r"targets must have the shape of tokens, \(1, 3\), got \(1, 2\)"),
])
def test_bad_targets_are_named(bad, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model.loss(np.array([[1, 2, 3]]), bad)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_new": -1}, ValueError, "n_new must be an integer >= 0"),
    ({"n_new": 1.5}, TypeError, "n_new must be an integer"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": np.inf}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number > 0"),
])
def test_bad_generate_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny().generate(tokens(), **{"n_new": 2, **kwargs})


@pytest.mark.parametrize("V, context, d, L", [(65, 32, 64, 2), (11, 8, 16, 3), (7, 5, 8, 1)])
def test_parameter_count_and_layout(V, context, d, L):
    model = nn.gpt(V, context, d_model=d, n_heads=2, n_layers=L)
    assert model.num_params == V * d + context * d + L * (12 * d * d + 13 * d) + 2 * d + d * V + V
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [nn.Embedding, *[nn.Block] * L, nn.LayerNorm, nn.Linear]
    assert isinstance(model, nn.Sequential) and isinstance(model.criterion,
                                                           nn.SoftmaxCrossEntropy)
    shapes = {name: model.params[part].size for name, part in model.slices.items()}
    assert shapes["1.attn.W_qkv"] == 3 * d * d and shapes["1.mlp.fc.W"] == 4 * d * d
    names = [name.split(".", 1)[1] for name in model.slices if name.startswith("1.")]
    assert names == ["ln1.gamma", "ln1.beta", "attn.W_qkv", "attn.b_qkv", "attn.W_o", "attn.b_o",
                     "ln2.gamma", "ln2.beta", "mlp.fc.W", "mlp.fc.b", "mlp.proj.W", "mlp.proj.b"]
    assert (model.vocab_size, model.context, model.d_model, model.n_layers, model.d_ff) == (
        V, context, d, L, 4 * d)


def test_init_is_gpt2s_and_deterministic():
    model = nn.gpt(65, 32, d_model=64, n_heads=4, n_layers=2, seed=3)
    np.testing.assert_array_equal(model.params, nn.gpt(65, 32, seed=3).params)
    assert not np.array_equal(model.params, nn.gpt(65, 32, seed=4).params)
    p = {name: model.params[part] for name, part in model.slices.items()}
    for name in ("0.wte", "0.wpe", "1.attn.W_qkv", "2.mlp.fc.W", "4.W"):
        assert p[name].std() == pytest.approx(0.02, rel=0.05)
    for name in ("1.attn.W_o", "2.mlp.proj.W"):
        assert p[name].std() == pytest.approx(0.02 / np.sqrt(4), rel=0.05)
    for name in ("1.attn.b_qkv", "1.attn.b_o", "1.mlp.fc.b", "2.mlp.proj.b", "2.ln1.beta", "4.b"):
        assert not p[name].any()
    assert np.all(p["3.gamma"] == 1) and np.all(p["1.ln2.gamma"] == 1)
