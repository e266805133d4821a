import numpy as np
import pytest

from minidist import kernels
from minidist.kernels import numpy_ops as K


def test_device_switch():
    """This run has the simulator off (tests/cuda/ runs with it on, in its own pytest call)."""
    assert kernels.device() == "numpy"
    assert kernels.use("numpy") == "numpy" and kernels.ops() is K
    with pytest.raises(ValueError, match="unknown device 'tpu'.*numpy"):
        kernels.use("tpu")
    assert kernels.ops_for(np.zeros(2), 1.0) is K
    if kernels.cuda_mode() is None:  # no GPU: "auto" is numpy, "cuda" says how to simulate
        assert kernels.use("auto") == "numpy" and kernels.device() == "numpy"
        with pytest.raises(RuntimeError, match="no CUDA GPU.*NUMBA_ENABLE_CUDASIM=1"):
            kernels.use("cuda")
        assert kernels.device() == "numpy"


def test_fused_bias_activation_reference():
    Z, b = np.array([[-1.0, 0.5], [2.0, -3.0]]), np.array([0.5, 1.0])
    np.testing.assert_array_equal(K.add_bias(Z, b), Z + b)
    np.testing.assert_array_equal(K.add_bias(Z, b, "relu"), [[0.0, 1.5], [2.5, 0.0]])
    np.testing.assert_allclose(K.add_bias(Z, b, "tanh"), np.tanh(Z + b))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        K.add_bias(Z, b, "gelu")


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
