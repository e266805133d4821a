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
        comm.reduce_scatter(x)
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
