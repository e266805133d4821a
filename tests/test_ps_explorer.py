"""The ideal consistency schedules of lesson 6 (minidist.ps.explorer.simulate_consistency),
checked against schedules worked out by hand and against the protocol's bounds."""

import numpy as np
import pytest

from minidist.ps.explorer import plot_simulated, simulate_consistency


def straggler(workers=3, steps=80, slowdown=3.0):
    durations = np.ones((workers, steps))
    durations[1] *= slowdown
    return durations


def test_a_constant_straggler_by_hand():
    # worker 1 pushes clock c at 3(c + 1); the fast workers at c + 1 when nothing holds them
    bsp = simulate_consistency("bsp", straggler())
    np.testing.assert_array_equal(bsp.finish, [240, 240, 240])  # every ack waits for worker 1
    assert bsp.consistency_waits == [79, 0, 79] and bsp.wait_time == [158, 0, 158]
    assert bsp.max_gap == 0 and not bsp.staleness.any() and len(bsp.staleness) == 240

    asp = simulate_consistency("asp", straggler())
    np.testing.assert_array_equal(asp.finish, [80, 240, 80])
    # the widest gap is the last fast pull: clock 79 at t = 79, worker 1 at clock ⌊79/3⌋
    assert asp.consistency_waits == [0, 0, 0] and asp.max_gap == 79 - 79 // 3

    # SSP(2): a fast pull of clock c waits until c − ⌊t/3⌋ ≤ 2; clock 4 is the first held back,
    # clock 79 is allowed at t = 3·77 = 231 and pushed at 232
    ssp = simulate_consistency("ssp", straggler(), staleness=2)
    np.testing.assert_array_equal(ssp.finish, [232, 240, 232])
    assert ssp.consistency_waits == [76, 0, 76] and ssp.max_gap == 2


def test_a_hiccup_shorter_than_the_bound_stops_nobody_under_ssp():
    durations = np.ones((3, 20))
    durations[1, 5] = 3.0  # one step two units late
    bsp = simulate_consistency("bsp", durations)
    assert bsp.consistency_waits == [1, 0, 1] and bsp.wait_time == [2, 0, 2]
    ssp = simulate_consistency("ssp", durations, staleness=2)
    assert ssp.consistency_waits == [0, 0, 0]
    np.testing.assert_array_equal(ssp.finish, [20, 22, 20])


def test_ssp_zero_moves_in_lock_step_and_its_staleness_is_at_most_w_minus_1():
    durations = straggler(workers=4, steps=30, slowdown=6.0)
    ssp0 = simulate_consistency("ssp", durations, staleness=0)
    bsp = simulate_consistency("bsp", durations)
    assert ssp0.max_gap == 0 and ssp0.consistency_waits == bsp.consistency_waits
    assert ssp0.staleness.max() == 3


@pytest.mark.parametrize("seed", range(40))
def test_the_bounds_hold_on_random_schedules(seed):
    rng = np.random.default_rng(seed)
    workers, s, steps = int(rng.integers(2, 6)), int(rng.integers(0, 4)), int(rng.integers(3, 25))
    durations = rng.uniform(0.1, 5.0, (workers, steps))
    ssp = simulate_consistency("ssp", durations, staleness=s)
    assert ssp.max_gap <= s
    assert ssp.staleness.max() <= (2 * s + 1) * (workers - 1)
    assert len(ssp.staleness) == workers * steps
    asp = simulate_consistency("asp", durations)
    assert asp.consistency_waits == [0] * workers
    np.testing.assert_allclose(asp.finish, durations.sum(axis=1))  # nobody ever waits
    bsp = simulate_consistency("bsp", durations)
    np.testing.assert_allclose(bsp.finish, durations.max(axis=0).sum())  # slowest, each step


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="durations"):
        simulate_consistency("asp", np.ones(3))
    with pytest.raises(ValueError, match="durations"):
        simulate_consistency("asp", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="staleness"):
        simulate_consistency("ssp", np.ones((2, 3)))


def test_plot_simulated_draws_one_timeline_per_run():
    import matplotlib

    matplotlib.use("Agg")
    runs = [simulate_consistency("bsp", straggler(steps=6)),
            simulate_consistency("asp", straggler(steps=6))]
    assert len(plot_simulated(runs).axes) == 2
