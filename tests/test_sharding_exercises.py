"""Lesson 11's checkers pass a right answer and explain wrong ones."""

import pytest

from minidist import exercises, nn


def zero1_step(comm, params, grads, optimizer):
    p = comm.world_size
    mine = comm.reduce_scatter(grads.reshape(p, -1))[0]
    optimizer.step(mine)
    params[:] = comm.all_gather(optimizer.params).reshape(-1)


def zero1_with_all_reduce(comm, params, grads, optimizer):
    """Right numbers, data parallelism's traffic."""
    p, r = comm.world_size, comm.rank
    c = len(params) // p
    comm.all_reduce(grads)
    optimizer.step(grads[r * c:(r + 1) * c].copy())
    params[:] = comm.all_gather(optimizer.params).reshape(-1)


def zero1_without_gather(comm, params, grads, optimizer):
    p, r = comm.world_size, comm.rank
    c = len(params) // p
    optimizer.step(comm.reduce_scatter(grads.reshape(p, -1))[0])
    params[r * c:(r + 1) * c] = optimizer.params


class BucketHooks(nn.UnitHooks):
    def __init__(self, comm, model, units, buffer, late=False):
        self.comm, self.model, self.buffer, self.late = comm, model, buffer, late
        self.by_first = {unit.first: unit for unit in units}
        self.units, self.handles = units, []

    def after_backward(self, i):
        if self.late and i == 0:  # everything at the very end: no overlap
            for unit in self.units:
                self._launch(unit)
        elif not self.late and i in self.by_first:
            self._launch(self.by_first[i])

    def _launch(self, unit):
        self.buffer[unit.part] = self.model.grads[unit.part]
        self.handles.append(self.comm.all_reduce(self.buffer[unit.part], "mean",
                                                 async_op=True))


def test_zero1_checker_passes_the_answer():
    check = exercises.check_zero1_step(zero1_step)
    assert check, check


@pytest.mark.parametrize("answer, words", [(zero1_with_all_reduce, "all-reduced"),
                                           (zero1_without_gather, "all_gather")])
def test_zero1_checker_explains(answer, words):
    check = exercises.check_zero1_step(answer)
    assert not check and words in check.message, check


def test_bucket_hooks_checker_passes_the_answer():
    check = exercises.check_bucket_hooks(BucketHooks)
    assert check, check


def test_bucket_hooks_checker_catches_late_launches_and_a_missing_copy():
    late = exercises.check_bucket_hooks(lambda *a: BucketHooks(*a, late=True))
    assert not late and "after the backward had moved on" in late.message, late

    class NoCopy(BucketHooks):
        def _launch(self, unit):
            self.handles.append(self.comm.all_reduce(self.buffer[unit.part], "mean",
                                                     async_op=True))

    wrong = exercises.check_bucket_hooks(NoCopy)
    assert not wrong and "differs" in wrong.message, wrong


@pytest.mark.parametrize("checker", [exercises.check_zero1_step, exercises.check_bucket_hooks])
@pytest.mark.parametrize("sizes", [(), (5,), (0,)])
def test_checkers_refuse_world_sizes_they_cannot_check(checker, sizes):
    if checker is exercises.check_zero1_step and sizes == (5,):
        pytest.skip("any world size works for the ZeRO-1 step")
    with pytest.raises(ValueError, match="world_sizes"):
        checker(zero1_step, world_sizes=sizes)
