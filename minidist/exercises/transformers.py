"""Lesson 10 (transformers): causal attention, and LayerNorm's backward."""

import math

import numpy as np

from minidist.exercises._common import Check, _call
from minidist.gradcheck import numerical_gradient, relative_error

# (N, T, d_model, H): d_head = 4, 8, 4; T ≠ d_head, so the weights P and the output differ in shape
ATTENTION_CASES = ((2, 5, 12, 3), (1, 7, 16, 2), (3, 6, 8, 2))


def _attend(q, k, v, mask="causal", scale=None, axis=-1, after=False):
    """softmax(q kᵀ · scale + M) v over `axis`, with the usual mistakes as options: mask
    "causal" (M hides s > t), "none" or "wrong" (hides s < t); after: zero the hidden weights
    after the softmax instead of −∞ before it."""
    T = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.swapaxes(-1, -2) * scale
    hidden = {"causal": np.triu(np.ones((T, T), bool), k=1), "none": np.zeros((T, T), bool),
              "wrong": np.tril(np.ones((T, T), bool), k=-1)}[mask]
    if not after:
        scores = np.where(hidden, -np.inf, scores)
    with np.errstate(invalid="ignore"):
        p = np.exp(scores - scores.max(axis=axis, keepdims=True))
        p /= p.sum(axis=axis, keepdims=True)
    if after:
        p = np.where(hidden, 0.0, p)
    return p @ v


def _attention_mistakes(q, k, v):
    dh = q.shape[-1]
    return [
        (_attend(q, k, v, mask="none"), "position t also sees the later positions s > t: "
         "before the softmax, set the scores above the diagonal (s > t) to −∞"),
        (_attend(q, k, v, mask="wrong"), "the mask is on the wrong side: position t may see "
         "s ≤ t (the lower triangle, diagonal included); hide s > t, np.triu(…, k=1)"),
        (_attend(q, k, v, scale=1.0), f"the scores are not scaled: divide q kᵀ by √d_head = "
         f"√{dh} before the softmax"),
        (_attend(q, k, v, scale=1.0 / dh), f"scale by 1/√d_head = 1/√{dh}, not 1/d_head"),
        (_attend(q, k, v, axis=-2), "the softmax runs over the wrong axis: normalise over the "
         "last axis (the keys s), so that each query t's weights sum to 1"),
        (_attend(q, k, v, after=True), "mask BEFORE the softmax (scores → −∞): weights zeroed "
         "after it no longer sum to 1"),
    ]


def _attention_problem(rng, N, T, d, H):
    """A CausalSelfAttention with weights N(0, 1.5²/d), so the scores are O(1) and the
    softmax far from uniform, after its forward on X ~ N(0, 1) of shape (N, T, d)."""
    from minidist.nn import CausalSelfAttention

    layer = CausalSelfAttention(d, H)
    shapes = layer.param_shapes()
    params = {n: rng.normal(0.0, 1.5 / math.sqrt(d), s) for n, s in shapes.items()}
    layer.bind(params, {n: np.zeros(s) for n, s in shapes.items()})
    layer.forward(rng.normal(size=(N, T, d)))
    heads = layer.O.reshape(N, T, H, d // H).transpose(0, 2, 1, 3)  # (N, H, T, d_head)
    return layer.Q, layer.K, layer.V, heads


def _attention_with(layer, fn, X):
    """`layer`'s forward with the heads computed by fn(Q, K, V): the layer's own forward makes
    Q, K and V, then fn's output goes through W_o as the layer's own heads would."""
    type(layer).forward(layer, X)
    N, T, d = X.shape
    heads = np.asarray(fn(layer.Q.copy(), layer.K.copy(), layer.V.copy()), dtype=X.dtype)
    joined = heads.transpose(0, 2, 1, 3).reshape(N * T, d)  # [O_1 … O_H] per position
    return (joined @ layer.params["W_o"].reshape(d, d) + layer.params["b_o"]).reshape(N, T, d)


def check_causal_attention(fn, seed=0):
    """fn(q, k, v) with q, k, v of shape (N, H, T, d_head) should return the heads' outputs
    softmax(q kᵀ/√d_head + M) v, (N, H, T, d_head), with M[t, s] = −∞ for s > t. Compared with
    minidist's CausalSelfAttention on random inputs, then run inside a GPT's every block."""
    from minidist.nn import gpt

    name = "check_causal_attention"
    rng = np.random.default_rng(seed)
    for N, T, d, H in ATTENTION_CASES:
        q, k, v, want = _attention_problem(rng, N, T, d, H)
        got, failed = _call(name, fn, q.copy(), k.copy(), v.copy())
        if failed is not None:
            return failed
        where = f"with q, k, v of shape {q.shape} (N, H, T, d_head)"
        if got.shape != want.shape:
            hint = {(N, H, T, T): " — the attention weights P: multiply them by v",
                    (N, T, H, d // H): " — keep the heads on axis 1, as q is"}
            return Check(name, False, f"{where}, the output should have shape {want.shape}, "
                                      f"got {got.shape}{hint.get(got.shape, '')}")
        if np.allclose(got, want, rtol=1e-10, atol=1e-12):
            continue
        if not np.isfinite(got).all():
            return Check(name, False, f"{where}, the output holds NaN or inf: a row whose "
                                      "scores are all −∞ (keep the diagonal s = t visible), or "
                                      "exp of large scores (subtract each row's max first)")
        hint = next((h for wrong, h in _attention_mistakes(q, k, v)
                     if np.allclose(got, wrong, rtol=1e-8, atol=1e-10)),
                    f"the output differs from CausalSelfAttention's by up to "
                    f"{np.max(np.abs(got - want)):.3g}")
        return Check(name, False, f"{where}, {hint}")
    model = gpt(13, 8, d_model=16, n_heads=4, n_layers=2, seed=seed)
    model.params = rng.normal(0.0, 0.5, model.num_params)  # attention far from uniform
    tokens = rng.integers(0, 13, (2, 8))
    want = model.forward(tokens)
    for block in model.layers[1:-2]:
        block.attn.forward = lambda X, layer=block.attn: _attention_with(layer, fn, X)
    got, failed = _call(name, model.forward, tokens)
    if failed is not None:
        return failed
    if not np.allclose(got, want, rtol=1e-9, atol=1e-12):
        gap = float(np.max(np.abs(got - want)))
        return Check(name, False, f"right on the random problems, but a GPT with your attention "
                                  f"in its 2 blocks gives logits off by up to {gap:.3g}: does "
                                  "your function keep state or change its inputs?")
    return Check(name, True, f"matches CausalSelfAttention on {len(ATTENTION_CASES)} random "
                             "problems, and a 2-block GPT using it in every block gives the "
                             "same logits")


# (shape of x, eps): a square batch (a sum over the wrong axis keeps the shape), 3-D, and one
# row of small variance where eps matters
LAYERNORM_CASES = (((5, 5), 1e-5), ((2, 3, 4), 1e-5), ((1, 6), 1e-2))


def _layernorm(x, gamma, beta, eps):
    """minidist's LayerNorm forward, y = γ ⊙ (x − μ)/√(σ² + ε) + β over the last axis."""
    from minidist.nn import LayerNorm

    layer = LayerNorm(x.shape[-1], eps)
    layer.bind({"gamma": gamma, "beta": beta}, {})
    return layer.forward(x)


def _layernorm_problem(rng, shape, eps):
    """dy, x, gamma and (dx, dgamma, dbeta) of Σ dy ⊙ y by central finite differences."""
    scale = 0.1 if eps > 1e-3 else 1.0  # σ² ≈ 0.01 ~ eps: forgetting eps shows
    x, dy = rng.normal(0.0, scale, shape) + 0.3, rng.normal(size=shape)
    gamma, beta = rng.normal(1.0, 0.5, shape[-1]), rng.normal(size=shape[-1])
    f = lambda x_, g_, b_: float(np.sum(dy * _layernorm(x_, g_, b_, eps)))  # noqa: E731
    want = (numerical_gradient(lambda x_: f(x_, gamma, beta), x.copy()),
            numerical_gradient(lambda g_: f(x, g_, beta), gamma.copy()),
            numerical_gradient(lambda b_: f(x, gamma, b_), beta.copy()))
    return dy, x, gamma, want


def _parts(x, eps):
    """x̂ = (x − μ)/σ and 1/σ over the last axis."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    return centred * inv, inv


def _mean(a):
    return a.mean(axis=-1, keepdims=True)


def _layernorm_mistakes(dy, x, gamma, eps):
    """{dx, dgamma, dbeta: [(a usual wrong answer, its hint)]}."""
    x_hat, inv = _parts(x, eps)
    g, d = gamma * dy, x.shape[-1]

    def dx(g_, x_hat_, inv_):
        return inv_ * (g_ - _mean(g_) - x_hat_ * _mean(g_ * x_hat_))

    wrong_axis = "summed over the wrong axis: sum over every axis but the last (the rows), " \
                 "one value per feature"
    square = x.ndim == 2 and x.shape[0] == d  # a sum over the last axis keeps the shape
    return {
        "dx": [
            (inv * (g - x_hat * _mean(g * x_hat)), "dx misses the mean's path: μ depends on "
             "every x_i, which subtracts mean(ĝ) (ĝ = γ ⊙ ∂y)"),
            (inv * (g - _mean(g)), "dx misses the variance's path: σ depends on x too, which "
             "subtracts x̂ ⊙ mean(ĝ ⊙ x̂)"),
            (inv * g, "dx = ĝ/σ treats μ and σ as constants, but both depend on x: ∂x = "
             "(1/σ)(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))"),
            (dx(dy, x_hat, inv), "multiply ∂y by γ first: ∂x's formula needs ĝ = γ ⊙ ∂y"),
            (dx(g, *_parts(x, 1e-5)), f"use the eps you are given (here {eps}), not 1e-5"),
        ],
        "dgamma": [(dy.reshape(-1, d).sum(axis=0), "dgamma is Σ ∂y, which is dbeta: dgamma = "
                    "Σ ∂y ⊙ x̂")] + ([((dy * x_hat).sum(axis=-1), f"dgamma is {wrong_axis}")]
                                    if square else []),
        "dbeta": [((dy * x_hat).reshape(-1, d).sum(axis=0), "dbeta is Σ ∂y ⊙ x̂, which is "
                   "dgamma: dbeta = Σ ∂y")] + ([(dy.sum(axis=-1), f"dbeta is {wrong_axis}")]
                                               if square else []),
    }


def check_layernorm_backward(fn, seed=0):
    """fn(dy, x, gamma, eps=1e-5) should return (dx, dgamma, dbeta), the gradients of a loss
    with ∂L/∂y = dy for y = γ ⊙ (x − μ)/√(σ² + eps) + β over the last axis. The reference is
    central finite differences (minidist.gradcheck) of minidist's LayerNorm forward."""
    name = "check_layernorm_backward"
    rng = np.random.default_rng(seed)
    for shape, eps in LAYERNORM_CASES:
        dy, x, gamma, want = _layernorm_problem(rng, shape, eps)
        got, failed = _call(name, fn, dy.copy(), x.copy(), gamma.copy(), eps,
                            convert=lambda grads: [np.asarray(g, np.float64) for g in grads])
        if failed is not None:
            return failed
        where = f"with x of shape {shape} and eps = {eps}"
        if len(got) != 3:
            return Check(name, False, f"{where}: return three arrays, (dx, dgamma, dbeta)")
        mistakes = _layernorm_mistakes(dy, x, gamma, eps)
        for label, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            if g.shape != w.shape:
                hint = "" if label == "dx" else (
                    f": sum over every axis but the last, one value per feature (gamma's "
                    f"shape {w.shape})")
                return Check(name, False, f"{where}, {label} should have shape {w.shape}, got "
                                          f"{g.shape}{hint}")
            error = relative_error(g, w)
            if error < 1e-6:
                continue
            hint = next((h for wrong, h in mistakes[label] if wrong.shape == g.shape and
                         relative_error(g, wrong) < 1e-6),
                        f"{label} differs from finite differences (relative error {error:.2g})")
            return Check(name, False, f"{where}, {hint}")
    return Check(name, True, f"dx, dgamma and dbeta agree with central finite differences on "
                             f"{len(LAYERNORM_CASES)} shapes, up to 3-D")
