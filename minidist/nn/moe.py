"""Mixture of experts (Switch Transformer, GShard): a block's MLP becomes E expert MLPs and a
router that sends each token to k of them.

For the rows x_r of X (N, T, d), r = (n, t) in row-major order:

    z_r = x_r W + b,   p_r = softmax(z_r) over the E experts                     the router
    e_r1 … e_rk: the k most probable experts, best first (ties: the lower index)  top-k
    y_r = Σ_j kept_rj · g_rj · expert_{e_rj}(x_r),   g_rj = p_r[e_rj]             the gates

The gates are the chosen probabilities themselves, not renormalised over the k: Switch (k = 1,
Fedus et al. 2021) and DeepSeekMoE and Qwen-MoE (k > 1) do this; GShard (Lepikhin et al. 2020)
and Mixtral renormalise the k gates to sum to 1, which for k = 1 makes every gate 1 and leaves
the router no gradient from the task loss. The router is a Linear with a bias (Switch's and
Mixtral's have none; ours starts at 0).

Capacity (GShard's groups, one group per sequence): with capacity_factor, each expert takes at
most C = ⌈capacity_factor · k · T / E⌉ of a sequence's assignments, first come first served in
token order: assignment (n, t, j) is kept iff fewer than C of the tokens t' < t of sequence n
chose the same expert. So a token's output depends on no later token (the model stays causal)
and on no other sequence (a batch split over ranks or micro-batches routes as the whole batch),
and a token dropped by all its experts passes through the residual unchanged (y_r = 0).

Load balancing (Switch's auxiliary loss, per sequence, then the mean over sequences):

    aux = (1/N) Σ_n E · Σ_e f_ne · P_ne,   f_ne = (1/T) #{t : e_(n,t)1 = e}  (the top-1 choice,
                                                                   before drops, as Switch, GShard)
                                           P_ne = (1/T) Σ_t p_(n,t)[e]

1 when the router is uniform; the model's loss adds aux_loss_coef · aux for every MoE layer.

Backward: top-k, the capacity drops and f are piecewise constant in z, so the gradient reaches
the router through the gate values and P only (∂aux/∂p_(n,t)[e] = E · f_ne / (N·T)):

    ∂g_rj = ⟨∂y_r, expert_{e_rj}(x_r)⟩,   ∂(expert input)_rj = g_rj ∂y_r  (kept only)
    ∂z_r = p_r ⊙ (∂p_r − ⟨∂p_r, p_r⟩),   ∂x_r = Σ_j kept_rj ∂expert_rj + ∂z_r Wᵀ
"""

import math
from fractions import Fraction

import numpy as np

from minidist.data import check_integer, is_integer
from minidist.nn.attention import INIT_STD
from minidist.nn.layers import walk
from minidist.nn.transformer import MLP, Composite, _linear


def _check_number(name, value, allowed, ok):
    """A TypeError unless value is a real number (not a bool), a ValueError unless ok(value)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_moe(n_experts, top_k, capacity_factor, aux_loss_coef):
    """A TypeError / ValueError naming the first bad MoE argument: n_experts an integer >= 1,
    top_k one in [1, n_experts], capacity_factor None or a finite number > 0, aux_loss_coef a
    finite number >= 0."""
    check_integer("n_experts", n_experts)
    check_integer("top_k", top_k)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts} (each token goes to "
                         f"top_k different experts)")
    if capacity_factor is not None:
        _check_number("capacity_factor", capacity_factor, "None or a finite number > 0",
                      lambda v: v > 0)
    _check_number("aux_loss_coef", aux_loss_coef, "a finite number >= 0", lambda v: v >= 0)


def block_keywords(n_experts, top_k=1, capacity_factor=None, aux_loss_coef=0.01):
    """nn.gpt's MoE arguments checked (check_moe), as Block keywords: {} for the dense GPT
    (n_experts None or 0, which takes no top_k or capacity_factor)."""
    if n_experts is None or (is_integer(n_experts) and n_experts == 0):
        if top_k != 1 or capacity_factor is not None:
            raise ValueError(f"top_k={top_k!r} and capacity_factor={capacity_factor!r} route "
                             f"tokens to experts: they need n_experts >= 1 (n_experts="
                             f"{n_experts!r} builds the dense GPT)")
        _check_number("aux_loss_coef", aux_loss_coef, "a finite number >= 0", lambda v: v >= 0)
        return {}
    check_moe(n_experts, top_k, capacity_factor, aux_loss_coef)
    return {"n_experts": int(n_experts), "top_k": int(top_k),
            "capacity_factor": capacity_factor, "aux_loss_coef": aux_loss_coef}


class MoE(Composite):
    """E expert MLPs (d → d_ff → d, GELU, each an `MLP`) behind a top-k router (a Linear d → E).

    Parameters: "router.W", "router.b", then "experts.{e}.fc.W", "experts.{e}.fc.b",
    "experts.{e}.proj.W", "experts.{e}.proj.b" for e = 0 … E−1: each expert's weights one
    contiguous slice of the flat buffer (expert parallelism hands a rank whole slices).

    After forward (N, T, d), for lessons and tests (with recompute they are let go after the
    forward, and rebuilt by the backward):
        probs       (N, T, E)  the router's probabilities p
        assignment  (N, T, k)  the experts each token chose, best first (before drops)
        kept        (N, T, k)  whether that assignment found room (all True without capacity)
        counts      (E,)       the tokens each expert processed (kept assignments)
        dropped                the number of dropped (token, expert) assignments
        capacity               C per expert and sequence (None without capacity_factor)
        aux_loss               this layer's aux (a float, before aux_loss_coef)

    loss_weight: the weight the training gives this forward's loss in the step's gradient, 1
    when the strategy scales the gradient after backward (single, data parallel, ZeRO); the
    backward seeds aux with aux_loss_coef · loss_weight (· the fp16 loss scale S, which mixed
    precision's `rounding` carries), as the task loss's gradient arrives scaled by them.
    """

    loss_weight = 1.0

    def __init__(self, d_model, d_ff, n_experts, top_k=1, capacity_factor=None,
                 aux_loss_coef=0.01, proj_std=INIT_STD):
        check_moe(n_experts, top_k, capacity_factor, aux_loss_coef)
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.aux_loss_coef = float(aux_loss_coef)
        self.router = _linear(d_model, n_experts, INIT_STD)
        self.experts = [MLP(d_model, d_ff, proj_std) for _ in range(n_experts)]
        self.aux_loss, self.dropped, self.capacity = None, None, None

    def __repr__(self):
        cf = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}"
        return (f"MoE({self.n_experts} × MLP({self.d_model}→{self.d_ff}→{self.d_model}), "
                f"top_k={self.top_k}{cf})")

    def parts(self):
        return {"router": self.router, **{f"experts.{e}": x for e, x in enumerate(self.experts)}}

    def forward(self, X):
        if X.ndim != 3 or X.shape[2] != self.d_model:
            raise ValueError(f"{self} expects input of shape (N, T, {self.d_model}), got "
                             f"{X.shape}")
        N, T, _ = X.shape
        E, k = self.n_experts, self.top_k
        rows = X.reshape(N * T, self.d_model)
        z = self.rounded(self.router.forward(rows))
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        choice = np.argsort(-p, axis=1, kind="stable")[:, :k]  # (N·T, k), best first
        chose = np.zeros((N, T, E), np.int64)
        np.put_along_axis(chose, choice.reshape(N, T, k), 1, axis=2)
        if self.capacity_factor is None:
            self.capacity, kept = None, np.ones((N * T, k), bool)
        else:  # position in the expert's queue: the earlier tokens of my sequence that chose it
            # exact: ⌈1.1 · 50 / 5⌉ is 11, but 1.1 * 50 / 5 in floats is 11.000000000000002
            self.capacity = math.ceil(Fraction(str(self.capacity_factor)) * k * T / E)
            before = (np.cumsum(chose, axis=1) - chose).reshape(N * T, E)
            kept = np.take_along_axis(before, choice, axis=1) < self.capacity
        top1 = chose if k == 1 else np.eye(E, dtype=np.int64)[choice[:, 0]].reshape(N, T, E)
        f, P = top1.mean(axis=1), p.reshape(N, T, E).mean(axis=1)  # (N, E) each
        self.aux_loss = float(E * (f * P).sum(axis=1).mean())
        self.f, self.probs = f, p.reshape(N, T, E)
        self.assignment, self.kept = choice.reshape(N, T, k), kept.reshape(N, T, k)
        # the kept assignments r·k + j grouped by expert (token order within one): a dispatch
        flat = choice.reshape(-1)
        self.order = np.flatnonzero(kept.reshape(-1))
        self.order = self.order[np.argsort(flat[self.order], kind="stable")]
        self.counts = np.bincount(flat[self.order], minlength=E)
        self.dropped = int(N * T * k - self.counts.sum())
        self.gates = np.take_along_axis(p, choice, axis=1)  # (N·T, k)
        out = np.zeros_like(rows)
        outputs = self.experts_forward(rows)
        for (_, a, r), h in zip(self._dispatch(), outputs, strict=True):
            out[r] += self.gates.reshape(-1)[a][:, None] * h
        self.H = np.concatenate(outputs)  # every expert's outputs, in dispatch order
        return out.reshape(X.shape)

    def experts_forward(self, rows):
        """[expert_e(rows[r]) for each expert e and its kept rows r, in token order]: the
        experts' part of the forward (rows: the N·T token rows). Expert parallelism
        (minidist.parallel.expert_parallel) overrides it and the backward's twin
        `experts_backward` to run the experts on other ranks."""
        return [self.rounded(self.experts[e].forward(rows[r]))
                for e, (_, _, r) in enumerate(self._dispatch())]

    def experts_backward(self, d_outputs):
        """[∂(expert e's input rows)] from [∂(expert e's outputs)], expert by expert."""
        return [self.experts[e].backward(d) for e, d in enumerate(d_outputs)]

    def _dispatch(self):
        """Per expert e: (its span of the dispatch order, its kept assignments r·k + j, their
        rows r), in token order."""
        ends = np.cumsum(self.counts)
        for e in range(self.n_experts):
            span = slice(ends[e] - self.counts[e], ends[e])
            a = self.order[span]
            yield span, a, a // self.top_k

    def backward(self, dY):
        N, T, d = dY.shape
        E, k = self.n_experts, self.top_k
        dY = dY.reshape(N * T, d)
        dX, d_gates = np.zeros_like(dY), np.zeros(N * T * k, dY.dtype)
        spans = list(self._dispatch())
        for span, a, r in spans:
            d_gates[a] = (dY[r] * self.H[span]).sum(axis=1)
        d_inputs = self.experts_backward(
            [self.rounded(self.gates.reshape(-1)[a][:, None] * dY[r]) for _, a, r in spans])
        for (_, _, r), d_rows in zip(spans, d_inputs, strict=True):
            dX[r] += d_rows
        dp = np.zeros((N * T, E), dY.dtype)
        np.put_along_axis(dp, self.assignment.reshape(N * T, k), d_gates.reshape(N * T, k),
                          axis=1)
        seed = self.aux_loss_coef * self.loss_weight * getattr(self.rounding, "scale", 1.0)
        dp += np.repeat(seed * E / (N * T) * self.f, T, axis=0).astype(dY.dtype)
        p = self.probs.reshape(N * T, E)
        dz = p * (dp - (dp * p).sum(axis=1, keepdims=True))
        return (dX + self.router.backward(self.rounded(dz))).reshape(N, T, d)


def moe_layers(layers):
    """The MoE layers among `layers` and their sublayers (a GPT's blocks hold them)."""
    return [layer for layer in walk(layers) if isinstance(layer, MoE)]


def aux_loss(layers):
    """Σ over the MoE layers among `layers` of aux_loss_coef · aux, after their forward: what a
    mixture-of-experts GPT adds to its task loss."""
    return sum(layer.aux_loss_coef * layer.aux_loss for layer in moe_layers(layers))
