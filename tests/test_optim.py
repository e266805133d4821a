import numpy as np
import pytest

from minidist import optim


def test_plain_sgd_step():
    p = np.array([1.0, -2.0])
    opt = optim.SGD(p, lr=0.5)
    opt.step(np.array([0.2, 0.4]))
    np.testing.assert_allclose(p, [0.9, -2.2])


def test_sgd_momentum_and_weight_decay_by_hand():
    p = np.array([1.0])
    opt = optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step(np.array([1.0]))  # g = 1 + 0.1·1 = 1.1; v = 1.1; p = 1 − 0.11 = 0.89
    np.testing.assert_allclose(p, [0.89])
    opt.step(np.array([1.0]))  # g = 1.089; v = 0.99 + 1.089 = 2.079; p = 0.89 − 0.2079
    np.testing.assert_allclose(p, [0.6821])
    np.testing.assert_allclose(opt.state["velocity"], [2.079])


def test_adam_by_hand():
    p = np.array([1.0, 1.0])
    opt = optim.Adam(p, lr=0.1, betas=(0.5, 0.75), eps=0.0)
    opt.step(np.array([2.0, -1.0]))  # m̂ = g, v̂ = g², so the first step is −lr·sign(g)
    np.testing.assert_allclose(p, [0.9, 1.1])
    opt.step(np.array([1.0, -1.0]))
    # coordinate 0: m = .5·1 + .5·1 ... computed from the definitions
    m = 0.5 * (0.5 * 2.0) + 0.5 * 1.0
    v = 0.75 * (0.25 * 4.0) + 0.25 * 1.0
    step = 0.1 * (m / (1 - 0.5**2)) / np.sqrt(v / (1 - 0.75**2))
    assert p[0] == pytest.approx(0.9 - step)
    assert p[1] == pytest.approx(1.2)  # constant gradient: the normalised step stays lr


def test_adam_converges_on_a_quadratic():
    p = np.array([3.0, -4.0])
    opt = optim.Adam(p, lr=0.05)
    for _ in range(2000):
        opt.step(2 * p)
    np.testing.assert_allclose(p, 0.0, atol=1e-3)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam])
def test_state_dict_round_trip_resumes_exactly(cls):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 3))
    kwargs = {"momentum": 0.9} if cls is optim.SGD else {}
    straight = np.ones(3)
    opt = cls(straight, lr=0.1, **kwargs)
    for g in grads:
        opt.step(g)
    resumed = np.ones(3)
    first = cls(resumed, lr=0.1, **kwargs)
    for g in grads[:3]:
        first.step(g)
    second = cls(resumed, lr=0.1, **kwargs)
    second.load_state_dict(first.state_dict())
    for g in grads[3:]:
        second.step(g)
    np.testing.assert_array_equal(resumed, straight)
    with pytest.raises(ValueError, match="shape"):
        second.load_state_dict({**first.state_dict(), **{k: np.zeros(2) for k in second.state}})


def test_schedules():
    warm = optim.linear_warmup(1.0, warmup_steps=4)
    assert [warm(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert optim.constant(0.3)(100) == 0.3
    p = np.zeros(1)
    opt = optim.SGD(p, lr=optim.linear_warmup(1.0, 2))
    opt.step(np.ones(1))
    opt.step(np.ones(1))
    np.testing.assert_allclose(p, [-1.5])
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.linear_warmup(1.0, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="flat 1-D"):
        optim.SGD(np.zeros((2, 2)), lr=0.1)
    with pytest.raises(ValueError, match="grads"):
        optim.SGD(np.zeros(3), lr=0.1).step(np.zeros(2))
    with pytest.raises(ValueError, match="optimizer"):
        optim.make("lbfgs", np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(np.zeros(3), 0.1, betas=(1.0, 0.9))
