"""The cost model against the communicator: the bytes `comm.stats` records must equal
`cost.bytes_per_rank` exactly, for every algorithm, world size, size, dtype and root."""

import importlib.util

import numpy as np
import pytest

from minidist import cost
from minidist.launch import run

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None
BACKENDS = ["thread", "process", pytest.param("mpi", marks=pytest.mark.skipif(
    not HAVE_MPI, reason="mpi4py is not installed (pip install 'minidist[mpi]')"))]
WORLD_SIZES = [1, 2, 3, 4, 5, 8]
COUNTS = [0, 1, 7, 1000]
DTYPES = [np.float32, np.float64, np.int64]


def cases(p):
    """(collective, algorithm, shape, dtype, root) for every combination the test covers."""
    out = []
    for dtype in DTYPES:
        for count in COUNTS:
            out += [("all_reduce", a, (count,), dtype, 0) for a in cost.ALGORITHMS["all_reduce"]]
            for root in range(p):
                out += [(c, None, (count,), dtype, root)
                        for c in ("broadcast", "reduce", "gather", "scatter")]
            out.append(("all_gather", "ring", (count,), dtype, 0))
            out.append(("all_gather", "ring", (count, 3), dtype, 0))
            out.append(("reduce_scatter", "ring", (count,), dtype, 0))
            out.append(("reduce_scatter", "ring", (count, 3), dtype, 0))
            out.append(("reduce_scatter", "ring", (3, count), dtype, 0))
    out.append(("barrier", None, (0,), np.uint8, 0))
    return out


def call(comm, collective, algorithm, shape, dtype, root):
    x = np.ones(shape, dtype=dtype)
    if collective == "all_reduce":
        comm.all_reduce(x, algorithm=algorithm)
    elif collective == "broadcast":
        comm.broadcast(x, src=root, algorithm="tree")
    elif collective == "reduce":
        comm.reduce(x, dst=root)
    elif collective == "all_gather":
        comm.all_gather(x, algorithm="ring")
    elif collective == "reduce_scatter":
        comm.reduce_scatter(x, algorithm="ring")
    elif collective == "gather":
        comm.gather(x, dst=root)
    elif collective == "scatter":  # shape: one rank's row
        comm.scatter(np.ones((comm.world_size, *shape), dtype) if comm.rank == root else None,
                     src=root)
    else:
        comm.barrier(algorithm="dissemination")


def record(comm, todo):
    """Run every case; per case, what this rank's stats counted (and under which names)."""
    out = []
    for case in todo:
        comm.stats.reset()
        call(comm, *case)
        names = sorted(comm.stats.ops)
        s = comm.stats[case[0]]
        out.append((names, s.bytes_sent, s.bytes_received, s.messages, s.calls))
    return out


def model(p, collective, algorithm, shape, dtype, root):
    itemsize = np.dtype(dtype).itemsize
    count = shape if collective == "reduce_scatter" else int(np.prod(shape))
    sent_recv = cost.bytes_per_rank(collective, algorithm, count, itemsize, p, root=root)
    msgs = cost.messages_per_rank(collective, algorithm, count, itemsize, p, root=root)
    return [([collective], s, g, m, 1) for (s, g), m in zip(sent_recv, msgs, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", WORLD_SIZES)
def test_stats_equal_the_model_exactly(backend, p):
    todo = cases(p)
    measured = run(record, p, args=(todo,), backend=backend, timeout=60)
    wrong = []
    for i, case in enumerate(todo):
        want = model(p, *case)
        got = [measured[r][i] for r in range(p)]
        if got != want:
            wrong.append(f"{case}: comm.stats {got} != model {want}")
    assert not wrong, f"{len(wrong)} of {len(todo)} cases differ:\n" + "\n".join(wrong[:10])


def test_reduce_scatter_of_zero_rows():
    got = run(record, 3, args=([("reduce_scatter", "ring", (0,), np.float64, 0)],),
              backend="thread", timeout=10)
    assert [g[0][1:3] for g in got] == [(0, 0)] * 3


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8])
def test_ring_sends_the_bandwidth_optimal_share_when_p_divides_n(p):
    count, itemsize = 40 * p, 8
    n = count * itemsize
    for sent, received in cost.bytes_per_rank("all_reduce", "ring", count, itemsize, p):
        assert sent == received == 2 * (p - 1) * n // p
    naive = cost.bytes_per_rank("all_reduce", "naive", count, itemsize, p)
    assert naive[0] == ((p - 1) * n, (p - 1) * n) and naive[1] == (n, n)


def test_uneven_ring_chunks_by_hand():
    # p = 3, 7 elements of 8 bytes: chunks of 3, 2, 2 elements = 24, 16, 16 bytes, n = 56
    got = cost.bytes_per_rank("all_reduce", "ring", 7, 8, 3)
    assert got == [((56 - 24) + (56 - 16), (56 - 16) + (56 - 24)),
                   ((56 - 16) + (56 - 16), (56 - 24) + (56 - 16)),
                   ((56 - 16) + (56 - 24), (56 - 16) + (56 - 16))]
    assert cost.messages_per_rank("all_reduce", "recursive_doubling", 7, 8, 6) == [1, 3, 1, 3, 2, 2]
    assert cost.messages_per_rank("broadcast", "tree", 1, 8, 5, root=2) == [0, 0, 3, 0, 1]


def test_time_by_hand():
    a, b, g, n = 1e-5, 1e-9, 3e-10, 8e6
    assert cost.time("all_reduce", "ring", n, 4, a, b, g) == pytest.approx(
        2 * 3 * a + 2 * n * 3 / 4 * b + n * 3 / 4 * g)
    assert cost.time("all_reduce", "naive", n, 4, a, b, g) == pytest.approx(
        2 * 3 * (a + n * b) + 3 * n * g)
    assert cost.time("all_reduce", "recursive_doubling", n, 5, a, b, g) == pytest.approx(
        2 * (a + n * b + n * g) + 2 * a + 2 * n * b + n * g)
    assert cost.time("all_reduce", "recursive_doubling", n, 8, a, b, g) == pytest.approx(
        3 * (a + n * b + n * g))
    assert cost.time("all_reduce", "tree", n, 5, a, b, g) == pytest.approx(
        3 * (2 * a + 2 * n * b + n * g))
    assert cost.time("broadcast", "tree", n, 8, a, b) == pytest.approx(3 * (a + n * b))
    assert cost.time("all_gather", "ring", n, 4, a, b) == pytest.approx(3 * a + n * 3 / 4 * b)
    assert cost.time("barrier", None, 0, 5, a, b) == pytest.approx(3 * a)
    for alg in cost.ALGORITHMS["all_reduce"]:
        assert cost.time("all_reduce", alg, n, 1, a, b, g) == 0


def test_bandwidths():
    assert cost.alg_bandwidth(1e9, 0.5) == 2e9
    assert cost.bus_bandwidth("all_reduce", 1e9, 0.5, 4) == pytest.approx(3e9)
    assert cost.bus_bandwidth("all_gather", 1e9, 0.5, 4) == pytest.approx(1.5e9)
    assert cost.bus_bandwidth("broadcast", 1e9, 0.5, 4) == pytest.approx(2e9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown algorithm 'ring'"):
        cost.bytes_per_rank("broadcast", "ring", 4, 8, 2)
    with pytest.raises(ValueError, match="unknown collective"):
        cost.time("alltoall", None, 4, 2, 1, 1)
    with pytest.raises(ValueError, match="world_size"):
        cost.bytes_per_rank("all_reduce", "ring", 4, 8, 0)


def test_fit_alpha_beta_recovers_alpha_and_beta():
    n = np.array([4.0**k for k in range(12)])
    alpha, beta = 5e-6, 2e-10
    exact = alpha + beta * n
    for relative in (True, False):
        a, b = cost.fit_alpha_beta(n, exact, relative=relative)
        assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    noisy = exact * np.random.default_rng(0).uniform(0.95, 1.05, size=n.shape)
    a, b = cost.fit_alpha_beta(n, noisy)
    assert a == pytest.approx(alpha, rel=0.1) and b == pytest.approx(beta, rel=0.1)


def test_fit_alpha_beta_stays_non_negative():
    n = np.array([1e2, 1e3, 1e4, 1e5])
    a, b = cost.fit_alpha_beta(n, 1e-9 * n - 1e-8)  # would want α < 0
    assert a == 0.0 and b == pytest.approx(1e-9, rel=0.2)
    n = np.array([1.0, 10, 100, 1000])
    a, b = cost.fit_alpha_beta(n, np.array([4e-6, 3e-6, 2e-6, 1e-6]))  # would want β < 0
    assert b == 0 and a > 0
    with pytest.raises(ValueError, match="equal-length"):
        cost.fit_alpha_beta([1, 2, 3], [1, 2])


def test_an_unresolved_term_is_zero_and_link_bandwidth_says_so():
    for top in range(4, 13):  # exactly flat times give a rounding-sized β from lstsq: snapped
        n = np.array([4.0**k for k in range(1, top)])
        flat = np.full(n.shape, 25e-6)  # the thread backend's ping-pong: no growth with n
        a, b = cost.fit_alpha_beta(n, flat)
        assert b == 0.0 and a == pytest.approx(25e-6)
        assert cost.link_bandwidth(b) is None
        a, b = cost.fit_alpha_beta(n, 1e-10 * n)  # pure bandwidth: no per-message term
        assert a == 0.0 and cost.link_bandwidth(b) == pytest.approx(1e10)
    with pytest.raises(ValueError, match="beta"):
        cost.link_bandwidth(-1e-9)


def test_measurements_run_on_the_thread_backend():
    sizes, seconds = cost.measure_ping_pong("thread", sizes=(8, 4096), repeats=3, warmup=1)
    assert list(sizes) == [8, 4096] and seconds.shape == (2,) and np.all(seconds > 0)
    assert cost.measure_gamma(nbytes=2**16) > 0
    assert cost.measure_collective("all_reduce", "ring", 8000, 3, backend="thread",
                                   repeats=2) > 0


# ---- ZeRO's bytes: what each stage's collectives send in a step ------------------------------

UNITS = [10, 7, 1, 0, 24]  # elements per unit: uneven over most N, and an empty one


def _zero_step(comm, stage, units, dtype):
    """One step's collectives of ZeRO-`stage` on padded units (stage 0: data parallelism's
    all-reduce per unit); the bytes comm.stats counted, by operation."""
    comm.stats.reset()
    p = comm.world_size
    for u in units:
        c = -(-u // p)  # ⌈u/N⌉: the unit padded to N·c
        if stage == 0:
            comm.all_reduce(np.ones(u, dtype), algorithm="ring")
            continue
        if stage == 3:  # θ gathered before the forward …
            comm.all_gather(np.ones(c, dtype), algorithm="ring")
        comm.reduce_scatter(np.ones(p * c, dtype))  # my c elements of ∇
        comm.all_gather(np.ones(c, dtype), algorithm="ring")  # … (3: before the backward)
    return {op: comm.stats[op].bytes_sent for op in comm.stats.ops}


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_bytes_equal_comm_stats_exactly(stage, p):
    for dtype in (np.float64, np.float32):
        measured = run(_zero_step, p, args=(stage, UNITS, dtype), backend="thread", timeout=30)
        for rank, counted in enumerate(measured):
            want = cost.zero_bytes_per_rank(stage, UNITS, np.dtype(dtype).itemsize, p, rank)
            assert {op: counted.get(op, 0) for op in ("all_reduce", "reduce_scatter",
                                                      "all_gather")} == \
                {op: want[op] for op in ("all_reduce", "reduce_scatter", "all_gather")}
            assert want["total"] == sum(counted.values())


@pytest.mark.parametrize("p", [2, 4, 8])
def test_zero_sends_what_the_paper_says_when_n_divides_psi(p):
    """Stages 1 and 2 send a ring all-reduce's 2Ψ(N−1)/N·b; stage 3 1.5× that."""
    units, b = [16 * p, 8 * p], 2
    psi = sum(units)
    ring = cost.bytes_per_rank("all_reduce", "ring", psi, b, p)[0][0]
    assert ring == 2 * psi * (p - 1) // p * b
    totals = [cost.zero_bytes_per_rank(stage, units, b, p)["total"] for stage in range(4)]
    assert totals == [ring, ring, ring, 3 * ring // 2]
    assert cost.zero_bytes_per_rank(3, units, b, p)["all_gather"] == ring


def test_zero_bytes_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stage must be a ZeRO stage 0, 1, 2 or 3, got 4"):
        cost.zero_bytes_per_rank(4, [8], 8, 2)
    with pytest.raises(ValueError, match="world_size"):
        cost.zero_bytes_per_rank(1, [8], 8, 0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        cost.zero_bytes_per_rank(0, [8], 8, 2, rank=2)
    with pytest.raises(ValueError, match="unit_sizes must be an integer >= 0"):
        cost.zero_bytes_per_rank(1, [8, -1], 8, 2)
    with pytest.raises(TypeError, match="unit_sizes must be an integer >= 0"):
        cost.zero_bytes_per_rank(1, [8, 2.5], 8, 2)
    with pytest.raises(TypeError, match="unit_sizes must be a list of element counts"):
        cost.zero_bytes_per_rank(1, 8, 8, 2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_bytes_equal_what_a_zero_training_step_sends(stage):
    """train(strategy="zero"): each rank's reduce-scatter and all-gather bytes per step."""
    from minidist import data, nn, train
    from minidist.parallel.buckets import units

    X, y = data.make_classification(32, 6, 3, seed=0)
    model_fn, steps = (lambda: nn.mlp([6, 8, 8, 3], seed=1)), 2
    hist = train(model_fn, X, y, strategy="zero", stage=stage, bucket_bytes=1, workers=3,
                 backend="thread", steps=steps, batch_size=8, lr=0.05)
    sizes = [unit.size for unit in units(model_fn(), 1)]  # one unit per Linear: 27, 72, 56
    for rank, stats in enumerate(hist.stats):
        want = cost.zero_bytes_per_rank(stage, sizes, 8, 3, rank)
        for op in ("reduce_scatter", "all_gather"):
            assert stats[op]["bytes_sent"] == steps * want[op]
