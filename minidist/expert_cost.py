"""What a rank of an expert-parallel mixture-of-experts GPT holds and sends
(minidist.parallel.expert_parallel), exactly as its ledger and comm.stats count them.

L MoE blocks of E experts over e ranks (an ep group; dp groups of them), d = d_model,
b = itemsize. One expert has Ψ_x = 2·d·d_ff + d_ff + d parameters, the model Ψ, the dense
part (all but the experts) Ψ_dense = Ψ − L·E·Ψ_x.

    parameters   (Ψ_dense + L·(E/e)·Ψ_x)·b per rank, whatever dp

The rows move as the routing says: n[i, t, l, j], the kept assignments rank i of the group
sent to rank j in block l of step t (`History.details[i]["tokens_to"][t][l][j]`; the diagonal
stays home). For rank k, S = Σ_{t,l} Σ_{j≠k} n[k, t, l, j] rows sent to the experts' ranks and
R = Σ_{t,l} Σ_{i≠k} n[i, t, l, k] rows received for its own experts; f = 2 with recompute
(each block's forward, and its exchange, runs again in the backward), else 1:

    counts       f·steps·L·(e − 1)·(E/e)·8   each chunk's per-expert row counts (int64) first
    dispatch     f·S·d·b                     my rows to the experts' ranks
    combine      f·R·d·b                     the outputs of my experts back to their tokens
    backward     (S + R)·d·b                 ∂outputs to the experts, ∂inputs back
    gradients    steps·(AR(Ψ_dense, dp·e) + AR(L·(E/e)·Ψ_x, dp) if dp > 1)

AR(n, p): what a rank sends in an all-reduce of n elements over p ranks (cost.bytes_per_rank;
ring: 2(p−1)/p·n·b when p | n). The exchanges count as "all_to_all", the gradients as
"all_reduce".
"""

import numpy as np

from minidist.data import is_integer


def _expert_sizes(model):
    """(L, E, Ψ_x, Ψ_dense) of a mixture-of-experts GPT, or a ValueError."""
    if not getattr(model, "n_experts", None):
        raise ValueError(f"expert parallelism needs a mixture-of-experts GPT (nn.gpt(..., "
                         f"n_experts=E)), got {model!r}")
    L, E = model.n_layers, model.n_experts
    psi_x = 2 * model.d_model * model.d_ff + model.d_ff + model.d_model
    return L, E, psi_x, model.num_params - L * E * psi_x


def _check_ep(E, ep):
    if not (is_integer(ep) and ep >= 1 and E % ep == 0):
        raise ValueError(f"ep must be an integer >= 1 that divides n_experts={E}, got {ep!r}")
    return int(ep)


def expert_parallel_param_bytes(model, ep=1):
    """The parameter bytes one rank holds, (Ψ_dense + L·(E/e)·Ψ_x)·b (the module's table)."""
    L, E, psi_x, dense = _expert_sizes(model)
    return (dense + L * (E // _check_ep(E, ep)) * psi_x) * model.dtype.itemsize


def expert_parallel_bytes_per_rank(model, tokens_to, rank=0, dp=1, algorithm="ring",
                                   by="part"):
    """The bytes rank `rank` (= d·e + k: replica d, rank k of its ep group) sends over the
    steps that `tokens_to` counts: `tokens_to[i][t][l][j]` the rows rank i of its ep group
    sent to rank j at step t in block l, e × steps × L × e (pass
    `[h.details[r]["tokens_to"] for r in group]`). by="part": {counts, dispatch, combine,
    backward, gradients, total} (the module's table); by="collective": {all_to_all,
    all_reduce, total}, as `History.stats[r][op]["bytes_sent"]`."""
    from minidist.cost import bytes_per_rank  # (cost re-exports this module)

    if by not in ("part", "collective"):
        raise ValueError(f"by must be 'part' or 'collective', got {by!r}")
    L, E, psi_x, dense = _expert_sizes(model)
    n = np.asarray(tokens_to)
    if n.ndim != 4 or n.shape[0] != n.shape[3] or n.shape[2] != L or n.dtype.kind not in "iu":
        raise ValueError(f"tokens_to must be integer counts of shape (e, steps, L={L}, e), got "
                         f"{n.dtype} {n.shape}")
    e, steps = _check_ep(E, n.shape[0]), n.shape[1]
    if not (is_integer(dp) and dp >= 1):
        raise ValueError(f"dp must be an integer >= 1, got {dp!r}")
    if not (is_integer(rank) and 0 <= rank < dp * e):
        raise ValueError(f"rank must be an integer in [0, {dp * e}) for dp×ep = {dp}×{e}, got "
                         f"{rank!r}")
    k, d = rank % e, rank // e
    others = np.arange(e) != k
    sent, received = int(n[k][..., others].sum()), int(n[others][..., k].sum())
    f, row = 1 + bool(model.recompute), model.d_model * model.dtype.itemsize
    local = L * (E // e) * psi_x
    gradients = bytes_per_rank("all_reduce", algorithm, dense, model.dtype.itemsize,
                               dp * e)[rank][0]
    if dp > 1:
        gradients += bytes_per_rank("all_reduce", algorithm, local, model.dtype.itemsize,
                                    dp)[d][0]
    parts = {"counts": f * steps * L * (e - 1) * (E // e) * 8, "dispatch": f * sent * row,
             "combine": f * received * row, "backward": (sent + received) * row,
             "gradients": steps * gradients}
    if by == "collective":
        parts = {"all_to_all": sum(parts[p] for p in ("counts", "dispatch", "combine",
                                                      "backward")),
                 "all_reduce": parts["gradients"]}
    return {**parts, "total": sum(parts.values())}
