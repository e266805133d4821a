"""Lesson 13 (long context and experts): the online-softmax combine of ring attention, and the
dispatch of tokens to experts.

Each checker first looks at the learner's function on its own, against an independent numpy
reference, so that a failure names the row, the output or the rank that is wrong; then it puts
the function INSIDE a real run on thread ranks — as ring attention's `combine`, or as expert
parallelism's dispatch — and compares the training with strategy="single" (float64, 1e-10).
"""

import contextlib
import functools

import numpy as np

from minidist.exercises._common import Check, Exercise, _call, _check_timeout, _differs, _train

V, T = 11, 8  # the GPT of exercise 1: d = 16, 4 heads, 2 blocks
CP_RUN = {"steps": 3, "batch_size": 8, "lr": 0.1}
CP_CASES = ((2, False), (4, True))  # (c, load_balance) of the real runs
ROWS, D_HEAD = 5, 3  # the numeric probes: 5 rows (queries), a head of width 3


# ----- exercise 1: the online-softmax combine -----------------------------------------------

@contextlib.contextmanager
def softmax_combine(fn):
    """Inside: ring attention merges its partial softmaxes with fn(m1, l1, o1, m2, l2, o2)
    (on thread ranks, which share the module); restored after."""
    from minidist.parallel import ring_attention

    saved = ring_attention.combine
    ring_attention.combine = fn
    try:
        yield
    finally:
        ring_attention.combine = saved


def _partial(scores, v):
    """(m, l, o) of a block, the reference: a row whose scores are all −∞ gives (−∞, 0, 0)."""
    m = scores.max(axis=-1)
    p = np.zeros_like(scores)
    seen = np.isfinite(m)
    p[seen] = np.exp(scores[seen] - m[seen, None])
    return m, p.sum(axis=-1), p @ v


def _probes():
    """(what, scores, v, split): score rows (−∞ where masked) over keys cut at `split` into two
    blocks; the answer must be the softmax statistics of the whole row."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(12, D_HEAD))
    plain = 4 * rng.normal(size=(ROWS, 12))
    plain[np.arange(ROWS), rng.integers(0, 12, ROWS)] += 9  # the row maxima on either side
    first_empty = plain.copy()
    first_empty[1::2, :5] = -np.inf  # rows 1 and 3 see no key of the first block
    second_empty = plain.copy()
    second_empty[::2, 5:] = -np.inf  # rows 0, 2, 4 see no key of the second block
    nothing = plain.copy()
    nothing[2] = -np.inf  # row 2 sees no key at all
    return [("two blocks of finite scores", plain, v, 5),
            ("rows that saw no key in the first block (m1 = −∞, l1 = 0, o1 = 0, as ring "
             "attention starts)", first_empty, v, 5),
            ("rows that saw no key in the second block (m2 = −∞, l2 = 0, o2 = 0)",
             second_empty, v, 5),
            ("a row that saw no key in either block (m1 = m2 = −∞, as under a padding mask)",
             nothing, v, 5)]


def _compare(what, got, want, parts, index):
    """The first wrong output of the combine, in words (None: all right)."""
    names = ("m", "l", "o")
    m1, l1, _, m2, l2, _ = parts
    for name, g, w in zip(names, got, want, strict=True):
        bad = ~np.isclose(g, w, rtol=1e-12, atol=1e-14) & ~(np.isneginf(g) & np.isneginf(w))
        if not bad.any():
            continue
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        r = at[:-1] if name == "o" else at  # the row's index in m and l
        where = f"{what}, row {r if index else r[0]}{f', column {at[-1]}' if name == 'o' else ''}"
        told = f"your {name} is {g[at]:.6g}, it should be {w[at]:.6g}"
        m_pair = f"m1 = {m1[r]:.4g}, m2 = {m2[r]:.4g}"
        if np.isnan(g[at]):
            hint = (": the new max is −∞ too, and e^{m1 − m} = e^{−∞ + ∞}; put 0 in the "
                    "place of an all −∞ max in the exponents"
                    if np.isneginf(m1[r]) and np.isneginf(m2[r]) else "")
            return f"{where} ({m_pair}): your {name} is NaN{hint}"
        if name == "m":
            return f"{where}: {told} = max(m1, m2) ({m_pair})"
        if name == "l" and np.isclose(g[at], l1[r] + l2[r]):
            return (f"{where} ({m_pair}): {told}; you added l1 + l2 without rescaling each "
                    "to the new max: l = e^{m1 − m}·l1 + e^{m2 − m}·l2")
        rule = "e^{m1 − m}·l1 + e^{m2 − m}·l2" if name == "l" else "e^{m1 − m}·o1 + e^{m2 − m}·o2"
        return f"{where} ({m_pair}): {told} = {rule}"
    return None


def _combine_problem(fn):
    """Every probe through fn, against the whole row's softmax: a message, or None."""
    name = "check_softmax_combine"
    cases = [(what, s, v, k, False) for what, s, v, k in _probes()]
    rng = np.random.default_rng(1)  # as ring attention calls it: (N, H, n) and (N, H, n, d_h)
    batched = 3 * rng.normal(size=(2, 4, ROWS, 12))
    batched[0, 1, 3, :6] = batched[1, 2, :, 6:] = -np.inf
    cases.append(("shapes (N, H, n) and (N, H, n, d_h), as ring attention passes them",
                  batched, rng.normal(size=(2, 4, 12, D_HEAD)), 6, True))
    for what, scores, v, k, index in cases:
        parts = (*_partial(scores[..., :k], v[..., :k, :]),
                 *_partial(scores[..., k:], v[..., k:, :]))
        want = _partial(scores, v)
        with np.errstate(all="ignore"):  # a NaN is named below, not warned about
            got, failed = _call(name, fn, *(p.copy() for p in parts), convert=lambda r: r)
        if failed is not None:
            hint = (" (scale o, shape (..., n, d_h), by e^{m − ·} of shape (..., n): add an "
                    "axis, a[..., None] * o)" if "broadcast" in failed.message else "")
            return f"{what}: {failed.message}{hint}"
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            return f"{what}: return the three arrays (m, l, o), got {type(got).__name__}"
        got = [np.asarray(g, dtype=np.float64) for g in got]
        for g, w, label in zip(got, want, "mlo", strict=True):
            if g.shape != w.shape:
                return f"{what}: your {label} has shape {g.shape}, it should be {w.shape}"
        problem = _compare(what, got, want, parts, index)
        if problem:
            return problem
    return None


def check_softmax_combine(fn, cases=CP_CASES, timeout=60.0):
    """fn(m1, l1, o1, m2, l2, o2) -> (m, l, o): two partial softmaxes over disjoint keys merged
    into one, m = max(m₁, m₂), l = e^{m₁−m} l₁ + e^{m₂−m} l₂, o = e^{m₁−m} o₁ + e^{m₂−m} o₂
    (m, l of shape (..., n), o (..., n, d_h); a row that saw no key has m = −∞, l = 0, o = 0).
    Checked on numbers against the softmax of whole rows (−∞ rows included), then made ring
    attention's combine in context-parallel training of a GPT on c thread ranks, for each
    (c, load_balance) of `cases`, which must equal one process at 1e-10."""
    from minidist import nn, train

    name = "check_softmax_combine"
    cases = [tuple(case) for case in cases]
    if not cases or any(len(case) != 2 or case[0] not in (1, 2, 4) or
                        not isinstance(case[1], bool) for case in cases):
        raise ValueError(f"cases must be a non-empty list of (c, load_balance), c in 1, 2, 4 "
                         f"(the T = {T} positions cut into c or 2c chunks) and load_balance "
                         f"True or False, got {cases!r}")
    _check_timeout(timeout)
    problem = _combine_problem(fn)
    if problem:
        return Check(name, False, problem)
    tokens = np.random.default_rng(0).integers(0, V, (32, T + 1))
    X, Y = tokens[:, :-1], tokens[:, 1:]
    model_fn = functools.partial(nn.gpt, V, T, d_model=16, n_heads=4, n_layers=2, seed=1)
    single = train(model_fn, X, Y, **CP_RUN)
    for c, balance in cases:
        with softmax_combine(fn):
            hist, failure = _train(model_fn, X, Y, timeout, strategy="context_parallel",
                                   workers=c, load_balance=balance, **CP_RUN)
        failure = failure or _differs(hist, single)
        if failure:
            return Check(name, False, f"ring attention with your combine on c = {c} ranks "
                                      f"(load_balance={balance}): {failure}")
    runs = ", ".join(f"c = {c}{' balanced' if b else ''}" for c, b in cases)
    return Check(name, True, f"your combine gives the whole rows' softmax (−∞ rows too), and "
                             f"ring attention with it trains as one process ({runs})")


# ----- exercise 2: the dispatch of tokens to their experts' ranks -----------------------------

EP_RUN = {"steps": 3, "batch_size": 8, "lr": 0.1}
DISPATCH_CASES = ((40, 4, 2), (40, 8, 4), (30, 6, 3))  # (rows, E experts, e ranks)


@contextlib.contextmanager
def expert_dispatch(fn):
    """Inside: every expert-parallel MoE block builds its all_to_all chunks with
    fn(x_rows, expert_of_row, experts_per_rank, world_size) (forward and backward, on thread
    ranks, which share the module); restored after."""
    from minidist.parallel import expert_parallel

    saved = expert_parallel.dispatch_chunks
    expert_parallel.dispatch_chunks = fn
    try:
        yield
    finally:
        expert_parallel.dispatch_chunks = saved


def _routing(M, E, n, seed):
    """Expert ids for M rows, the last expert without any; with seed 2 rank 0's n experts too
    (an empty chunk)."""
    expert = np.random.default_rng(seed).integers(n if seed == 2 else 0, E - 1, M)
    expert[:2] = E - 2
    return expert


def _dispatch_problem(got, expert, n, e):
    """The first thing wrong with fn's (chunks, order) for rows labelled 0 … M−1 (None: none)."""
    from minidist.data import is_integer

    M = len(expert)
    where = f"with {M} rows, E = {n * e} experts on e = {e} ranks ({n} each)"
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return f"{where}: return (chunks, order), got {type(got).__name__}"
    chunks, order = got
    if not isinstance(chunks, (list, tuple)) or len(chunks) != e:
        size = len(chunks) if isinstance(chunks, (list, tuple)) else type(chunks).__name__
        return (f"{where}: return one chunk per rank, {e}, got {size}"
                + (" (one per expert): a chunk goes to a rank, which holds experts_per_rank "
                   "experts"
                   if size == n * e else ""))
    sent = []
    for j, chunk in enumerate(chunks):
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != D_HEAD:
            return f"{where}: chunk {j} has shape {chunk.shape}; it should be (rows, {D_HEAD})"
        for label in chunk[:, 0].astype(int):
            home = expert[label] // n
            if home != j:
                return (f"{where}: row {label} (expert {expert[label]}) is in the chunk for "
                        f"rank {j}, but expert {expert[label]} lives on rank {home}: rank j "
                        f"holds experts [j·{n}, (j+1)·{n}), so its rank is expert // "
                        f"experts_per_rank")
        ids = expert[chunk[:, 0].astype(int)]
        if (np.diff(ids) < 0).any():
            i = int(np.flatnonzero(np.diff(ids) < 0)[0])
            return (f"{where}: chunk {j} sends expert {ids[i]}'s row {int(chunk[i, 0])} before "
                    f"expert {ids[i + 1]}'s row {int(chunk[i + 1, 0])}: rank {j} reads what it "
                    "receives expert by expert, so sort each chunk by expert")
        sent += chunk[:, 0].astype(int).tolist()
    missing = sorted(set(range(M)) - set(sent))
    if missing or len(sent) != M:
        return (f"{where}: row {missing[0]} is sent to no rank" if missing else
                f"{where}: {len(sent) - M} rows are sent twice: send every row once")
    order = np.asarray(order)
    if order.shape != (M,) or not all(is_integer(i) for i in order.tolist()):
        return f"{where}: order must be {M} integer row indices, got {order.dtype} {order.shape}"
    if not np.array_equal(order, sent):
        i = int(np.flatnonzero(order != np.array(sent))[0])
        return (f"{where}: order[{i}] = {order[i]}, but row {sent[i]} of x_rows is what your "
                f"chunks send at position {i}: order says which row of x_rows is where, "
                "concatenate(chunks) == x_rows[order]")
    return None


def check_expert_dispatch(fn, world_sizes=(2, 4), timeout=60.0):
    """fn(x_rows, expert_of_row, experts_per_rank, world_size) -> (chunks, order): `chunks[j]`
    the rows of x_rows (M, d) whose expert lives on rank j (experts [j·n, (j+1)·n)), sorted by
    expert; order (M,) with `concatenate(chunks) == x_rows[order]`. Checked on labelled rows,
    then made the dispatch of an expert-parallel MoE GPT (4 experts, top-2, capacity 0.75) on
    e thread ranks for each e of `world_sizes`, whose training must equal one process's."""
    from minidist import nn, train

    name = "check_expert_dispatch"
    sizes = list(world_sizes)
    if not sizes or any(not isinstance(e, int) or e not in (1, 2, 4) for e in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts that divide the "
                         f"4 experts (1, 2 or 4), got {world_sizes!r}")
    _check_timeout(timeout)
    notes = []
    for case, (M, E, e) in enumerate(DISPATCH_CASES):
        n = E // e
        expert = _routing(M, E, n, case)
        rows = np.repeat(np.arange(M, dtype=np.float64)[:, None], D_HEAD, axis=1)
        got, failed = _call(name, fn, rows.copy(), expert.copy(), n, e, convert=lambda r: r)
        if failed is not None:
            return Check(name, False, f"with {M} rows, E = {E}, e = {e}: {failed.message}")
        problem = _dispatch_problem(got, expert, n, e)
        if problem:
            return Check(name, False, problem)
        if not np.array_equal(got[1], np.argsort(expert, kind="stable")):
            notes.append("the rows of one expert are not in their x_rows order: that works "
                         "too, only the rounding may differ")
    tokens = np.random.default_rng(0).integers(0, V, (32, T + 1))
    X, Y = tokens[:, :-1], tokens[:, 1:]
    model_fn = functools.partial(nn.gpt, V, T, d_model=16, n_heads=2, n_layers=2, seed=1,
                                 n_experts=4, top_k=2, capacity_factor=0.75, aux_loss_coef=0.5)
    single = train(model_fn, X, Y, **EP_RUN)
    for e in sizes:
        with expert_dispatch(fn):
            hist, failure = _train(model_fn, X, Y, timeout, strategy="expert_parallel",
                                   workers=e, **EP_RUN)
        failure = failure or _differs(hist, single)
        if failure:
            return Check(name, False, f"expert parallelism with your dispatch on e = {e} "
                                      f"ranks: {failure}")
    return Check(name, True, f"your chunks go to the right ranks, expert by expert, and an "
                             f"expert-parallel GPT with them trains as one process on e = "
                             f"{', '.join(map(str, sizes))} ranks"
                             + (f" ({notes[0]})" if notes else ""))


__all__ = ["check_softmax_combine", "check_expert_dispatch"]

EXERCISES = (
    Exercise(13, "my_combine", check_softmax_combine, "softmax_combine",
             "the online-softmax combine of two partial attentions, run inside ring attention "
             "(context parallelism on 2 and 4 ranks)"),
    Exercise(13, "my_dispatch", check_expert_dispatch, "expert_dispatch",
             "the dispatch of tokens to their experts' ranks, run as the all_to_all chunks of "
             "expert parallelism on 2 and 4 ranks"),
)
