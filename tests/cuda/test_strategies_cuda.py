"""Strategies on device="cuda" models: the same SGD as the numpy run, and the copies counted.

The thread-backend runs use `strict_device_arrays`, so numpy maths on a device buffer, or a
host-device copy nobody counts, fails here as it would misbehave on a real GPU.
"""

import functools
import threading

import numpy as np
import pytest
from strict_device import HiddenTransfer, strict_device_arrays

from minidist import data, kernels, nn, train
from minidist.comm.staging import HostStaging
from minidist.errors import WorkerError
from minidist.kernels import cuda as cuda_ops
from minidist.launch import run
from minidist.parallel.buckets import buckets, units
from minidist.parallel.job import Job

SIZES, STEPS, BATCH = [64, 12, 10], 2, 16
RUN = dict(steps=STEPS, batch_size=BATCH, lr=0.1, seed=1)


@pytest.fixture(scope="module")
def digits():
    X, y = data.load_digits()
    return X[:64], y[:64]


def _model_fn(device):
    return functools.partial(nn.mlp, SIZES, seed=2, device=device)


def _single(digits, **options):
    return train(_model_fn("numpy"), *digits, **RUN, **options)


def _param_bytes():
    return nn.mlp(SIZES).params.nbytes


@pytest.mark.parametrize("options, optimizer", [
    ({"bucket_bytes": 400}, {"optimizer_options": {"momentum": 0.9}}),
    ({"overlap": True, "bucket_bytes": 400}, {"optimizer": "adam"}),
])
def test_data_parallel_on_cuda_is_single_sgd_and_copies_once_each_way_per_bucket(
        digits, options, optimizer):
    with strict_device_arrays():
        run_ = train(_model_fn("cuda"), *digits, strategy="data_parallel", workers=2,
                     backend="thread", **RUN, **optimizer, **options)
    reference = _single(digits, **optimizer)
    np.testing.assert_allclose(run_.params, reference.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run_.loss, reference.loss, rtol=1e-10)
    model = nn.mlp(SIZES)
    parts = (len(units(model, 400, 8)) if options.get("overlap")
             else len(buckets(model.num_params, 8, 400)))
    assert parts >= 2  # the test cuts the gradient into several buckets
    for rank, details in enumerate(run_.details):
        # the start-up broadcast: rank 0 copies θ down, rank 1 copies it up; then per step
        # and bucket one copy down and one up
        assert details["host_copies"] == {
            "to_host": STEPS * parts + (rank == 0), "to_device": STEPS * parts + (rank == 1),
            "bytes": _param_bytes() * (1 + 2 * STEPS)}


def test_data_parallel_on_cuda_on_the_process_backend(digits):
    run_ = train(_model_fn("cuda"), *digits, strategy="data_parallel", workers=2,
                 backend="process", **RUN)
    np.testing.assert_allclose(run_.params, _single(digits).params, rtol=1e-10, atol=1e-12)
    assert run_.details[1]["host_copies"]["to_device"] == STEPS + 1


def test_parameter_server_on_cuda_pulls_up_and_pushes_down_once_a_step(digits):
    run_ = train(_model_fn("cuda"), *digits, strategy="parameter_server", workers=2, **RUN)
    np.testing.assert_allclose(run_.params, _single(digits).params, rtol=1e-10, atol=1e-12)
    assert run_.ps["host_copies"] == [
        {"to_host": STEPS, "to_device": STEPS, "bytes": 2 * STEPS * _param_bytes()}] * 2


@pytest.mark.parametrize("strategy, options", [
    ("tensor_parallel", {}), ("pipeline", {}), ("hybrid", {"dp": 2}), ("zero", {}),
    ("distributed_gd", {})])
def test_host_only_strategies_refuse_a_cuda_model(digits, strategy, options):
    with pytest.raises(ValueError, match=rf"strategy='{strategy}' runs on the host.*"
                                         "device='numpy'"):
        train(_model_fn("cuda"), *digits, strategy=strategy, workers=2, **RUN, **options)


def test_data_parallel_on_cuda_refuses_what_runs_on_the_host(digits):
    with pytest.raises(ValueError, match=r"compression='topk' runs on the host only"):
        train(_model_fn("cuda"), *digits, strategy="data_parallel", workers=2,
              compression="topk", **RUN)


def test_host_staging_all_reduces_device_buffers_through_host_twins():
    def rank_fn(comm):
        buffer = cuda_ops.to_device(np.arange(6.0) * (comm.rank + 1))
        staging = HostStaging(comm, buffer)
        staging.all_reduce(slice(2, 5))
        return kernels.to_host(buffer), staging.copies

    with strict_device_arrays():
        results = run(rank_fn, 3, backend="thread")
    for rank, (values, copies) in enumerate(results):
        expected = np.arange(6.0) * (rank + 1)  # its own values outside the part,
        expected[2:5] = np.arange(2.0, 5.0) * 6  # the sum over ranks 1 + 2 + 3 inside
        np.testing.assert_array_equal(values, expected)
        assert copies == {"to_host": 1, "to_device": 1, "bytes": 2 * 3 * 8}
    with pytest.raises(WorkerError, match="HostStaging stages a device array"):
        run(lambda comm: HostStaging(comm, np.zeros(3)), 1, backend="thread")


def test_each_rank_takes_gpu_rank_mod_count(monkeypatch):
    assert [cuda_ops.device_for_rank(k, 3) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_ops.device_for_rank(0, 0)
    picked = []
    monkeypatch.setattr(cuda_ops, "select_rank_device", picked.append)
    job = Job(_model_fn("cuda"), None, None, 1, 1, 0.1, "sgd", {}, 0)

    def build(rank):
        job.model(rank)
        job.model(rank)  # a thread picks its GPU once

    threads = [threading.Thread(target=build, args=(rank,)) for rank in (3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(picked) == [3, 5]


def test_strict_device_arrays_catch_host_maths_on_a_device_array():
    device = cuda_ops.to_device(np.ones(4))
    with strict_device_arrays():
        for misuse in (lambda: np.asarray(device), lambda: device * 2.0,
                       lambda: device.sum(), lambda: device[0],
                       lambda: device.__setitem__(slice(None), np.zeros(4))):
            with pytest.raises(HiddenTransfer):
                misuse()
        assert kernels.to_host(device).sum() == 4.0  # the counted copy is fine
    assert float(device.sum()) == 4.0  # and outside, the simulator is as lenient as before
