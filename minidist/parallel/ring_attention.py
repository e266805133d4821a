"""Ring attention (Liu et al. 2023): causal self-attention over a sequence split across c ranks.

Rank r holds the queries, keys and values of its own positions only. The K/V blocks travel
around the ring r → r+1 (c − 1 send/recv steps; send is eager, so send-then-receive cannot
deadlock); each rank attends its queries to every block as it passes and merges the partial
softmaxes with FlashAttention's online rule. For scores S = Q Kᵀ/√d_h of one block, a row's

    partial      m = max_s S[·, s],   l = Σ_s e^{S[·, s] − m},   o = Σ_s e^{S[·, s] − m} V[s]
    combine      m = max(m₁, m₂),  l = e^{m₁−m} l₁ + e^{m₂−m} l₂,  o = e^{m₁−m} o₁ + e^{m₂−m} o₂
    finish       O = o / l,   lse = m + log l   (the row's log-sum-exp over all the keys)

exactly (up to rounding) the softmax over the keys of all blocks together. The causal mask is
by GLOBAL position: the sequence is cut into equal chunks, and a query chunk against a key
chunk is "full" (keys all in the past), "diagonal" (the same chunk: the triangle) or "skip"
(all in the future: not computed, the block still passed on). With load_balance the sequence
is cut into 2c chunks and rank r holds chunks r and 2c−1−r, so every rank computes 2c + 1 of
its 4c chunk pairs, each (T/2c)² scores; without it rank r computes r + 1 of its c pairs of
(T/c)², the last rank c times the first's work.

Backward (FlashAttention-2): P = e^{S − lse} is recomputed block by block from the saved
log-sum-exp (no T×T matrix is kept), with D = rowsum(∂O ⊙ O):

    ∂V_s += Pᵀ ∂O,   ∂P = ∂O V_sᵀ,   ∂S = P ⊙ (∂P − D) / √d_h,   ∂Q += ∂S K_s,   ∂K_s += ∂Sᵀ Q

The K/V blocks go around the ring again, each with its ∂K, ∂V accumulators: every rank adds
its queries' share to the block it holds before passing it on, and after c − 1 steps one more
send brings each accumulator home to its owner.

Memory: while a block travels a rank holds the one it sends and the one it receives, with
B = N·(T/c)·H·d_h·b the bytes of one rank's K: 2·2B in the forward (K, V each way), 2·4B in
the backward (K, V, ∂K, ∂V each way); the clock's ledger sees them as transient bytes
(memory.context_peak_bytes).
"""

import math

import numpy as np

from minidist import memory
from minidist.data import check_integer
from minidist.nn.attention import CausalSelfAttention

RING_TAG = 17  # the tag of ring attention's messages


def chunks(T, c, rank, load_balance=False):
    """The global positions `rank` of c holds of a sequence of T, as [(start, stop), ...] in
    local order: [r·T/c, (r+1)·T/c), or with load_balance chunks r and 2c−1−r of T/(2c)."""
    check_integer("c", c)
    pieces = 2 * c if load_balance else c
    if T % pieces:
        how = f"2c = {pieces} equal chunks (load_balance=True)" if load_balance else \
            f"{c} equal chunks"
        raise ValueError(f"context parallelism over c={c} ranks cuts each sequence of T={T} "
                         f"positions into {how}: T must be divisible by {pieces}")
    L = T // pieces
    mine = (rank, 2 * c - 1 - rank) if load_balance else (rank,)
    return [(i * L, (i + 1) * L) for i in mine]


def pair_kind(query, key):
    """"full", "diagonal" or "skip": a query chunk (start, stop) against a key chunk of the same
    length, under the causal mask (a key at position s is seen by queries at t >= s)."""
    if key[0] == query[0]:
        return "diagonal"
    return "full" if key[0] < query[0] else "skip"


def combine(m1, l1, o1, m2, l2, o2):
    """Merge two partial softmaxes over disjoint sets of keys into one (FlashAttention's rule):
    m = max(m₁, m₂), l = e^{m₁−m} l₁ + e^{m₂−m} l₂, o = e^{m₁−m} o₁ + e^{m₂−m} o₂.

    m, l: each row's running max and sum of e^{S − m}, shape (...,); o: the unnormalised
    output Σ e^{S − m} V, shape (..., d_h). A row that saw no key yet (all masked) has
    m = −∞, l = 0, o = 0 and drops out. Returns the merged (m, l, o); o / l is the softmax
    over both sets of keys times V."""
    m = np.maximum(m1, m2)
    finite = np.where(np.isneginf(m), 0.0, m)  # both −∞: e^{−∞ − 0} = 0, not e^{−∞ + ∞}
    a1, a2 = np.exp(m1 - finite), np.exp(m2 - finite)
    return m, a1 * l1 + a2 * l2, a1[..., None] * o1 + a2[..., None] * o2


def partial_softmax(scores, v):
    """(m, l, o) of one block: scores (..., n_q, n_k) with −∞ where masked, v (..., n_k, d_h)."""
    m = scores.max(axis=-1)
    p = np.exp(scores - np.where(np.isneginf(m), 0.0, m)[..., None])
    return m, p.sum(axis=-1), p @ v


class RingAttention(CausalSelfAttention):
    """CausalSelfAttention whose core runs over the ring of `comm`'s c ranks: this rank's input
    is its chunks of every sequence (`chunks(T, c, rank, load_balance)`), the QKV and W_o
    projections are CausalSelfAttention's own. Keeps X, Q, K, V, O and lse (N, H, T/c) for
    backward, never P. block_pairs: {"computed", "skipped"} chunk pairs of the last forward."""

    def __init__(self, d_model, n_heads, comm, load_balance=False, clock=None, d_head=None):
        super().__init__(d_model, n_heads, d_head=d_head)
        self.comm, self.load_balance, self.clock = comm, bool(load_balance), clock
        self.block_pairs = {"computed": 0, "skipped": 0}

    def __repr__(self):
        return (f"RingAttention(d_model={self.d_model}, heads={self.n_heads}, "
                f"ring of {self.comm.world_size}{', load_balance' if self.load_balance else ''})")

    def _layout(self):
        """Every rank's chunks, [[(start, stop), ...] per rank], for this input's T/c."""
        c = self.comm.world_size
        T = self.Q.shape[-2] * c
        return [chunks(T, c, r, self.load_balance) for r in range(c)]

    def _pairs(self, layout, owner, count=False):
        """(local query slice, local key slice, kind) of every chunk pair not skipped, this
        rank's queries against `owner`'s keys (count: tallied in block_pairs)."""
        for qi, query in enumerate(layout[self.comm.rank]):
            for ki, key in enumerate(layout[owner]):
                kind = pair_kind(query, key)
                if count:
                    self.block_pairs["skipped" if kind == "skip" else "computed"] += 1
                if kind != "skip":
                    L = query[1] - query[0]
                    yield slice(qi * L, (qi + 1) * L), slice(ki * L, (ki + 1) * L), kind

    def _scores(self, Q, K, kind):
        scores = Q @ K.swapaxes(-1, -2) / math.sqrt(self.d_head)
        if kind == "diagonal":
            L = scores.shape[-1]
            scores[..., np.triu(np.ones((L, L), bool), k=1)] = -np.inf
        return scores

    def _pass(self, block):
        """Send `block` to rank r+1, receive the next one from rank r−1 (timed as comm); the
        clock's ledger sees both held at once, as transient bytes."""
        c, r = self.comm.world_size, self.comm.rank
        sent = block
        for fn, args in ((self.comm.send, (block, (r + 1) % c, RING_TAG)),
                         (self.comm.recv, ((r - 1) % c, RING_TAG))):
            block = fn(*args) if self.clock is None else self.clock.timed("comm", fn, *args)
        if self.clock is not None:
            self.clock.moment(transient=memory.array_bytes(sent, block))
        return block

    def attend(self):
        """This rank's heads softmax(Q Kᵀ/√d_h + causal mask) V over the keys of every rank,
        (N, H, T/c, d_h); keeps lse."""
        layout, c, r = self._layout(), self.comm.world_size, self.comm.rank
        self.block_pairs = {"computed": 0, "skipped": 0}
        m = np.full(self.Q.shape[:-1], -np.inf, self.Q.dtype)
        total, o = np.zeros_like(m), np.zeros_like(self.Q)
        block = np.stack([self.K, self.V])
        for step in range(c):
            owner = (r - step) % c
            for q, k, kind in self._pairs(layout, owner, count=True):
                scores = self._scores(self.Q[..., q, :], block[0][..., k, :], kind)
                new = partial_softmax(scores, block[1][..., k, :])
                m[..., q], total[..., q], o[..., q, :] = combine(
                    m[..., q], total[..., q], o[..., q, :], *new)
            if step < c - 1:
                block = self._pass(block)
        self.lse = m + np.log(total)  # every query sees its own position: l > 0
        return o / total[..., None]

    def attend_backward(self, dO):
        """(∂Q, ∂K, ∂V) of this rank's positions, each (N, H, T/c, d_h), from ∂O (N, H, T/c,
        d_h): P recomputed from lse, ∂K and ∂V accumulated around the ring and sent home."""
        layout, c, r = self._layout(), self.comm.world_size, self.comm.rank
        N, H, T, dh = self.Q.shape
        out = self.O.reshape(N, T, H, dh).transpose(0, 2, 1, 3)  # O as attend returned it
        D = (dO * out).sum(axis=-1)
        dQ = np.zeros_like(self.Q)
        block = np.stack([self.K, self.V, np.zeros_like(self.K), np.zeros_like(self.V)])
        for step in range(c):
            K, V, dK, dV = block
            for q, k, kind in self._pairs(layout, (r - step) % c):
                P = np.exp(self._scores(self.Q[..., q, :], K[..., k, :], kind)
                           - self.lse[..., q, None])
                dV[..., k, :] += P.swapaxes(-1, -2) @ dO[..., q, :]
                dS = P * (dO[..., q, :] @ V[..., k, :].swapaxes(-1, -2) - D[..., q, None])
                dS /= math.sqrt(self.d_head)
                dQ[..., q, :] += dS @ K[..., k, :]
                dK[..., k, :] += dS.swapaxes(-1, -2) @ self.Q[..., q, :]
            if step < c - 1:
                block = self._pass(block)
        dK, dV = block[2:]
        if c > 1:  # the accumulators of rank r+1's block go home (its K, V let go first)
            home = np.stack([dK, dV])
            del block, K, V, dK, dV
            dK, dV = self._pass(home)
        return dQ, dK, dV
