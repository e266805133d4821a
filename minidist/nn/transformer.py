"""A tiny GPT (GPT-2's architecture, pre-LayerNorm) with explicit forward and backward.

    x   = wte[tokens] + wpe[:T]                              Embedding
    x   = x + attn(ln1(x));   x = x + mlp(ln2(x))            Block, n_layers times
    out = ln_f(x) W + b                                      LayerNorm, then the LM head (Linear)
    L   = mean over the N·T positions of −log softmax(out)[target]

mlp(x) = GELU(x W_fc + b_fc) W_proj + b_proj with d_ff = 4·d_model. A GPT is a Sequential, so its
parameters are ONE flat buffer and every training strategy runs it unchanged; a Block is one
layer (its parts are its `sublayers()`), so a pipeline stage holds whole blocks.
"""

import math

import numpy as np

from minidist.data import check_integer
from minidist.nn.attention import INIT_STD, CausalSelfAttention
from minidist.nn.gpt_layers import GELU, Embedding, LayerNorm
from minidist.nn.layers import Layer, Linear, drop_activations
from minidist.nn.losses import SoftmaxCrossEntropy
from minidist.nn.model import Sequential


def _linear(d_in, d_out, std):
    """A Linear whose initial W ~ N(0, std²) (Linear draws N(0, gain/d_in))."""
    return Linear(d_in, d_out, gain=d_in * std**2)


class Composite(Layer):
    """A layer made of named parts (the attributes named in PARTS, in order). Its parameters are
    its parts', named "part.name"; bind and init_params hand each part its own views."""

    PARTS = ()

    def parts(self):
        return {name: getattr(self, name) for name in self.PARTS}

    def sublayers(self):
        return list(self.parts().values())

    def param_shapes(self):
        return {f"{p}.{name}": shape for p, part in self.parts().items()
                for name, shape in part.param_shapes().items()}

    def _views(self, views, p, part):
        return {name: views[f"{p}.{name}"] for name in part.param_shapes()}

    def bind(self, params, grads):
        super().bind(params, grads)
        for p, part in self.parts().items():
            part.bind(self._views(params, p, part), self._views(grads, p, part))

    def init_params(self, params, rng):
        for p, part in self.parts().items():
            part.init_params(self._views(params, p, part), rng)


class MLP(Composite):
    """x ↦ GELU(x W_fc + b_fc) W_proj + b_proj, d → d_ff → d; W_proj ~ N(0, proj_std²)."""

    PARTS = ("fc", "gelu", "proj")

    def __init__(self, d_model, d_ff, proj_std):
        self.fc, self.gelu = _linear(d_model, d_ff, INIT_STD), GELU()
        self.proj = _linear(d_ff, d_model, proj_std)

    def __repr__(self):
        return f"MLP({self.fc.d_in}→{self.fc.d_out}→{self.proj.d_out})"

    def forward(self, X):
        h = self.rounded(self.gelu.forward(self.rounded(self.fc.forward(X))))
        return self.proj.forward(h)

    def backward(self, dY):
        dh = self.rounded(self.gelu.backward(self.rounded(self.proj.backward(dY))))
        return self.fc.backward(dh)


class Block(Composite):
    """x + attn(ln1(x)), then x + mlp(ln2(x)): a pre-LayerNorm transformer block.

    With n_experts, its feed-forward part is a mixture of experts, `moe` (minidist.nn.moe.MoE:
    n_experts MLPs, each token sent to top_k of them), in place of `mlp`; `ffn` is whichever
    it has. With recompute (activation checkpointing), forward keeps only the block's input `x`
    and drops its parts' caches; backward first reruns the forward from x to rebuild them, calls
    `watch` (minidist.memory.track sets it: the moment the block holds the most) and drops them
    again when done. Every intermediate passes through `rounded` (mixed precision's hook,
    identity by default).
    """

    PARTS = ("ln1", "attn", "ln2", "mlp")
    watch = None

    def __init__(self, d_model, n_heads, d_ff, residual_std=INIT_STD, recompute=False,
                 n_experts=None, top_k=1, capacity_factor=None, aux_loss_coef=0.01):
        self.ln1, self.ln2 = LayerNorm(d_model), LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, out_std=residual_std)
        if n_experts:
            from minidist.nn.moe import MoE  # moe.py builds its experts from this module's MLP

            self.PARTS = ("ln1", "attn", "ln2", "moe")
            self.moe = MoE(d_model, d_ff, n_experts, top_k, capacity_factor, aux_loss_coef,
                           residual_std)
        else:
            self.mlp = MLP(d_model, d_ff, residual_std)
        self.recompute, self.x = recompute, None

    @property
    def ffn(self):
        """The feed-forward part: `mlp`, or `moe` for a mixture-of-experts block."""
        return getattr(self, self.PARTS[3])

    def __repr__(self):
        ffn = (f"d_ff={self.mlp.fc.d_out}" if self.PARTS[3] == "mlp" else
               f"d_ff={self.moe.d_ff}, experts={self.moe.n_experts}, top_k={self.moe.top_k}")
        return (f"Block(d_model={self.attn.d_model}, heads={self.attn.n_heads}, "
                f"{ffn}{', recompute' if self.recompute else ''})")

    def forward(self, x):
        out = self._forward(x)
        if self.recompute:
            self.x = x
            drop_activations(self.sublayers())
        return out

    def _forward(self, x):
        r = self.rounded
        x = r(x + r(self.attn.forward(r(self.ln1.forward(x)))))
        return x + r(self.ffn.forward(r(self.ln2.forward(x))))

    def backward(self, d):
        if self.recompute:
            self._forward(self.x)
            if self.rounding is not None:  # mixed precision: as a stored block's, in 16 bits
                self.rounding.as_stored(self.sublayers(), self.watch)
            elif self.watch is not None:
                self.watch()
        r = self.rounded
        d = r(d + self.ln2.backward(r(self.ffn.backward(d))))
        d = d + self.ln1.backward(r(self.attn.backward(d)))
        if self.recompute:
            self.x = None
            drop_activations(self.sublayers())
        return d


class GPT(Sequential):
    """[Embedding, Block × n_layers, LayerNorm, Linear(d_model, vocab_size)] with the mean
    softmax cross-entropy over all N·T positions (plus, with n_experts, aux_loss_coef times
    each MoE block's load-balancing loss). Built and checked by `gpt`."""

    def __init__(self, vocab_size, context, d_model=64, n_heads=4, n_layers=2, d_ff=None, seed=0,
                 dtype=np.float64, recompute=False, n_experts=None, top_k=1,
                 capacity_factor=None, aux_loss_coef=0.01):
        for name, value in (("vocab_size", vocab_size), ("context", context),
                            ("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers)):
            check_integer(name, value)
        d_ff = 4 * d_model if d_ff is None else d_ff
        check_integer("d_ff", d_ff)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (each "
                             f"head gets d_model / n_heads dimensions)")
        if not isinstance(recompute, (bool, np.bool_)):
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        from minidist.nn.moe import block_keywords  # moe.py builds on this module's MLP

        moe = block_keywords(n_experts, top_k, capacity_factor, aux_loss_coef)
        self.vocab_size, self.context, self.d_model = int(vocab_size), int(context), int(d_model)
        self.n_heads, self.n_layers, self.d_ff = int(n_heads), int(n_layers), int(d_ff)
        self.recompute = bool(recompute)
        self.n_experts = moe["n_experts"] if moe else None
        residual_std = INIT_STD / math.sqrt(2 * self.n_layers)  # GPT-2's residual scaling
        layers = [Embedding(self.vocab_size, self.context, self.d_model)]
        layers += [Block(self.d_model, self.n_heads, self.d_ff, residual_std, self.recompute,
                         **moe) for _ in range(self.n_layers)]
        layers += [LayerNorm(self.d_model), _linear(self.d_model, self.vocab_size, INIT_STD)]
        super().__init__(layers, SoftmaxCrossEntropy(), seed=seed, dtype=dtype, device="numpy")

    def __repr__(self):
        experts = "" if not self.n_experts else (
            f"n_experts={self.n_experts}, top_k={self.layers[1].moe.top_k}, ")
        return (f"GPT(vocab_size={self.vocab_size}, context={self.context}, "
                f"d_model={self.d_model}, n_heads={self.n_heads}, n_layers={self.n_layers}, "
                f"d_ff={self.d_ff}, {experts}params={self.num_params})")

    def loss(self, tokens, targets):
        """The mean cross-entropy over all N·T positions, + Σ_blocks aux_loss_coef · aux with
        n_experts (minidist.nn.moe: the loss a History reports); targets are checked like
        tokens."""
        targets = self.layers[0].check_tokens(targets, "targets")
        if np.shape(tokens) != targets.shape:
            raise ValueError(f"targets must have the shape of tokens, {np.shape(tokens)}, got "
                             f"{targets.shape}")
        loss = super().loss(tokens, targets)
        if self.n_experts:
            from minidist.nn.moe import aux_loss

            loss += aux_loss(self.layers)
        return loss

    def generate(self, tokens, n_new, temperature=1.0, seed=0):
        """tokens (N, T) followed by n_new sampled ones, (N, T + n_new): each new token is drawn
        from softmax(logits / temperature) at the last position, the model seeing the last
        `context` tokens (np.random.default_rng(seed); a low temperature approaches argmax)."""
        check_integer("n_new", n_new, 0)
        check_integer("seed", seed, 0)
        if isinstance(temperature, (bool, np.bool_)) or not isinstance(
                temperature, (int, float, np.integer, np.floating)):
            raise TypeError(f"temperature must be a number > 0, got {temperature!r}")
        if not 0 < temperature < np.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        tokens = self.layers[0].check_tokens(tokens)
        rng = np.random.default_rng(seed)
        for _ in range(n_new):
            logits = self.forward(tokens[:, -self.context:])[:, -1]
            with np.errstate(over="ignore"):  # a tiny temperature: −∞ below the max, e^−∞ = 0
                p = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
            cdf = np.cumsum(p, axis=1)
            cdf /= cdf[:, -1:]
            u = rng.random((len(tokens), 1))
            picked = (cdf <= u).sum(axis=1)  # inverse CDF: the first token whose cdf exceeds u
            tokens = np.concatenate([tokens, picked[:, None]], axis=1)
        return tokens


def gpt(vocab_size, context, d_model=64, n_heads=4, n_layers=2, d_ff=None, seed=0,
        dtype=np.float64, recompute=False, n_experts=None, top_k=1, capacity_factor=None,
        aux_loss_coef=0.01):
    """A GPT-2 style language model over `vocab_size` tokens and up to `context` positions
    (d_ff defaults to 4·d_model). Init as GPT-2: weights N(0, 0.02²), the residual projections
    N(0, 0.02²/(2·n_layers)), biases 0, LayerNorm γ = 1, β = 0.

    n_experts (None or 0: dense): every block's MLP becomes a mixture of n_experts MLPs of
    width d_ff behind a router (minidist.nn.moe: each expert initialised as the MLP, the router
    N(0, 0.02²)); each token goes to its top_k most probable experts, each expert taking at most
    ⌈capacity_factor · top_k · T / n_experts⌉ tokens of a sequence (None: no limit), and the
    loss adds aux_loss_coef times each block's Switch load-balancing loss."""
    return GPT(vocab_size, context, d_model, n_heads, n_layers, d_ff, seed, dtype, recompute,
               n_experts, top_k, capacity_factor, aux_loss_coef)
