"""Cost models for the collectives in `minidist/comm/collectives.py`.

Three questions, three tools:

- How many bytes does each rank send and receive?  `bytes_per_rank` / `messages_per_rank`
  answer *exactly* (the numbers `comm.stats` records), from the algorithms' message patterns;
  `zero_bytes_per_rank` adds them up for one training step of ZeRO-0/1/2/3, and
  `megatron_bytes_per_rank` (minidist.megatron_cost) for a tensor-parallel GPT's.
- How long should it take?  `time` evaluates the α-β-γ model: α seconds per message, β seconds
  per byte sent, γ seconds per byte reduced (Thakur, Rabenseifner & Gropp, "Optimization of
  collective communication operations in MPICH", IJHPCA 19(1), 2005).
- What are α and β here?  `measure_ping_pong` times a two-rank ping-pong and `fit_alpha_beta`
  fits t = α + β·n to it; `measure_gamma` times one numpy addition.

`alg_bandwidth` and `bus_bandwidth` report speeds as the NCCL tests do (doc/PERFORMANCE.md).
"""

import statistics
from time import perf_counter

import numpy as np

from minidist.data import shard_bounds
from minidist.memory import check_stage, unit_counts

ALGORITHMS = {  # the algorithms written in collectives.py; the first is the default
    "all_reduce": ("ring", "naive", "tree", "recursive_doubling"),
    "broadcast": ("tree",),
    "reduce": ("tree",),
    "all_gather": ("ring",),
    "reduce_scatter": ("ring",),
    "gather": ("direct",),
    "scatter": ("direct",),
    "barrier": ("dissemination",),
    "all_to_all": ("pairwise",),
}
BUS_FACTOR = {  # busBW = algBW × factor(p)  (NCCL tests)
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "gather": lambda p: (p - 1) / p,
    "scatter": lambda p: (p - 1) / p,
    "all_to_all": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
    "reduce": lambda p: 1.0,
    "send": lambda p: 1.0,
}


def _check(collective, algorithm, world_size):
    if collective not in ALGORITHMS:
        raise ValueError(f"unknown collective {collective!r}; allowed: {', '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[collective][0] if algorithm is None else algorithm
    if algorithm not in ALGORITHMS[collective]:
        raise ValueError(f"unknown algorithm {algorithm!r} for {collective}; allowed: "
                         f"{', '.join(ALGORITHMS[collective])}")
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    return algorithm


def rounds(p):
    """⌈lg p⌉: the depth of a binomial tree over p ranks (0 for p = 1)."""
    return (int(p) - 1).bit_length()


def tree_children(me, p):
    """Children of relative rank `me` in the binomial tree rooted at 0: me + 2^k for every 2^k
    below me's lowest set bit (every 2^k < p for the root), as long as me + 2^k < p."""
    low = me & -me if me else 1 << rounds(p)
    return [me + (1 << k) for k in range(low.bit_length() - 1) if me + (1 << k) < p]


def _traffic(collective, algorithm, count, itemsize, p, root):
    """[(bytes sent, bytes received, messages sent)] per rank, following collectives.py."""
    shape = (int(count),) if np.ndim(count) == 0 else tuple(int(s) for s in count)
    n = int(np.prod(shape)) * itemsize  # bytes in the array each rank passes
    if algorithm == "tree":  # binomial trees (all_reduce: reduce to rank 0, broadcast from it)
        out = []
        for r in range(p):
            me = (r - root) % p if collective != "all_reduce" else r
            kids = len(tree_children(me, p))
            down = (kids * n, n if me else 0, kids)  # broadcast: get it once, pass it on
            up = (n if me else 0, kids * n, 1 if me else 0)  # reduce: the same tree reversed
            both = tuple(a + b for a, b in zip(down, up, strict=True))
            out.append({"broadcast": down, "reduce": up, "all_reduce": both}[collective])
        return out
    if algorithm == "naive":  # everything goes through rank 0, there and back
        return [((p - 1) * n, (p - 1) * n, p - 1)] + [(n, n, 1)] * (p - 1)
    if algorithm == "recursive_doubling":
        steps = p.bit_length() - 1  # lg q, q = 2^⌊lg p⌋
        rem = p - (1 << steps)  # ranks 0..2rem-1 pair up first; the even ones sit out
        per = [1 if r < 2 * rem and r % 2 == 0 else steps + (r < 2 * rem) for r in range(p)]
        return [(k * n, k * n, k) for k in per]
    if collective == "all_gather":  # p rows (one per rank) round the ring: all but one each way
        return [((p - 1) * n, (p - 1) * n, p - 1)] * p
    if algorithm == "ring":  # chunks of rows: all_reduce splits every element
        if collective == "all_reduce":
            rows, row = n // itemsize, itemsize
        elif not shape:
            raise ValueError("reduce_scatter needs an array with at least one axis")
        else:
            rows, row = shape[0], (n // shape[0] if shape[0] else 0)
        chunk = [(hi - lo) * row for lo, hi in (shard_bounds(rows, c, p) for c in range(p))]
        # reduce-scatter: send every chunk but my own, receive every chunk but my left's
        rs = [(n - chunk[r], n - chunk[(r - 1) % p]) for r in range(p)]
        if collective == "reduce_scatter":
            return [(s, g, p - 1) for s, g in rs]
        # all-gather: send every chunk but my right's, receive every chunk but my own
        return [(s + n - chunk[(r + 1) % p], g + n - chunk[r], 2 * (p - 1))
                for r, (s, g) in enumerate(rs)]
    if collective == "all_to_all":  # rows split into p chunks as data.shard_bounds splits them
        if not shape:
            raise ValueError("all_to_all needs an array with at least one axis")
        rows = [hi - lo for lo, hi in (shard_bounds(shape[0], c, p) for c in range(p))]
        row = n // shape[0] if shape[0] else 0
        return [(s, g, p - 1) for s, g in all_to_all_bytes([rows] * p, row)]
    if collective == "gather":  # n: one rank's contribution
        return [(0, (p - 1) * n, 0) if r == root else (n, 0, 1) for r in range(p)]
    if collective == "scatter":  # n: one rank's row of the root's (p, ...) array
        return [((p - 1) * n, 0, p - 1) if r == root else (0, n, 0) for r in range(p)]
    return [(0, 0, rounds(p))] * p  # barrier: ⌈lg p⌉ empty messages


def bytes_per_rank(collective, algorithm, count, itemsize, world_size, root=0):
    """[(bytes sent, bytes received)] for each rank, exactly as `comm.stats` counts them.

    count: elements in the array each rank passes, or its shape (all_gather, gather: one rank's
    contribution; scatter: one rank's row). For reduce_scatter and all_to_all pass the shape:
    they split rows of axis 0 (an int means that many rows of one element); all_to_all sends
    chunk j of every rank's rows to rank j (ragged chunks: `all_to_all_bytes`). Chunks are
    uneven as in `data.shard_bounds`. Ring all-reduce, rank r, chunk sizes c_k (bytes, Σ c_k = n):
    sent = (n − c_r) + (n − c_{r+1}), received = (n − c_{r−1}) + (n − c_r); 2(p−1)/p·n each
    when p divides n. All-to-all: sent = n − c_r, received = (p−1)·c_r.
    """
    algorithm = _check(collective, algorithm, world_size)
    return [(s, g) for s, g, _ in _traffic(collective, algorithm, count, int(itemsize),
                                           int(world_size), int(root) % int(world_size))]


def messages_per_rank(collective, algorithm, count, itemsize, world_size, root=0):
    """Messages each rank sends (empty ones included), as `comm.stats[...].messages`."""
    algorithm = _check(collective, algorithm, world_size)
    return [m for _, _, m in _traffic(collective, algorithm, count, int(itemsize),
                                      int(world_size), int(root) % int(world_size))]


def all_to_all_bytes(sizes, itemsize):
    """[(bytes sent, bytes received)] for each rank of an all_to_all in which rank i sends
    `sizes[i][j]` elements to rank j (a p × p matrix; its diagonal stays home), exactly as
    `comm.stats` counts them on every backend and algorithm (pairwise: in p−1 messages):

        sent_r = b·Σ_{j≠r} sizes[r][j],   received_r = b·Σ_{i≠r} sizes[i][r]   (b = itemsize)
    """
    try:
        m = np.array(sizes)
    except ValueError:  # ragged rows
        m = np.zeros(0)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0 or m.dtype.kind not in "iu" \
            or (m < 0).any():
        raise ValueError(f"sizes must be a p × p matrix of element counts >= 0 (sizes[i][j]: "
                         f"what rank i sends to rank j), got {sizes!r}")
    if not isinstance(itemsize, (int, np.integer)) or itemsize < 0:
        raise ValueError(f"itemsize must be an integer >= 0 (bytes per element), got {itemsize!r}")
    moved = m.astype(object) * int(itemsize)  # Python ints: no overflow
    np.fill_diagonal(moved, 0)
    return [(int(s), int(g)) for s, g in zip(moved.sum(1), moved.sum(0), strict=True)]


def zero_bytes_per_rank(stage, unit_sizes, itemsize, world_size, rank=0):
    """{all_reduce, reduce_scatter, all_gather, total}: the bytes `rank` sends in one training
    step of ZeRO-`stage`, exactly as comm.stats counts them (ring algorithms). Units of u
    elements are padded to N·c_u, c_u = ⌈u/N⌉; b = itemsize:

        stage 1, 2  reduce-scatter of ∇ (N−1)·Σc_u·b, all-gather of θ (N−1)·Σc_u·b
        stage 3     the same reduce-scatter; θ gathered twice (before the forward, again
                    before the backward): 2(N−1)·Σc_u·b
        stage 0     data parallelism: a ring all-reduce of each unit (bytes_per_rank; with
                    uneven chunks the ranks send different amounts)

    Rajbhandari et al. 2020 (§7): stages 1 and 2 send what data parallelism sends, 2Ψ(N−1)/N·b
    (a reduce-scatter plus an all-gather is a ring all-reduce); stage 3 sends 1.5× that."""
    stage = check_stage(stage)
    _check("all_reduce", "ring", world_size)
    p = int(world_size)
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < p:
        raise ValueError(f"rank must be an integer in [0, {p}), got {rank!r}")
    sizes = unit_counts(unit_sizes)
    out = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}
    if stage == 0:
        out["all_reduce"] = sum(bytes_per_rank("all_reduce", "ring", u, itemsize, p)[rank][0]
                                for u in sizes)
    else:
        shard = (p - 1) * sum(-(-u // p) for u in sizes) * int(itemsize)
        out["reduce_scatter"], out["all_gather"] = shard, (2 if stage == 3 else 1) * shard
    return {**out, "total": sum(out.values())}


def time(collective, algorithm, nbytes, world_size, alpha, beta, gamma=0.0):
    """Predicted seconds in the α-β-γ model (Thakur, Rabenseifner & Gropp 2005).

    p ranks, n = nbytes, L = ⌈lg p⌉, q = 2^⌊lg p⌋. n is the all-reduce / broadcast / reduce
    buffer, the all-gather / gather output (p × one rank's array), the reduce-scatter / scatter
    input (as in the NCCL tests and the paper):

        all_reduce  naive               2(p−1)(α + nβ) + (p−1)nγ      (the root, serialized)
        all_reduce  tree                L(2α + 2nβ + nγ)              (reduce, then broadcast)
        all_reduce  recursive_doubling  lg q·(α + nβ + nγ) + [p ≠ q](2α + 2nβ + nγ)
        all_reduce  ring                2(p−1)α + 2n(p−1)/p·β + n(p−1)/p·γ
        broadcast   tree                L(α + nβ)
        reduce      tree                L(α + nβ + nγ)
        all_gather  ring                (p−1)α + n(p−1)/p·β
        all_to_all  pairwise            (p−1)α + n(p−1)/p·β           (n: one rank's chunks)
        reduce_scatter ring             (p−1)α + n(p−1)/p·(β + γ)
        gather, scatter                 (p−1)α + n(p−1)/p·β           (the root, serialized)
        barrier     dissemination       Lα
    """
    algorithm = _check(collective, algorithm, world_size)
    p, n, a, b, g = int(world_size), float(nbytes), alpha, beta, gamma
    L, part = rounds(p), n * (p - 1) / p
    if collective == "all_reduce":
        if algorithm == "naive":
            return 2 * (p - 1) * (a + n * b) + (p - 1) * n * g
        if algorithm == "tree":
            return L * (2 * a + 2 * n * b + n * g)
        if algorithm == "recursive_doubling":
            q = p.bit_length() - 1
            return q * (a + n * b + n * g) + (p != 1 << q) * (2 * a + 2 * n * b + n * g)
        return 2 * (p - 1) * a + 2 * part * b + part * g
    if collective == "broadcast":
        return L * (a + n * b)
    if collective == "reduce":
        return L * (a + n * b + n * g)
    if collective == "reduce_scatter":
        return (p - 1) * a + part * (b + g)
    if collective == "barrier":
        return L * a
    return (p - 1) * a + part * b  # all_gather, gather, scatter, all_to_all


def alg_bandwidth(nbytes, seconds):
    """algBW = n / t, in bytes per second."""
    return float(nbytes) / float(seconds)


def bus_bandwidth(collective, nbytes, seconds, world_size):
    """busBW = algBW × 2(p−1)/p for all-reduce, × (p−1)/p for all-gather, reduce-scatter,
    gather, scatter, all-to-all, × 1 for broadcast, reduce and send: comparable with the link's
    speed. n as in `time` (the all-gather's output, the reduce-scatter's input)."""
    if collective not in BUS_FACTOR:
        raise ValueError(f"no bus bandwidth for {collective!r}; allowed: {', '.join(BUS_FACTOR)}")
    return alg_bandwidth(nbytes, seconds) * BUS_FACTOR[collective](int(world_size))


def fit_alpha_beta(nbytes, seconds, relative=True):
    """(α, β) ≥ 0 minimizing Σ w_i (α + β n_i − t_i)², w_i = 1/t_i² when `relative` (every size
    counts alike: a 1 µs error matters at 8 bytes, not at 8 MB), else w_i = 1.

    Two unknowns: the best fit is the unconstrained one if it is non-negative, else the best
    with α = 0 or β = 0 (the optimum of a convex problem on a quadrant lies on a face).

    A term the data cannot resolve comes back as exactly 0.0 (as does one that adds less than
    10⁻⁹ of the largest time, rounding): β = 0 when the times do not grow with n over the sizes
    measured (the thread backend, whose wake-up latency hides the copy up to hundreds of KiB);
    α = 0 when they are proportional to n. So never divide by β without checking:
    `link_bandwidth(β)` gives 1/β, or None when β was not resolved. To resolve β, time sizes
    where the copy outweighs the latency (MiB, on the process backend)."""
    n, t = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    if n.shape != t.shape or n.ndim != 1 or len(n) < 2:
        raise ValueError(f"need two equal-length 1-D sequences of >= 2 points, got shapes "
                         f"{n.shape} and {t.shape}")
    floor = max(float(np.abs(t).max()) * 1e-9, 1e-30)  # a zero time gets a finite weight
    w = 1 / np.maximum(t, floor) ** 2 if relative else np.ones_like(t)
    sse = lambda a, b: float(np.sum(w * (a + b * n - t) ** 2))  # noqa: E731
    A = np.stack([np.ones_like(n), n], axis=1) * np.sqrt(w)[:, None]
    a, b = np.linalg.lstsq(A, t * np.sqrt(w), rcond=None)[0]
    if not (a >= 0 and b >= 0):
        candidates = [(0.0, max(0.0, float(np.sum(w * n * t) / max(np.sum(w * n * n), 1e-300)))),
                      (max(0.0, float(np.sum(w * t) / np.sum(w))), 0.0)]
        a, b = min(candidates, key=lambda ab: sse(*ab))
    rounding = 1e-9 * float(np.abs(t).max())  # a term adding less than this is lstsq's rounding
    return (float(a) if a > rounding else 0.0), (float(b) if b * n.max() > rounding else 0.0)


def link_bandwidth(beta):
    """1/β in bytes per second, or None when β = 0 (not resolved by the fit: see
    `fit_alpha_beta`)."""
    beta = float(beta)
    if beta < 0 or not np.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return 1.0 / beta if beta > 0 else None


PING_PONG_SIZES = tuple(4**k for k in range(12))  # 1 B … 4 MiB
SETTLE_S = 0.3  # seconds of untimed calls before a measurement (see _settle)


def _settle(comm, call, seconds=SETTLE_S):
    """Repeat call() until rank 0 has spent `seconds` (it tells the others when to stop): for
    a moment after the ranks start, the machine is still busy starting them, and the first
    calls can wait a whole scheduler time slice (~8 ms here) for a core."""
    start, more = perf_counter(), np.ones(1)
    while more[0]:
        call()
        more[0] = perf_counter() - start < seconds
        comm.broadcast(more, src=0)


def _ping_pong(comm, sizes, repeats, warmup):
    """Rank 0 sends n bytes to rank 1, which sends them back; half the round trip, median."""
    _settle(comm, comm.barrier)
    medians = []
    for nbytes in sizes:
        buf, times = np.zeros(nbytes, dtype=np.uint8), []
        for i in range(warmup + repeats):
            if comm.rank == 0:
                start = perf_counter()
                comm.send(buf, 1)
                comm.recv(1)
                if i >= warmup:
                    times.append((perf_counter() - start) / 2)
            elif comm.rank == 1:
                comm.send(comm.recv(0), 0)
        medians.append(statistics.median(times) if times else None)
    return medians


def measure_ping_pong(backend="process", sizes=PING_PONG_SIZES, repeats=15, warmup=3,
                      timeout=60.0):
    """Two ranks on `backend` bounce messages of each size; returns (sizes in bytes, median
    one-way seconds) as arrays, ready for `fit_alpha_beta`."""
    from minidist.launch import run

    sizes = [int(s) for s in sizes]
    times = run(_ping_pong, 2, args=(sizes, int(repeats), int(warmup)), backend=backend,
                timeout=timeout)[0]
    return np.array(sizes), np.array(times, dtype=float)


def measure_gamma(nbytes=2**22, dtype=np.float64, repeats=5):
    """γ: seconds per byte for `np.add(a, b, out=a)` on arrays of `nbytes` (median)."""
    a = np.ones(max(1, nbytes // np.dtype(dtype).itemsize), dtype=dtype)
    b, times = a.copy(), []
    for _ in range(repeats):
        start = perf_counter()
        np.add(a, b, out=a)
        times.append(perf_counter() - start)
    return statistics.median(times) / a.nbytes


def _time_collective(comm, collective, algorithm, count, dtype, repeats):
    x = np.zeros(count, dtype=dtype)  # sums of zeros stay finite however many calls there are
    _settle(comm, lambda: getattr(comm, collective)(x, algorithm=algorithm))
    seconds = []
    for _ in range(repeats + 1):  # the first call warms up
        comm.barrier()
        start = perf_counter()
        getattr(comm, collective)(x, algorithm=algorithm)
        seconds.append(perf_counter() - start)
    return seconds[1:]


def measure_collective(collective, algorithm, nbytes, world_size, backend="process",
                       repeats=5, dtype=np.float64, timeout=60.0):
    """Median over `repeats` of the slowest rank's seconds for one call (all_reduce, broadcast
    or all_gather with an explicit algorithm) on arrays of `nbytes`."""
    from minidist.launch import run

    count = int(nbytes) // np.dtype(dtype).itemsize
    per_rank = run(_time_collective, world_size, backend=backend, timeout=timeout,
                   args=(collective, algorithm, count, dtype, int(repeats)))
    return statistics.median(np.max(per_rank, axis=0))


# A Megatron-split GPT's bytes per rank and step (minidist.megatron_cost), a context-parallel
# one's (minidist.context_cost) and the planner (memory and step time of every dp × tp × pp
# layout) live in their own modules.
from minidist.context_cost import context_parallel_bytes_per_rank  # noqa: E402, F401
from minidist.expert_cost import expert_parallel_bytes_per_rank  # noqa: E402, F401
from minidist.megatron_cost import megatron_bytes_per_rank  # noqa: E402, F401
from minidist.planner import Layout, Plan, estimate, plan  # noqa: E402, F401
