"""Lesson 10 (transformers): causal attention, and LayerNorm's backward.

Each checker first compares the learner's function with an independent reference on random
problems (minidist's CausalSelfAttention; central finite differences), so that a failure names
the mask, the scale, the axis or the missing path; then it puts the function INSIDE a GPT
(every block's attention core, or every LayerNorm's backward) trained on 2 data-parallel thread
ranks, and compares the training with one process (float64, 1e-10).
"""

import contextlib
import functools
import math

import numpy as np

from minidist.exercises._common import Check, Exercise, _call, _check_timeout, _differs, _train
from minidist.gradcheck import numerical_gradient, relative_error

VOCAB, CONTEXT = 13, 8  # the GPT of the runs: d = 16, 4 heads of d_h = 4, two blocks
GPT_RUN = {"steps": 3, "batch_size": 8, "lr": 0.1}

# (N, T, d_model, H): d_head = 4, 8, 4; T ≠ d_head, so the weights P and the output differ in shape
ATTENTION_CASES = ((2, 5, 12, 3), (1, 7, 16, 2), (3, 6, 8, 2))


def _attend(q, k, v, mask="causal", scale=None, axis=-1, after=False):
    """softmax(q kᵀ · scale + M) v over `axis`, with the usual mistakes as options: mask
    "causal" (M hides s > t), "none", "ahead" (hides s > t + 1) or "wrong" (hides s < t);
    after: zero the hidden weights after the softmax instead of −∞ before it."""
    T = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.swapaxes(-1, -2) * scale
    hidden = {"causal": np.triu(np.ones((T, T), bool), k=1), "none": np.zeros((T, T), bool),
              "ahead": np.triu(np.ones((T, T), bool), k=2),
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
        (_attend(q, k, v, mask="ahead"), "the mask is off by one: position t also sees s = t + 1 "
         "(the next token, the very one it must predict); hide every s > t, np.triu(…, k=1)"),
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


@contextlib.contextmanager
def attention_core(fn):
    """Inside: every CausalSelfAttention's core (softmax(Q Kᵀ/√d_h + M) V) returns
    fn(Q, K, V), the layer's own arrays (on thread ranks, which share the class); the layer
    still keeps its own P for the backward. Restored after, even on error."""
    from minidist.nn.attention import CausalSelfAttention

    saved = CausalSelfAttention.__dict__["attend"]

    def attend(self):
        saved(self)  # P, which the backward needs
        return np.asarray(fn(self.Q, self.K, self.V), dtype=self.Q.dtype)

    CausalSelfAttention.attend = attend
    try:
        yield
    finally:
        CausalSelfAttention.attend = saved


def _gpt_problem():
    """The model, inputs, targets and single-process History of the runs."""
    from minidist import nn, train

    tokens = np.random.default_rng(0).integers(0, VOCAB, (32, CONTEXT + 1))
    model_fn = functools.partial(nn.gpt, VOCAB, CONTEXT, d_model=16, n_heads=4, n_layers=2,
                                 seed=1)
    return model_fn, tokens[:, :-1], tokens[:, 1:], train(model_fn, tokens[:, :-1],
                                                         tokens[:, 1:], **GPT_RUN)


def _gpt_run(hook, fn, timeout):
    """Train a GPT on 2 data-parallel thread ranks with `hook(fn)` in place: (why the run
    failed, None), (None, where it left one process's training) or (None, None)."""
    model_fn, X, Y, single = _gpt_problem()
    with hook(fn):
        hist, failure = _train(model_fn, X, Y, timeout, strategy="data_parallel", workers=2,
                               **GPT_RUN)
    return failure, None if failure else _differs(hist, single)


def check_causal_attention(fn, seed=0, timeout=30.0):
    """fn(q, k, v) with q, k, v of shape (N, H, T, d_head) should return the heads' outputs
    softmax(q kᵀ/√d_head + M) v, (N, H, T, d_head), with M[t, s] = −∞ for s > t. Compared with
    minidist's CausalSelfAttention on random inputs, then run as the attention of every block
    of a GPT trained on 2 data-parallel thread ranks, which must train as one process."""
    name = "check_causal_attention"
    _check_timeout(timeout)
    rng = np.random.default_rng(seed)
    for N, T, d, H in ATTENTION_CASES:
        q, k, v, want = _attention_problem(rng, N, T, d, H)
        given = (q.copy(), k.copy(), v.copy())
        got, failed = _call(name, fn, *given)
        if failed is not None:
            return failed
        where = f"with q, k, v of shape {q.shape} (N, H, T, d_head)"
        changed = [n for n, a, b in zip("qkv", given, (q, k, v), strict=True)
                   if not np.array_equal(a, b)]
        if changed:
            return Check(name, False, f"{where}, your function changed {', '.join(changed)} "
                                      "in place: the layer's backward needs them as they were")
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
    failure, differs = _gpt_run(attention_core, fn, timeout)
    if failure or differs:
        return Check(name, False, f"right on the random problems, but in a GPT trained on 2 "
                                  f"data-parallel thread ranks with your attention in its 2 "
                                  f"blocks, {failure or differs}"
                                  + (": does your function keep state between calls?"
                                     if differs else ""))
    return Check(name, True, f"matches CausalSelfAttention on {len(ATTENTION_CASES)} random "
                             "problems, and a GPT with it in every block trains on 2 "
                             "data-parallel ranks as one process does")


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


@contextlib.contextmanager
def layernorm_backward(fn):
    """Inside: every LayerNorm keeps its input x, and its backward is fn(dy, x, γ, ε): dγ and
    dβ go into the layer's gradients, dx back to the layer below (thread ranks share the
    class). Restored after, even on error."""
    from minidist.nn.gpt_layers import LayerNorm

    saved = {name: LayerNorm.__dict__[name] for name in ("forward", "backward")}

    def forward(self, X):
        self.x_in = X
        return saved["forward"](self, X)

    def backward(self, dY):
        dx, dgamma, dbeta = fn(dY, self.x_in, self.params["gamma"], self.eps)
        self.grads["gamma"][...] = dgamma
        self.grads["beta"][...] = dbeta
        return np.asarray(dx, dtype=dY.dtype)

    LayerNorm.forward, LayerNorm.backward = forward, backward
    try:
        yield
    finally:
        LayerNorm.forward, LayerNorm.backward = saved["forward"], saved["backward"]


def check_layernorm_backward(fn, seed=0, timeout=30.0):
    """fn(dy, x, gamma, eps=1e-5) should return (dx, dgamma, dbeta), the gradients of a loss
    with ∂L/∂y = dy for y = γ ⊙ (x − μ)/√(σ² + eps) + β over the last axis. The reference is
    central finite differences (minidist.gradcheck) of minidist's LayerNorm forward; then fn is
    the backward of every LayerNorm of a GPT trained on 2 data-parallel thread ranks, which must
    train as one process."""
    name = "check_layernorm_backward"
    _check_timeout(timeout)
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
    failure, differs = _gpt_run(layernorm_backward, fn, timeout)
    if failure or differs:
        return Check(name, False, f"dx, dgamma and dbeta agree with finite differences, but in "
                                  f"a GPT trained on 2 data-parallel thread ranks with your "
                                  f"backward in its 5 LayerNorms, {failure or differs}"
                                  + (": compute in float64 (finite differences are only good "
                                     "to about 1e-6), keep no state between calls, and change "
                                     "none of your inputs" if differs else ""))
    return Check(name, True, f"dx, dgamma and dbeta agree with central finite differences on "
                             f"{len(LAYERNORM_CASES)} shapes, up to 3-D, and a GPT with them in "
                             "every LayerNorm trains on 2 data-parallel ranks as one process does")


__all__ = ["check_causal_attention", "check_layernorm_backward"]

EXERCISES = (
    Exercise(10, "my_causal_attention", check_causal_attention, "causal_attention",
             "causal attention's core, run in every block of a GPT trained on 2 data-parallel "
             "thread ranks"),
    Exercise(10, "my_layernorm_backward", check_layernorm_backward, "layernorm_backward",
             "LayerNorm's backward, run in every LayerNorm of a GPT trained on 2 data-parallel "
             "thread ranks"),
)
