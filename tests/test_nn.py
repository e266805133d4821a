import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidist import data, nn, train
from minidist.gradcheck import check_model, numerical_gradient, relative_error

dims = st.integers(1, 5)


def _layer_with_buffers(layer, rng):
    """A lone layer bound to its own flat buffers (what Sequential does for every layer)."""
    shapes = layer.param_shapes()
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = {k: np.zeros(s) for k, s in shapes.items()}
    layer.bind(params, grads)
    return params, grads


@pytest.mark.parametrize("make", [lambda i, o: nn.Linear(i, o), lambda i, o: nn.ReLU(),
                                  lambda i, o: nn.Tanh()], ids=["Linear", "ReLU", "Tanh"])
@given(n=dims, d_in=dims, d_out=dims, seed=st.integers(0, 2**16))
def test_layer_backward_matches_finite_differences(make, n, d_in, d_out, seed):
    """For f = Σ R ⊙ layer(X), backward(R) must return ∂f/∂X and fill ∂f/∂θ."""
    rng = np.random.default_rng(seed)
    layer = make(d_in, d_out)
    params, grads = _layer_with_buffers(layer, rng)
    X = rng.normal(size=(n, d_in))
    R = rng.normal(size=layer.forward(X).shape)

    def f(_):
        return float(np.sum(R * layer.forward(X)))

    layer.forward(X)
    dX = layer.backward(R)
    assert relative_error(dX, numerical_gradient(f, X)) < 1e-6
    for name, p in params.items():
        assert relative_error(grads[name], numerical_gradient(f, p)) < 1e-6, name


@given(n=dims, k=st.integers(2, 6), seed=st.integers(0, 2**16), scale=st.sampled_from([1, 5]))
def test_softmax_cross_entropy_gradient(n, k, seed, scale):
    rng = np.random.default_rng(seed)
    logits, labels = scale * rng.normal(size=(n, k)), rng.integers(0, k, size=n)
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    z = logits - logits.max(axis=1, keepdims=True)  # independent log-softmax
    ref = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), labels])
    assert loss == pytest.approx(ref, rel=1e-12, abs=1e-12)
    analytic = loss_fn.backward()
    numeric = numerical_gradient(lambda x: loss_fn.forward(x, labels), logits.copy())
    # relative error (max-norm), its scale floored at 1e-3: a saturated softmax leaves gradients
    # below what finite differences resolve (loss rounding / ε ≈ 1e-9)
    scale = max(np.max(np.abs(numeric)), 1e-3)
    assert np.max(np.abs(analytic - numeric)) / scale < 1e-6


def test_cross_entropy_is_stable_for_huge_logits():
    loss_fn = nn.SoftmaxCrossEntropy()
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    loss = loss_fn.forward(logits, np.array([0, 0]))
    assert loss == pytest.approx(500.0)
    assert np.all(np.isfinite(loss_fn.backward()))


@given(n=dims, d=dims, seed=st.integers(0, 2**16))
def test_mse_gradient(n, d, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loss_fn = nn.MSELoss()
    assert loss_fn.forward(pred, target) == pytest.approx(0.5 * np.sum((pred - target) ** 2) / n)
    analytic = loss_fn.backward()
    numeric = numerical_gradient(lambda p: loss_fn.forward(p, target), pred.copy())
    assert relative_error(analytic, numeric) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_whole_model_gradient(activation):
    X, y = data.make_classification(12, 4, 3, seed=1)
    model = nn.mlp([4, 6, 5, 3], activation=activation, seed=2)
    assert check_model(model, X, y) < 1e-6
    Xr, yr, _ = data.make_regression(9, 3, seed=2)
    assert check_model(nn.linear_regression(3, seed=1), Xr, yr) < 1e-6


def test_parameters_live_in_one_flat_buffer():
    model = nn.mlp([4, 3, 2], seed=0)
    assert model.params.ndim == 1 and model.params.flags.c_contiguous
    assert model.num_params == 4 * 3 + 3 + 3 * 2 + 2
    assert model.grads.shape == model.params.shape
    W0 = model.layers[0].params["W"]
    assert np.shares_memory(W0, model.params) and W0.shape == (4, 3)
    np.testing.assert_array_equal(model.params[model.slices["0.W"]], W0.ravel())
    model.params = np.arange(model.num_params, dtype=float)  # assignment copies into the buffer
    assert W0[0, 0] == 0.0 and model.layers[2].params["b"][1] == model.num_params - 1
    model.loss_and_grad(np.ones((2, 4)), np.array([0, 1]))
    assert np.shares_memory(model.layers[2].grads["W"], model.grads)
    with pytest.raises(ValueError, match="shape"):
        model.params = np.zeros(3)


def test_same_seed_same_parameters():
    same = nn.mlp([5, 4, 3], seed=7).params, nn.mlp([5, 4, 3], seed=7).params
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(nn.mlp([5, 4, 3], seed=7).params, nn.mlp([5, 4, 3], seed=8).params)
    assert nn.mlp([5, 3], dtype=np.float32).params.dtype == np.float32


def test_bad_inputs_name_the_layer_and_shapes():
    model = nn.mlp([4, 3, 2])
    with pytest.raises(ValueError, match=r"Linear\(4→3\).*\(N, 4\).*\(5, 3\)"):
        model.forward(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="float32"):
        model.forward(np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(np.zeros((2, 4)), np.array([0, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        model.loss_and_grad(np.zeros((2, 4)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="target"):
        nn.linear_regression(3).loss_and_grad(np.zeros((4, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="activation"):
        nn.mlp([4, 2], activation="sigmoid")
    with pytest.raises(ValueError, match="sizes"):
        nn.mlp([4])


@pytest.fixture(scope="module")
def digits_split():
    X, y = data.load_digits()
    return data.train_test_split(X, y, test_fraction=0.25, seed=0)


def test_mlp_learns_digits(digits_split):
    X_train, X_test, y_train, y_test = digits_split
    hist = train(functools.partial(nn.mlp, [64, 128, 10], seed=0), X_train, y_train, steps=600,
                 batch_size=64, lr=0.1, optimizer_options={"momentum": 0.9})
    assert hist.accuracy(X_test, y_test) >= 0.95


def test_logistic_regression_matches_scikit_learn(digits_split):
    linear_model = pytest.importorskip("sklearn.linear_model")
    X_train, X_test, y_train, y_test = digits_split
    reference = linear_model.LogisticRegression(max_iter=5000).fit(X_train, y_train)
    ref_acc = reference.score(X_test, y_test)
    # scikit-learn minimises ½‖W‖² + C Σ loss; as a mean loss that is weight decay 1/(C·n).
    hist = train(functools.partial(nn.logistic_regression, 64, 10), X_train, y_train,
                 steps=3000, batch_size=64, lr=0.5,
                 optimizer_options={"weight_decay": 1.0 / len(X_train)})
    assert abs(hist.accuracy(X_test, y_test) - ref_acc) <= 0.02


def test_sequential_backward_returns_the_input_gradient_only_when_asked():
    rng = np.random.default_rng(3)
    model = nn.mlp([4, 6, 3], seed=1)
    X, y = rng.normal(size=(5, 4)), rng.integers(0, 3, size=5)
    model.loss(X, y)
    assert model.backward() is None  # the data's gradient is skipped by default
    grads = model.grads.copy()
    model.loss(X, y)
    dX = model.backward(input_grad=True)
    np.testing.assert_array_equal(model.grads, grads)
    assert relative_error(dX, numerical_gradient(lambda _: model.loss(X, y), X)) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_fused_linear_activation_is_bitwise_the_layer_by_layer_model(activation):
    """Sequential fuses Linear + activation into one op; numpy must give the same bits."""
    rng = np.random.default_rng(0)
    model = nn.mlp([5, 7, 6, 3], activation=activation, seed=1)
    X, y = rng.normal(size=(9, 5)), rng.integers(0, 3, size=9)
    out = X
    for layer in model.layers:  # one layer at a time, nothing fused
        out = layer.forward(out)
    np.testing.assert_array_equal(model.forward(X), out)
    model.criterion.forward(out, y)
    model.backward()
    layer_by_layer = model.grads.copy()
    model.loss_and_grad(X, y)
    np.testing.assert_array_equal(model.grads, layer_by_layer)
