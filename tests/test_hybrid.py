
import numpy as np
import pytest

from minidist import run, train
from minidist.parallel.hybrid import Topology

STEPS = 20


def test_topology_numbers_ranks_with_tensor_parallel_peers_adjacent():
    topo = Topology(dp=2, tp=3, pp=2)
    assert topo.world_size == 12
    assert [topo.coords(r) for r in (0, 1, 3, 6, 11)] == [
        {"dp": 0, "pp": 0, "tp": 0}, {"dp": 0, "pp": 0, "tp": 1}, {"dp": 0, "pp": 1, "tp": 0},
        {"dp": 1, "pp": 0, "tp": 0}, {"dp": 1, "pp": 1, "tp": 2}]
    assert all(topo.rank(**topo.coords(r)) == r for r in range(12))
    assert topo.group("tp", 4) == [3, 4, 5]
    assert topo.group("pp", 4) == [1, 4]
    assert topo.group("dp", 4) == [4, 10]
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got 0"):
        Topology(dp=2, tp=0)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 12\), got 12"):
        topo.coords(12)


def _who_is_in_my_groups(comm, topo):
    groups = topo.split(comm)
    out = {}
    for axis, group in groups.items():
        mine = np.array([comm.rank], dtype=np.int64)
        out[axis] = sorted(group.all_gather(mine).ravel().tolist())
        assert group.rank == topo.coords(comm.rank)[axis]
    return out


def test_split_gives_each_rank_its_three_groups():
    topo = Topology(dp=2, tp=2, pp=2)
    results = run(_who_is_in_my_groups, 8, args=(topo,), backend="thread")
    for rank, groups in enumerate(results):
        assert groups == {axis: topo.group(axis, rank) for axis in ("tp", "pp", "dp")}


@pytest.fixture(scope="module")
def problem(small_mlp_problem):
    return small_mlp_problem(30, STEPS)


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("dp, tp, pp, m", [(2, 2, 1, 1), (2, 1, 2, 3), (2, 2, 2, 2)])
def test_hybrid_reproduces_single(problem, dp, tp, pp, m, backend):
    model_fn, X, y, kwargs, reference = problem
    hist = train(model_fn, X, y, strategy="hybrid", workers=dp * tp * pp, dp=dp, tp=tp, pp=pp,
                 micro_batches=m, backend=backend, **kwargs)
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
    assert [(d["dp"], d["pp"], d["tp"]) for d in hist.details] == [
        tuple(Topology(dp, tp, pp).coords(r).values()) for r in range(dp * tp * pp)]
    assert min(hist.bytes_sent) > 0


def test_data_parallel_halves_the_batch_tensor_parallel_halves_the_weights(problem):
    model_fn, X, y, kwargs, _ = problem
    kwargs = {**kwargs, "steps": 2}
    hist = train(model_fn, X, y, strategy="hybrid", workers=4, dp=2, tp=2, backend="thread",
                 algorithm="ring", **kwargs)
    tp_only = train(model_fn, X, y, strategy="tensor_parallel", workers=2, backend="thread",
                    algorithm="ring", **kwargs)
    assert hist.details[0]["param_bytes"] == tp_only.details[0]["param_bytes"]
    tp_ops = tp_only.stats[0]["all_reduce"]
    both = hist.stats[0]["all_reduce"]
    assert both["calls"] == tp_ops["calls"] + 2  # + one gradient all-reduce over dp per step
    # activations of 15 rows instead of 30: half the tensor-parallel bytes; plus, each step,
    # a ring all-reduce over dp=2 of this rank's gradients: 2(dp−1)/dp · n = n bytes
    grads = hist.details[0]["param_bytes"]
    assert both["bytes_sent"] == tp_ops["bytes_sent"] / 2 + 2 * grads


@pytest.mark.parametrize("options, match", [
    ({"workers": 3, "dp": 2, "tp": 2}, r"dp×tp×pp = 2×2×1 = 4 ranks, but workers=3"),
    ({"workers": 3, "dp": 1, "tp": 3}, "has 16 outputs, not divisible by tp=3"),
    ({"workers": 8, "dp": 1, "pp": 8}, "more stages than layers"),
    ({"workers": 4, "dp": 2, "tp": 0}, "tp must be an integer >= 1"),
    ({"workers": 4, "dp": 4, "micro_batches": 8}, "batch_size=30 cannot give dp=4"),
])
def test_bad_hybrid_shapes_are_named(problem, options, match):
    model_fn, X, y, _, _ = problem
    with pytest.raises(ValueError, match=match):
        train(model_fn, X, y, strategy="hybrid", backend="thread", steps=1, batch_size=30,
              **options)


@pytest.mark.parametrize("strategy, workers, options", [
    ("tensor_parallel", 4, {}), ("pipeline", 3, {"micro_batches": 4, "schedule": "1f1b"}),
    ("hybrid", 8, {"dp": 2, "tp": 2, "pp": 2, "micro_batches": 2})])
def test_model_parallel_strategies_reproduce_single_under_mpi(problem, strategy, workers, options):
    model_fn, X, y, kwargs, reference = problem
    hist = train(model_fn, X, y, strategy=strategy, workers=workers, backend="mpi", **kwargs,
                 **options)
    np.testing.assert_allclose(hist.params, reference.params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
