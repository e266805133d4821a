import numpy as np
import pytest

from minidist import kernels
from minidist.kernels import numpy_ops as K


def test_device_switch():
    assert kernels.device() == "numpy"
    assert kernels.use("auto") == "numpy" and kernels.device() == "numpy"
    with pytest.raises(ValueError, match="unknown device 'tpu'.*numpy"):
        kernels.use("tpu")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.use("cuda")
    assert kernels.ops() is K


def test_matmul_family_against_loops():
    rng = np.random.default_rng(0)
    A, B, C = rng.normal(size=(3, 4)), rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    loop = np.array([[sum(A[i, k] * B[k, j] for k in range(4)) for j in range(2)]
                     for i in range(3)])
    np.testing.assert_allclose(K.matmul(A, B), loop)
    np.testing.assert_allclose(K.matmul_tn(A, C), A.T @ C)
    np.testing.assert_allclose(K.matmul_nt(C, B), C @ B.T)
    np.testing.assert_allclose(K.sum_rows(C), [C[:, 0].sum(), C[:, 1].sum()])
    assert K.total(np.arange(5.0)) == 10.0


def test_in_place_updates():
    y = np.ones(3)
    K.axpy(2.0, np.arange(3.0), y)
    np.testing.assert_array_equal(y, [1.0, 3.0, 5.0])
    p, v = np.ones(2), np.zeros(2)
    K.sgd_update(p, np.array([1.0, 2.0]), v, lr=0.5, momentum=0.0, weight_decay=0.0)
    np.testing.assert_array_equal(p, [0.5, 0.0])
    np.testing.assert_array_equal(v, 0.0)  # untouched without momentum
