import numpy as np

from minidist.gradcheck import numerical_gradient, relative_error


def test_numerical_gradient_of_a_known_function():
    A = np.array([[2.0, 1.0], [1.0, 3.0]])
    x = np.array([0.5, -1.5])
    grad = numerical_gradient(lambda v: 0.5 * v @ A @ v + np.sin(v[0]), x)
    np.testing.assert_allclose(grad, A @ x + [np.cos(0.5), 0.0], rtol=1e-8)
    np.testing.assert_array_equal(x, [0.5, -1.5])  # restored after perturbing


def test_relative_error_is_scale_free():
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert relative_error([1e-9, 0.0], [2e-9, 0.0]) == relative_error([1.0, 0.0], [2.0, 0.0])
    assert relative_error([], []) == 0.0
