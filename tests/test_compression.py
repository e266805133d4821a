"""Sending less in data parallelism: top-k with error feedback, QSGD, local SGD.

Compressors are checked entry by entry; the training runs against an uncompressed run, a
hand-written local-SGD reference, and the byte counts of minidist.cost."""

import functools
import math

import numpy as np
import pytest

import minidist
from minidist import cost, data, nn
from minidist.parallel.compression import QSGD, TopK

X, y = data.load_digits()
X_TRAIN, X_TEST, Y_TRAIN, Y_TEST = data.train_test_split(X, y, test_fraction=0.25, seed=0)
DIGITS_MLP = functools.partial(nn.mlp, [64, 128, 10], seed=0)
N_PARAMS = DIGITS_MLP().num_params


def _train(workers=4, steps=300, **options):
    return minidist.train(DIGITS_MLP, X_TRAIN, Y_TRAIN, strategy="data_parallel",
                          workers=workers, backend="thread", steps=steps, batch_size=64, lr=0.1,
                          **options)


def test_topk_keeps_exactly_the_largest_entries():
    v = np.random.default_rng(0).standard_normal(1000)
    topk = TopK(1000, 0.05)
    message = topk.encode(v)
    assert topk.k == 50 and message.dtype == np.uint8 and message.nbytes == 50 * 12 == topk.nbytes
    kept = np.argsort(-np.abs(v))[:50]
    expected = np.zeros(1000)
    expected[kept] = v[kept]
    np.testing.assert_array_equal(topk.decode(message), expected)
    # a contraction, which is what error feedback needs: ‖v − topk(v)‖² ≤ (1 − k/n)‖v‖²
    assert np.sum((v - expected) ** 2) <= (1 - 50 / 1000) * np.sum(v**2)
    assert TopK(7, 1e-9).k == 1 and TopK(7, 1.0).k == 7


@pytest.mark.parametrize("levels, nbytes", [(3, 8 + 26), (7, 8 + 26), (100, 8 + 51)])
def test_qsgd_codes_lie_on_the_grid_and_are_unbiased(levels, nbytes):
    rng = np.random.default_rng(1)
    v = rng.standard_normal(51)
    qsgd = QSGD(51, levels, np.random.default_rng(2))
    assert qsgd.nbytes == nbytes == qsgd.encode(v).nbytes
    norm = np.linalg.norm(v)
    draws = np.array([qsgd.decode(qsgd.encode(v)) for _ in range(4000)])
    codes = draws * levels / norm
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)
    assert np.all(np.abs(codes) <= levels + 1e-9)
    assert np.all(np.sign(codes) * np.sign(v) >= 0)  # a code never flips the sign
    # unbiased: the mean of 4000 draws is within 5 standard errors of v, entry by entry
    spread = norm / levels / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - v) < 5 * spread)
    np.testing.assert_array_equal(qsgd.decode(qsgd.encode(np.zeros(51))), np.zeros(51))


def test_error_feedback_makes_topk_converge_on_digits():
    plain = _train()
    with_feedback = _train(compression="topk", compress_ratio=0.01)
    without = _train(compression="topk", compress_ratio=0.01, error_feedback=False)
    final = lambda h: h.loss[-20:].mean()  # noqa: E731
    assert final(with_feedback) < 1.1 * final(plain)
    assert final(without) > 2 * final(plain)
    assert with_feedback.accuracy(X_TEST, Y_TEST) > 0.9
    assert without.accuracy(X_TEST, Y_TEST) < with_feedback.accuracy(X_TEST, Y_TEST)


@pytest.mark.parametrize("options, message_bytes", [
    ({"compression": "topk", "compress_ratio": 0.01}, 12 * math.ceil(0.01 * N_PARAMS)),
    ({"compression": "topk", "compress_ratio": 0.2}, 12 * math.ceil(0.2 * N_PARAMS)),
    ({"compression": "qsgd", "qsgd_levels": 7}, 8 + math.ceil(N_PARAMS / 2)),
    ({"compression": "qsgd", "qsgd_levels": 127}, 8 + N_PARAMS),
])
def test_history_bytes_are_the_compressed_sizes(options, message_bytes):
    steps, workers = 5, 3
    history = _train(workers=workers, steps=steps, **options)
    expected = cost.bytes_per_rank("all_gather", "ring", message_bytes, 1, workers)
    for rank, stats in enumerate(history.stats):
        assert set(stats) == {"broadcast", "all_gather"}  # no full-size all-reduce left
        assert stats["all_gather"]["bytes_sent"] == steps * expected[rank][0]
        assert stats["all_gather"]["calls"] == steps
        assert history.bytes_sent[rank] == (stats["all_gather"]["bytes_sent"]
                                            + stats["broadcast"]["bytes_sent"])


def test_qsgd_leaves_error_feedback_off_unless_asked():
    default = _train(steps=20, compression="qsgd")
    off = _train(steps=20, compression="qsgd", error_feedback=False)
    on = _train(steps=20, compression="qsgd", error_feedback=True)
    np.testing.assert_array_equal(default.params, off.params)
    assert not np.array_equal(default.params, on.params)


def _local_sgd_reference(workers, steps, local_steps, batch_size=30, lr=0.1):
    """Replicas stepping on their own shard's gradient; a weighted average every H steps."""
    replicas = [DIGITS_MLP() for _ in range(workers)]
    for t, batch in enumerate(data.step_batches(len(X_TRAIN), batch_size, steps, seed=0)):
        weights = []
        for k, replica in enumerate(replicas):
            start, stop = data.shard_bounds(len(batch), k, workers)
            replica.loss_and_grad(X_TRAIN[batch[start:stop]], Y_TRAIN[batch[start:stop]])
            replica.params -= lr * replica.grads
            weights.append((stop - start) / len(batch))
        if (t + 1) % local_steps == 0 or t + 1 == steps:
            average = sum(w * r.params for w, r in zip(weights, replicas, strict=True))
            for replica in replicas:
                replica.params[...] = average
    return replicas[0].params


@pytest.mark.parametrize("local_steps", [1, 3])
def test_local_sgd_matches_a_hand_written_reference(local_steps):
    steps, workers = 7, 4  # a batch of 30 on 4 workers: uneven shards (8, 8, 7, 7)
    history = minidist.train(DIGITS_MLP, X_TRAIN, Y_TRAIN, strategy="data_parallel",
                             workers=workers, backend="thread", steps=steps, batch_size=30,
                             lr=0.1, local_steps=local_steps)
    reference = _local_sgd_reference(workers, steps, local_steps)
    np.testing.assert_allclose(history.params, reference, rtol=0, atol=1e-10)
    syncs = history.stats[0]["all_reduce"]["calls"]
    assert syncs == (steps if local_steps == 1 else math.ceil(steps / local_steps))
    if local_steps > 1:  # one all-reduce of θ per sync
        ring = cost.bytes_per_rank("all_reduce", "ring", N_PARAMS, 8, workers)
        assert history.stats[1]["all_reduce"]["bytes_sent"] == syncs * ring[1][0]


@pytest.mark.parametrize("options, message", [
    ({"compression": "zip"}, "unknown compression 'zip'"),
    ({"compression": "topk", "compress_ratio": 0}, "compress_ratio"),
    ({"compression": "topk", "compress_ratio": 1.5}, "compress_ratio"),
    ({"compression": "qsgd", "qsgd_levels": 200}, "qsgd_levels"),
    ({"local_steps": 0}, "local_steps must be an integer >= 1"),
    ({"local_steps": 2.5}, "local_steps must be an integer"),  # a TypeError, named alike
    ({"local_steps": 4, "compression": "topk"}, "does not combine"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _train(steps=1, **options)


@pytest.mark.parametrize("options", [{"compression": "topk"}, {"compression": "qsgd"},
                                     {"local_steps": 3}])
def test_processes_send_and_compute_what_threads_do(options):
    runs = [minidist.train(DIGITS_MLP, X_TRAIN, Y_TRAIN, strategy="data_parallel", workers=3,
                           backend=backend, steps=7, batch_size=30, **options)
            for backend in ("thread", "process")]
    np.testing.assert_array_equal(runs[0].params, runs[1].params)
    assert runs[0].bytes_sent == runs[1].bytes_sent
