"""The compiled one-pass SGD update gives numpy's results bit for bit, on both sides of the
size threshold, and leaves other dtypes to numpy."""

import numpy as np
import pytest

from minidist import optim
from minidist.kernels import cpu_fused, numpy_ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2),
                                                   (0.9, 1e-2)])
@pytest.mark.parametrize("n", [1000, cpu_fused.FUSED_MIN + 3])
def test_same_bits_as_numpy(dtype, momentum, weight_decay, n):
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(n).astype(dtype)
    fused, reference = optim.SGD(theta.copy(), 0.0123, momentum, weight_decay, ops=cpu_fused), \
        optim.SGD(theta.copy(), 0.0123, momentum, weight_decay, ops=numpy_ops)
    for _ in range(3):
        grads = rng.standard_normal(n).astype(dtype)
        fused.step(grads)
        reference.step(grads)
    np.testing.assert_array_equal(fused.params, reference.params)
    np.testing.assert_array_equal(fused.state["velocity"], reference.state["velocity"])
    assert not np.array_equal(fused.params, theta)


def test_float16_keeps_numpy():
    theta = np.ones(cpu_fused.FUSED_MIN, np.float16)
    cpu_fused.sgd_update(theta, np.ones_like(theta), np.zeros_like(theta), 0.5, 0.0, 0.0)
    np.testing.assert_array_equal(theta, np.full_like(theta, 0.5))
