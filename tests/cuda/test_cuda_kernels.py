"""Every CUDA kernel against the numpy reference, at small and awkward sizes (the simulator runs a
Python thread per CUDA thread), plus larger sizes on a real GPU (`gpu` marker)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidist import kernels
from minidist.kernels import cuda_matmul
from minidist.kernels import numpy_ops as R

C = kernels.ops("cuda")
rng = np.random.default_rng(0)
PRODUCTS = {"matmul": (False, False), "matmul_tn": (True, False), "matmul_nt": (False, True)}


def _operands(name, m, k, n, dtype=np.float64, seed=0):
    """A, B stored the way `name` reads them, so that the product is (m, n)."""
    g = np.random.default_rng(seed)
    trans_a, trans_b = PRODUCTS[name]
    A = g.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    B = g.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    return A, B


@pytest.mark.parametrize("name", PRODUCTS)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (17, 33, 5), (8, 4, 8), (3, 1, 30)])
def test_matmul_family_awkward_shapes(name, m, k, n):
    A, B = _operands(name, m, k, n)
    got = getattr(C, name)(A, B)
    assert isinstance(got, np.ndarray) and got.shape == (m, n)  # host in, host out
    np.testing.assert_allclose(got, getattr(R, name)(A, B), rtol=1e-12, atol=1e-12)


@settings(max_examples=4)
@given(name=st.sampled_from(list(PRODUCTS)), m=st.integers(1, 20), k=st.integers(1, 20),
       n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_matmul_hypothesis_shapes(name, m, k, n, seed):
    A, B = _operands(name, m, k, n, seed=seed)
    np.testing.assert_allclose(getattr(C, name)(A, B), getattr(R, name)(A, B), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_tiling_is_correct_too(dtype):
    """The 256-thread register tiling a real GPU uses, run (one block) in the simulator."""
    A, B = _operands("matmul_nt", 17, 33, 5, dtype)
    out = C.zeros((17, 5), dtype)
    cuda_matmul.launch(C.to_device(A), C.to_device(B), out, False, True,
                       cuda_matmul.GPU_TILING[np.dtype(dtype)])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out.copy_to_host(), A @ B.T, rtol=tol, atol=tol)


def test_matmul_float32_and_bad_input():
    A, B = _operands("matmul", 9, 13, 7, np.float32)
    got = C.matmul(A, B)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, A @ B, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"inner dimensions differ: A is \(9, 13\), B is \(9, 2"):
        C.matmul(A, np.ones((9, 2), np.float32))
    with pytest.raises(ValueError, match="float32 or two float64.*int64"):
        C.matmul(np.ones((2, 2), np.int64), np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="float32 or two float64.*float32 and float64"):
        C.matmul(A, B.astype(np.float64))


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (32, 3)])
def test_bias_activation_fused_and_backward(activation, shape):
    Z, b, dY = rng.normal(size=shape), rng.normal(size=shape[1]), rng.normal(size=shape)
    np.testing.assert_allclose(C.add_bias(Z, b, activation), R.add_bias(Z, b, activation),
                               rtol=1e-14, atol=1e-15)
    if activation == "relu":
        np.testing.assert_array_equal(C.relu(Z), R.relu(Z))
        np.testing.assert_array_equal(C.relu_backward(dY, Z), R.relu_backward(dY, Z))
    if activation == "tanh":
        Y = np.tanh(Z)
        np.testing.assert_allclose(C.tanh(Z), R.tanh(Z), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(C.tanh_backward(dY, Y), R.tanh_backward(dY, Y), rtol=1e-14)
    with pytest.raises(ValueError, match=r"b must be \(Z.shape\[1\],\)"):
        C.add_bias(Z, np.ones(shape[1] + 1))


@pytest.mark.parametrize("n", [1, 31, 33, 1000])
def test_tree_reduction_total(n):
    x = rng.normal(size=n)
    assert C.total(x) == pytest.approx(R.total(x), rel=1e-12, abs=1e-12)
    assert C.total(x, square=True) == pytest.approx(np.sum(x * x), rel=1e-12)
    assert C.total(np.ones(n)) == n  # exact: every partial sum is an integer


@pytest.mark.parametrize("shape", [(1, 1), (31, 5), (3, 17), (32, 32)])
def test_sum_rows(shape):
    dY = rng.normal(size=shape)
    np.testing.assert_allclose(C.sum_rows(dY), R.sum_rows(dY), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n, k, scale", [(1, 1, 1.0), (5, 3, 1.0), (9, 40, 1.0), (4, 7, 1e3)])
def test_softmax_cross_entropy(n, k, scale):
    """k = 40 > 32 threads per row exercises the strided loop; scale 1e3 would overflow exp
    without the max shift."""
    z, y = scale * rng.normal(size=(n, k)), rng.integers(0, k, size=n)
    loss, probs = C.softmax_cross_entropy(z, y)
    ref_loss, ref_probs = R.softmax_cross_entropy(z, y)
    assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(C.softmax_cross_entropy_backward(ref_probs, y),
                               R.softmax_cross_entropy_backward(ref_probs, y), atol=1e-16)


def test_float32_kernels():
    """float32 stays float32 (the typed constants), and agrees with numpy in float64."""
    z, y = (5 * rng.normal(size=(6, 37))).astype(np.float32), rng.integers(0, 37, size=6)
    loss, probs = C.softmax_cross_entropy(z, y)
    ref_loss, ref_probs = R.softmax_cross_entropy(z.astype(np.float64), y)
    assert probs.dtype == np.float32 and loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(C.sum_rows(z), z.astype(np.float64).sum(axis=0), rtol=1e-5,
                               atol=1e-5)
    assert C.total(z) == pytest.approx(z.astype(np.float64).sum(), rel=1e-5, abs=1e-4)
    b = rng.normal(size=37).astype(np.float32)
    np.testing.assert_array_equal(C.add_bias(z, b, "relu"), np.maximum(z + b, 0))


def test_mse_and_its_backward():
    pred, target = rng.normal(size=(13, 2)), rng.normal(size=(13, 2))
    loss, residual = C.mse(pred, target)
    ref_loss, ref_residual = R.mse(pred, target)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_array_equal(residual, ref_residual)
    np.testing.assert_allclose(C.mse_backward(residual), R.mse_backward(residual), rtol=1e-15)


def _three(n=50):
    return [rng.normal(size=n) for _ in range(3)]


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)])
def test_sgd_update_in_place_on_host_and_device(momentum, weight_decay):
    params, grads, velocity = _three()
    ref = [params.copy(), velocity.copy()]
    R.sgd_update(ref[0], grads, ref[1], 0.1, momentum, weight_decay)
    host = [params.copy(), velocity.copy()]
    C.sgd_update(host[0], grads, host[1], 0.1, momentum, weight_decay)  # round trip
    dev = [C.to_device(params), C.to_device(velocity)]
    C.sgd_update(dev[0], C.to_device(grads), dev[1], 0.1, momentum, weight_decay)
    for got in (host, [d.copy_to_host() for d in dev]):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-14)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-14)


def test_adam_update_and_axpy():
    params, grads, m = _three()
    v = rng.random(50)
    ref = [params.copy(), m.copy(), v.copy()]
    R.adam_update(*ref[:1], grads, *ref[1:], 1e-2, 0.9, 0.999, 1e-8, 3)
    dev = [C.to_device(a) for a in (params, m, v)]
    C.adam_update(dev[0], C.to_device(grads), dev[1], dev[2], 1e-2, 0.9, 0.999, 1e-8, 3)
    for got, want in zip(dev, ref, strict=True):
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=1e-13)
    y = np.ones(7)
    C.axpy(2.0, np.arange(7.0), y)
    np.testing.assert_array_equal(y, 1.0 + 2.0 * np.arange(7.0))
    with pytest.raises(ValueError, match=r"velocity is float64 \(3,\), params are float64 \(4,\)"):
        C.sgd_update(np.ones(4), np.ones(4), np.ones(3), 0.1, 0.9, 0.0)


def test_results_stay_on_the_device_when_an_input_is_there():
    A, B = _operands("matmul", 4, 3, 2)
    C.reset_transfers()
    out = C.add_bias(C.matmul(C.to_device(A), B), C.to_device(np.zeros(2)), "relu")
    assert kernels.is_device_array(out)
    assert C.transfers["to_host"] == 0 and C.transfers["to_device"] == 3
    np.testing.assert_allclose(kernels.to_host(out), np.maximum(A @ B, 0), rtol=1e-12)


@pytest.mark.gpu
def test_large_sizes_on_a_real_gpu():
    g = np.random.default_rng(1)
    for dtype, tol in [(np.float32, 1e-3), (np.float64, 1e-10)]:
        A, B = g.normal(size=(1000, 700)).astype(dtype), g.normal(size=(700, 900)).astype(dtype)
        np.testing.assert_allclose(C.matmul(A, B), A @ B, rtol=tol, atol=tol)
        np.testing.assert_allclose(C.matmul_tn(A, A), A.T @ A, rtol=tol, atol=tol)
        np.testing.assert_allclose(C.matmul_nt(B, B), B @ B.T, rtol=tol, atol=tol)
    x = g.normal(size=10_000_019)
    assert C.total(x) == pytest.approx(x.sum(), rel=1e-9)
    z, y = 30 * g.normal(size=(4096, 1000)), g.integers(0, 1000, 4096)
    loss, probs = C.softmax_cross_entropy(z, y)
    ref_loss, ref_probs = R.softmax_cross_entropy(z, y)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(C.sum_rows(z), z.sum(axis=0), rtol=1e-9, atol=1e-9)
