"""PyTorch's autograd as the oracle of a mixture-of-experts GPT: the same model rebuilt in torch
from the flat buffer, its MoE blocks written the dense way (GShard's combine weights: every
expert on every token, weighted by its kept gate), gives the same loss and every gradient."""

import numpy as np
import pytest
from test_gpt_torch import torch_gpt_logits, torch_mlp

from minidist import nn
from minidist.gradcheck import relative_error

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_moe(moe, aux):
    """Block i's MoE in torch, as ffn(p, i, h) for torch_gpt_logits; appends aux_loss_coef · aux
    to `aux`. The top-k by torch.topk, the capacity by a cumulative count along T."""
    E, k = moe.n_experts, moe.top_k

    def ffn(p, i, h):
        N, T, _ = h.shape
        probs = torch.softmax(h @ p[f"{i}.moe.router.W"] + p[f"{i}.moe.router.b"], dim=-1)
        top = torch.topk(probs, k, dim=-1).indices  # (N, T, k)
        chose = F.one_hot(top, E).sum(dim=2)  # (N, T, E) of 0 / 1
        if moe.capacity_factor is not None:
            C = int(np.ceil(moe.capacity_factor * k * T / E))
            chose = chose * ((torch.cumsum(chose, dim=1) - chose) < C)
        combine = probs * chose  # the gate where the token was kept, else 0
        out = sum(combine[..., e:e + 1] * torch_mlp(p, f"{i}.moe.experts.{e}", h)
                  for e in range(E))
        f = F.one_hot(top[..., 0], E).to(probs.dtype).mean(dim=1)
        aux.append(moe.aux_loss_coef * E * (f * probs.mean(dim=1)).sum(dim=1).mean())
        return out
    return ffn


@pytest.mark.parametrize("kwargs, N, T", [
    ({"n_experts": 4, "top_k": 2, "capacity_factor": 0.75}, 4, 8),
    ({"n_experts": 3, "top_k": 1, "capacity_factor": 0.5, "aux_loss_coef": 0.3}, 3, 6),
    ({"n_experts": 4, "top_k": 3, "recompute": True}, 2, 8),
])
def test_loss_and_every_gradient_match_pytorch(kwargs, N, T):
    model = nn.gpt(11, 8, d_model=16, n_heads=2, n_layers=2, d_ff=24, seed=2, **kwargs)
    rng = np.random.default_rng(0)
    model.params = rng.normal(0.0, 0.3, model.num_params)
    tokens, targets = rng.integers(0, 11, (N, T)), rng.integers(0, 11, (N, T))
    loss = model.loss_and_grad(tokens, targets)
    if "capacity_factor" in kwargs:
        assert all(block.moe.dropped > 0 for block in model.layers[1:3])

    flat = torch.tensor(model.params, dtype=torch.float64, requires_grad=True)
    aux = []
    logits = torch_gpt_logits(model, flat, torch.from_numpy(tokens),
                              torch_moe(model.layers[1].moe, aux))
    expected = F.cross_entropy(logits.reshape(-1, 11), torch.from_numpy(targets).reshape(-1))
    expected = expected + sum(aux)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-10, abs=0)
    grad = flat.grad.numpy()
    for name, part in model.slices.items():
        assert relative_error(model.grads[part], grad[part]) < 1e-10, name
    router = model.slices["1.moe.router.W"]
    assert np.abs(grad[router]).max() > 1e-4
