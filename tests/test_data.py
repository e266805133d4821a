import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidist import data


def test_digits_match_scikit_learn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = data.load_digits()
    ref = sklearn_datasets.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float64
    assert y.shape == (1797,) and y.dtype == np.int64
    assert 0.0 <= X.min() and X.max() <= 1.0 and X.max() == 1.0
    np.testing.assert_array_equal(X * 16.0, ref.data)
    np.testing.assert_array_equal(y, ref.target)


@given(n=st.integers(0, 500), world_size=st.integers(1, 40))
def test_shards_partition_range(n, world_size):
    shards = [data.shard(n, r, world_size) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:  # contiguous
        assert len(s) == 0 or np.array_equal(s, np.arange(s[0], s[-1] + 1))


@pytest.mark.parametrize("rank, world_size, match", [
    (0, 0, "world_size"), (-1, 4, "rank"), (4, 4, "rank"), (0, 2.5, "world_size"),
])
def test_shard_rejects_bad_rank_or_world_size(rank, world_size, match):
    with pytest.raises(ValueError, match=match):
        data.shard(10, rank, world_size)


def test_train_test_split_is_a_seeded_partition():
    X, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    Xtr, Xte, ytr, yte = data.train_test_split(X, y, test_fraction=0.3, seed=1)
    assert len(Xte) == 3 and len(Xtr) == 7
    np.testing.assert_array_equal(np.sort(np.concatenate([ytr, yte])), y)
    np.testing.assert_array_equal(Xtr[:, 0] / 2, ytr)  # rows stay with their labels
    again = data.train_test_split(X, y, test_fraction=0.3, seed=1)
    np.testing.assert_array_equal(again[3], yte)
    with pytest.raises(ValueError, match="test_fraction"):
        data.train_test_split(X, y, test_fraction=1.0)
    with pytest.raises(ValueError, match="rows"):
        data.train_test_split(X, y[:5])


@given(n=st.integers(1, 100), batch_size=st.integers(1, 30), seed=st.integers(0, 3))
def test_batches_cover_an_epoch_reproducibly(n, batch_size, seed):
    epoch = list(data.batches(n, batch_size, seed=seed, epoch=2))
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(n))
    assert all(len(b) == batch_size for b in epoch[:-1])
    again = list(data.batches(n, batch_size, seed=seed, epoch=2))
    assert all(np.array_equal(a, b) for a, b in zip(epoch, again, strict=True))


def test_step_batches_run_across_epochs_with_full_batches():
    steps = list(data.step_batches(10, 4, steps=7, seed=0))
    assert len(steps) == 7 and all(len(b) == 4 for b in steps)
    # 2 full batches per epoch: steps 0-1 come from epoch 0, steps 2-3 from epoch 1, ...
    epoch1 = list(data.batches(10, 4, seed=0, epoch=1, drop_last=True))
    np.testing.assert_array_equal(steps[2], epoch1[0])
    with pytest.raises(ValueError, match="batch_size"):
        list(data.step_batches(3, 4, steps=1))


def test_synthetic_data_is_seeded_and_shaped():
    X, y, theta = data.make_regression(50, 3, noise=0.0, seed=4)
    assert X.shape == (50, 3) and y.shape == (50,) and theta.shape == (3,)
    np.testing.assert_allclose(X @ theta, y)
    np.testing.assert_array_equal(data.make_regression(50, 3, seed=4)[0], X)
    Xc, yc = data.make_classification(60, 2, 3, seed=0)
    assert Xc.shape == (60, 2) and yc.dtype == np.int64 and set(yc) <= {0, 1, 2}
    with pytest.raises(ValueError, match="k must be"):
        data.make_classification(10, 2, 0)
