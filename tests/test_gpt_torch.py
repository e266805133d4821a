"""PyTorch's autograd as the oracle: the same GPT rebuilt in torch from the flat buffer, by
parameter name (model.slices), gives the same loss and every named gradient slice."""

import numpy as np
import pytest

from minidist import nn
from minidist.gradcheck import relative_error

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_mlp(p, prefix, h):
    """GELU(h W_fc + b_fc) W_proj + b_proj, the weights p[prefix + ".fc.W"] etc."""
    h = F.gelu(h @ p[f"{prefix}.fc.W"] + p[f"{prefix}.fc.b"], approximate="tanh")
    return h @ p[f"{prefix}.proj.W"] + p[f"{prefix}.proj.b"]


def torch_gpt_logits(model, flat, tokens, ffn=None):
    """GPT-2's forward in torch ops (F.scaled_dot_product_attention with its causal mask, the
    tanh GELU, F.layer_norm), reading every weight from `flat` by its name in model.slices.
    ffn(p, i, h): block i's feed-forward output for its input h (default: the dense MLP)."""
    shapes = {f"{i}.{name}": shape for i, layer in enumerate(model.layers)
              for name, shape in layer.param_shapes().items()}
    p = {name: flat[part].view(shapes[name]) for name, part in model.slices.items()}
    ffn = ffn or (lambda p, i, h: torch_mlp(p, f"{i}.mlp", h))
    T = tokens.shape[1]
    x = p["0.wte"][tokens] + p["0.wpe"][:T]
    for i in range(1, model.n_layers + 1):
        h = F.layer_norm(x, (model.d_model,), p[f"{i}.ln1.gamma"], p[f"{i}.ln1.beta"], 1e-5)
        W, b = p[f"{i}.attn.W_qkv"], p[f"{i}.attn.b_qkv"]
        q, k, v = (torch.einsum("ntd,hde->nhte", h, W[j]) + b[j][None, :, None, :]
                   for j in range(3))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + torch.einsum("nhte,hed->ntd", heads, p[f"{i}.attn.W_o"]) + p[f"{i}.attn.b_o"]
        h = F.layer_norm(x, (model.d_model,), p[f"{i}.ln2.gamma"], p[f"{i}.ln2.beta"], 1e-5)
        x = x + ffn(p, i, h)
    last = model.n_layers + 1
    x = F.layer_norm(x, (model.d_model,), p[f"{last}.gamma"], p[f"{last}.beta"], 1e-5)
    return x @ p[f"{last + 1}.W"] + p[f"{last + 1}.b"]


@pytest.mark.parametrize("kwargs, N, T", [
    ({"vocab_size": 11, "context": 8, "d_model": 16, "n_heads": 2, "n_layers": 2}, 4, 8),
    ({"vocab_size": 13, "context": 9, "d_model": 12, "n_heads": 3, "n_layers": 3, "d_ff": 20},
     3, 6),
    ({"vocab_size": 5, "context": 4, "d_model": 8, "n_heads": 8, "n_layers": 1,
      "recompute": True}, 2, 4),
])
@pytest.mark.parametrize("scale", [None, 0.3])  # GPT-2's init, or every parameter N(0, 0.3²)
def test_loss_and_every_gradient_match_pytorch(kwargs, N, T, scale):
    model = nn.gpt(**kwargs, seed=2)
    rng = np.random.default_rng(0)
    if scale is not None:
        model.params = rng.normal(0.0, scale, model.num_params)
    tokens = rng.integers(0, model.vocab_size, (N, T))
    targets = rng.integers(0, model.vocab_size, (N, T))
    loss = model.loss_and_grad(tokens, targets)

    flat = torch.tensor(model.params, dtype=torch.float64, requires_grad=True)
    logits = torch_gpt_logits(model, flat, torch.from_numpy(tokens))
    expected = F.cross_entropy(logits.reshape(-1, model.vocab_size),
                               torch.from_numpy(targets).reshape(-1))
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-10, abs=0)
    grad = flat.grad.numpy()
    for name, part in model.slices.items():
        assert relative_error(model.grads[part], grad[part]) < 1e-8, name


def test_the_logits_match_pytorch_position_by_position():
    model = nn.gpt(17, 6, d_model=8, n_heads=2, n_layers=2, seed=5)
    model.params = np.random.default_rng(1).normal(0.0, 0.3, model.num_params)
    tokens = np.random.default_rng(2).integers(0, 17, (3, 6))
    expected = torch_gpt_logits(model, torch.tensor(model.params), torch.from_numpy(tokens))
    np.testing.assert_allclose(model.forward(tokens), expected.numpy(), rtol=1e-10, atol=1e-12)
