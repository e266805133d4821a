"""Sending less: gradient compression and local SGD, as options of strategy="data_parallel".

Each rank's weighted gradient g_k = (|B_k|/|B|)∇L_k has n float64 entries (8n bytes); the ring
all-reduce sends 2(p−1)/p · 8n bytes per rank per step. Three ways to send less:

top-k (compression="topk", compress_ratio=ρ): send only the k = ⌈ρn⌉ entries of largest |·|,
    as k (int32 index, float64 value) pairs: 12k bytes. Sparse vectors with different indices
    cannot be summed on the way, so the ranks all-gather them: (p−1)·12k bytes per rank.
QSGD (compression="qsgd", qsgd_levels=s; Alistarh et al. 2017): send ‖g‖₂ and, per entry,
    sign(g_i)·ℓ_i with ℓ_i = ⌊s|g_i|/‖g‖₂ + u_i⌋, u_i ~ U[0, 1) (stochastic rounding: the
    decoded ‖g‖₂·sign·ℓ_i/s is unbiased). 4 bits per entry for s ≤ 7, 8 for s ≤ 127, plus the
    8-byte norm; all-gathered as well.
error feedback (Seide et al. 2014, Karimireddy et al. 2019): what a rank did not send is kept,
    e_k ← c_k − decode(encode(c_k)) with c_k = g_k + e_k, and added to the next step's gradient;
    nothing is lost, only delayed. It needs a compressor that shrinks the error,
    ‖c − decode(encode(c))‖² ≤ (1 − δ)‖c‖² (top-k: δ = k/n); QSGD's error can exceed ‖c‖ (for
    s < √n), and fed back it grows. error_feedback=None (the default): on for top-k, off for
    QSGD; True or False forces it.
local SGD (local_steps=H): every rank steps on its own shard's gradient, and every H steps (and
    after the last) the replicas average their parameters, θ ← Σ_k (|B_k|/|B|) θ_k: one
    all-reduce of θ per H steps. H = 1 with plain SGD is exactly synchronous data parallelism.
"""

import math

import numpy as np

OPTIONS = {"compression": None, "compress_ratio": 0.01, "qsgd_levels": 7,
           "error_feedback": None, "local_steps": 1}
COMPRESSIONS = (None, "topk", "qsgd")


def check_options(options):
    """compression one of COMPRESSIONS; 0 < compress_ratio ≤ 1; 1 ≤ qsgd_levels ≤ 127;
    local_steps an integer ≥ 1, and not combined with compression."""
    compression = options.get("compression")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; allowed: None, 'topk', 'qsgd'")
    ratio = options.get("compress_ratio", OPTIONS["compress_ratio"])
    if not 0 < ratio <= 1:
        raise ValueError(f"compress_ratio is the fraction of entries top-k sends; it must lie "
                         f"in (0, 1], got {ratio!r}")
    levels = options.get("qsgd_levels", OPTIONS["qsgd_levels"])
    if not isinstance(levels, (int, np.integer)) or not 1 <= levels <= 127:
        raise ValueError(f"qsgd_levels must be an integer in 1..127, got {levels!r}")
    if options.get("error_feedback") not in (None, True, False):
        raise ValueError(f"error_feedback must be True, False or None (the compressor's "
                         f"default), got {options['error_feedback']!r}")
    local_steps = options.get("local_steps", 1)
    if not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
        raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
    if local_steps > 1 and compression is not None:
        raise ValueError("local_steps > 1 averages parameters, not gradients: it does not "
                         f"combine with compression={compression!r}; choose one")


class TopK:
    """The k = ⌈ρn⌉ entries of largest magnitude, as int32 indices then float64 values."""

    def __init__(self, n, ratio):
        self.n, self.k = n, min(n, max(1, math.ceil(ratio * n)))
        self.nbytes = self.k * (4 + 8)

    def encode(self, values):
        top = np.argpartition(np.abs(values), self.n - self.k)[self.n - self.k:]
        top = np.sort(top).astype(np.int32)
        return np.concatenate([top.view(np.uint8), values[top].astype(np.float64).view(np.uint8)])

    def decode(self, message, out=None):
        """The dense vector (added into `out` when given)."""
        out = np.zeros(self.n) if out is None else out
        split = 4 * self.k
        out[message[:split].view(np.int32)] += message[split:].view(np.float64)
        return out


class QSGD:
    """‖v‖₂ (float64), then sign·ℓ for every entry in 4 bits (s ≤ 7) or 8 bits (s ≤ 127)."""

    def __init__(self, n, levels, rng):
        self.n, self.levels, self.rng = n, int(levels), rng
        self.bits = 4 if levels <= 7 else 8
        self.nbytes = 8 + (math.ceil(n / 2) if self.bits == 4 else n)

    def encode(self, values):
        norm = float(np.linalg.norm(values))
        scaled = np.abs(values) / norm * self.levels if norm > 0 else np.zeros(self.n)
        level = np.minimum(np.floor(scaled + self.rng.random(self.n)), self.levels)
        codes = (np.sign(values) * level).astype(np.int8)  # in −s … s
        if self.bits == 4:  # two codes per byte: (code + 8) in 0 … 15
            nibbles = np.zeros(2 * math.ceil(self.n / 2), np.uint8)
            nibbles[:self.n] = codes + 8
            codes = (nibbles[0::2] << 4) | nibbles[1::2]
        return np.concatenate([np.array([norm]).view(np.uint8), codes.view(np.uint8)])

    def decode(self, message, out=None):
        norm = message[:8].view(np.float64)[0]
        codes = message[8:]
        if self.bits == 4:
            codes = np.stack([codes >> 4, codes & 15], axis=1).ravel()[:self.n].astype(np.int8) - 8
        dense = norm * codes.view(np.int8).astype(np.float64) / self.levels
        if out is None:
            return dense
        out += dense
        return out


def make_all_reduce(options, n, rank, seed):
    """The CompressedAllReduce the options ask for, or None (a plain all-reduce)."""
    if options["compression"] is None:
        return None
    if options["compression"] == "topk":
        compressor = TopK(n, options["compress_ratio"])
    else:
        compressor = QSGD(n, options["qsgd_levels"], np.random.default_rng([seed, rank]))
    feedback = options["error_feedback"]
    return CompressedAllReduce(compressor, options["compression"] == "topk"
                               if feedback is None else bool(feedback))


class CompressedAllReduce:
    """grad ← Σ_k decode(encode(g_k + e_k)) over the ranks, by one ring all-gather of the
    encoded messages; e_k (error feedback) keeps what was not sent."""

    def __init__(self, compressor, error_feedback):
        self.compressor = compressor
        self.residual = np.zeros(compressor.n) if error_feedback else None

    def compress(self, grad, clock):
        """The message encode(c) for c = g_k + e_k (c = g_k without error feedback); then
        e_k ← c − decode(message)."""
        corrected = grad + self.residual if self.residual is not None else grad
        message = clock.timed("compute", self.compressor.encode, corrected, event="compress")
        if self.residual is not None:
            self.residual[...] = corrected - self.compressor.decode(message)
        return message

    def __call__(self, comm, grad, clock):
        message = self.compress(grad, clock)
        gathered = clock.timed("comm", comm.all_gather, message, "ring", event="all_gather")
        grad[...] = 0.0
        for row in gathered:
            clock.timed("compute", self.compressor.decode, row, grad, event="decompress")
        return grad


def average_parameters(comm, params, weight):
    """θ ← Σ_k w_k θ_k over the ranks (w_k = |B_k|/|B|): local SGD's synchronisation."""
    params *= weight
    comm.all_reduce(params, "sum", "ring")
    return params
