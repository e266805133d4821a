"""Lessons 00, 01 and 04: the checkers pass the reference solutions, explain typical mistakes
(which rank, which step, what was expected), and run the learner's piece inside minidist on
real thread ranks (the hooks are restored after, also when the learner's code fails)."""

import math
import time

import numpy as np
import pytest

from minidist import exercises, optim
from minidist.exercises import catalog
from minidist.exercises import distributed_gd as dgd_checkers
from minidist.exercises import gradient_descent as gd_checkers
from minidist.exercises import welcome as welcome_checkers
from minidist.exercises.solutions import distributed_gd as dgd_solutions
from minidist.exercises.solutions import gradient_descent as gd_solutions
from minidist.exercises.solutions import welcome as welcome_solutions
from minidist.parallel import distributed_gd
from minidist.parallel.distributed_gd import combine as imported_combine  # as lesson 01 does


@pytest.mark.parametrize("lesson", [0, 1, 4])
def test_every_solution_passes_its_checker(lesson):
    checks = catalog.grade(lesson, catalog.solutions(lesson))
    assert checks and all(checks), checks
    assert sum(e.kind == "formula" for e in catalog.exercises(lesson)) <= 1


# ----- lesson 00: the fewest GPUs for ZeRO-3 by hand, the global mean on real ranks -----------

def test_zero3_solution_is_the_exact_ceiling():
    from minidist.exercises import welcome

    for case in welcome.ZERO3_CASES:
        psi, gpu_gb, reserve_gb = case
        n_d = welcome_solutions.zero3_gpus(*case)
        fits = 16 * int(psi) <= n_d * (gpu_gb - reserve_gb) * 10**9  # whole numbers of bytes
        fewer = 16 * int(psi) <= (n_d - 1) * (gpu_gb - reserve_gb) * 10**9
        assert fits and not fewer, case
    check = exercises.check_zero3_gpus(welcome_solutions.zero3_gpus)
    assert check and "needs 47" in check.message, check


@pytest.mark.parametrize("answer, words", [
    (lambda psi, m, a: int(16 * psi / ((m - a) * 1e9)) + 1,
     "for Ψ = 7.5e+09 parameters, 80 GB per GPU of which 20 GB for activations, you return 3: "
     "one too many: here the state divides exactly, so 2 GPUs already hold it"),
    (lambda psi, m, a: math.ceil(16 * psi / (m * 1e9)), "80 GB per GPU of which 10 GB for "
                                                        "activations, you return 35: the "
                                                        "reserve is missing"),
    (lambda psi, m, a: 16 * psi / ((m - a) * 1e9), "you return 46.666666666666664: a number of "
                                                   "GPUs is whole"),
    (lambda psi, m, a: int(16 * psi / ((m - a) * 1e9)), "you return 46: too few"),
    (lambda psi, m, a: math.ceil(4 * psi / ((m - a) * 1e9)), "the optimizer's K = 12 bytes"),
    (lambda psi, m, a: None, "return the number of GPUs, one whole number"),
    (lambda psi, m, a: 1 / 0, "your function raised ZeroDivisionError"),
])
def test_zero3_checker_names_the_mistake(answer, words):
    check = exercises.check_zero3_gpus(answer)
    assert not check and words in check.message, check


@pytest.mark.parametrize("cases", [(), 3, [("a", 2, 0)], [("a", 2)], [(7.5e9, 0, 0)],
                                   [(0, 80, 20)], [(1e9, 80, 80)], [(1e9, 80, -1)],
                                   [(True, 80, 0)], [(1e9,)]])
def test_zero3_checker_refuses_what_it_cannot_check(cases):
    with pytest.raises(ValueError, match="cases"):
        exercises.check_zero3_gpus(welcome_solutions.zero3_gpus, cases=cases)


def mean_of_means(comm, shard):
    m = np.array([shard.mean()])
    comm.all_reduce(m)
    return m[0] / comm.world_size


def only_rank_zero(comm, shard):
    total = np.array([shard.sum(), len(shard)], dtype=np.float64)
    comm.reduce(total, 0)
    return total[0] / total[1] if comm.rank == 0 else None


def reduces_the_shard(comm, shard):
    count = np.array([float(len(shard))])
    comm.all_reduce(count)
    shard[:] = shard.sum()  # the shard itself, overwritten
    comm.all_reduce(shard[:1])
    return shard[0] / count[0]


@pytest.mark.parametrize("answer, words", [
    (mean_of_means, "on 2 ranks with shards of sizes [3, 1], rank 0 returned 1.65481, the mean "
                    "of the ranks' means: that is right only for equal shards"),
    (only_rank_zero, "rank 1 returned None, but rank 0 returned the mean 2.20294: every rank "
                     "must end with it, so use all_reduce"),
    (reduces_the_shard, "on 1 rank with shards of sizes [3], rank 0: its shard was changed by "
                        "your function"),
])
def test_global_mean_checker_names_the_mistake(answer, words):
    check = exercises.check_global_mean(answer)
    assert not check and words in check.message, check


def test_global_mean_solution_is_the_mean_on_every_rank():
    from minidist import run

    shards = [np.arange(n, dtype=np.float64) for n in (1, 4, 2)]
    got = run(lambda comm: welcome_solutions.global_mean(comm, shards[comm.rank].copy()), 3,
              backend="thread", timeout=10)
    assert got == [np.concatenate(shards).mean()] * 3


def test_global_mean_checker_names_a_hang_quickly():
    def rank_zero_skips(comm, shard):
        if comm.rank == 0:
            return shard.mean()
        return welcome_solutions.global_mean(comm, shard)

    start = time.perf_counter()
    check = exercises.check_global_mean(rank_zero_skips, timeout=1.0)
    assert not check and "on 2 ranks: the ranks hung" in check.message and \
        "rank 1: all_reduce" in check.message and "same all_reduce calls" in check.message
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("bad", [{"world_sizes": []}, {"world_sizes": [6]}, {"world_sizes": 3},
                                 {"world_sizes": [True]}, {"timeout": 0}])
def test_global_mean_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="world_sizes|timeout"):
        exercises.check_global_mean(welcome_solutions.global_mean, **bad)


# ----- lesson 01: the step on the flat buffer, the server's combine ---------------------------

def test_sgd_step_solution_is_the_librarys_sgd():
    rng = np.random.default_rng(0)
    theta, grads = rng.normal(size=(2, 9))
    mine, library = theta.copy(), theta.copy()
    gd_solutions.sgd_step(mine, grads, 0.3)
    optim.SGD(library, lr=0.3).step(grads)
    np.testing.assert_array_equal(mine, library)
    assert exercises.check_sgd_step(gd_solutions.sgd_step)


def new_array(params, grads, lr):
    return params - lr * grads


def uphill(params, grads, lr):
    params += lr * grads


def scales_the_gradient(params, grads, lr):
    grads *= lr  # the model's gradient, overwritten
    params -= grads


@pytest.mark.parametrize("answer, words", [
    (new_array, "params did not change: your function made θ − η·grads as a NEW array"),
    (uphill, "you stepped uphill"),
    (lambda params, grads, lr: params.__isub__(grads), "the learning rate is missing"),
    (scales_the_gradient, "your step changed grads: grads[0] was 1.304 and became 0.3912"),
    (lambda params, grads, lr: optim.SGD(params, lr).step(grads),
     "your function calls the library's SGD (minidist.optim.SGD)"),
])
def test_sgd_step_checker_names_the_mistake(answer, words):
    check = exercises.check_sgd_step(answer)
    assert not check and words in check.message, check


def test_the_step_hook_is_what_sgd_uses_and_is_restored():
    """Right on the probe (6 numbers), wrong on the model's buffer: only the run catches it."""
    original, calls = optim.SGD._update, []

    def spy(params, grads, lr):
        calls.append(params.shape)
        gd_solutions.sgd_step(params, grads, lr)

    assert exercises.check_sgd_step(spy)
    assert calls == [(6,)] + [(4,)] * 8  # the probe, then 4 steps single, 4 on rank 0
    assert optim.SGD._update is original

    def wrong_on_the_model(params, grads, lr):
        params -= (1.0 if len(params) == 6 else 1.5) * lr * grads

    check = exercises.check_sgd_step(wrong_on_the_model)
    assert not check and "train(strategy='single') with your step: the run's loss differs " \
        "from single at step 1" in check.message, check
    assert optim.SGD._update is original

    def raises_in_the_run(params, grads, lr):
        if len(params) != 6:
            raise RuntimeError("boom")
        gd_solutions.sgd_step(params, grads, lr)

    check = exercises.check_sgd_step(raises_in_the_run)
    assert not check and "RuntimeError: boom" in check.message, check
    assert optim.SGD._update is original


def test_combine_solution_is_the_librarys_combine():
    rng = np.random.default_rng(1)
    grads, sizes = list(rng.normal(size=(3, 5))), [4, 1, 7]
    np.testing.assert_array_equal(gd_solutions.combine(grads, sizes),
                                  distributed_gd.combine(grads, sizes))


@pytest.mark.parametrize("answer, words", [
    (lambda grads, sizes: np.mean(grads, axis=0), "a plain mean is right only for equal parts"),
    (lambda grads, sizes: np.sum(grads, axis=0), "you added the mean gradients"),
    (lambda grads, sizes: grads[0], "your gradient differs from the full-batch gradient"),
    (lambda grads, sizes: 1 / 0, "raised ZeroDivisionError"),
    (distributed_gd.combine, "your function calls the library's combine"),
    (lambda grads, sizes: imported_combine(grads, sizes), "your function calls the library's "
                                                          "combine"),
    (lambda grads, sizes: distributed_gd.combine(grads, sizes), "calls the library's combine"),
])
def test_combine_checker_names_the_mistake(answer, words):
    check = exercises.check_combine(answer)
    assert not check and words in check.message, check


def test_the_combine_hook_is_what_distributed_gd_uses_and_is_restored():
    original, calls = distributed_gd.combine, []

    def spy(grads, sizes):
        calls.append(list(sizes))
        return gd_solutions.combine(grads, sizes)

    assert exercises.check_combine(spy)
    assert calls[5:] == [[4, 3, 3]] * 4 + [[3, 3, 2, 2]] * 4  # after the 5 probes: the runs
    assert distributed_gd.combine is original

    def wrong_in_the_run(grads, sizes):
        if list(sizes) == [4, 3, 3]:
            return np.mean(grads, axis=0)
        return gd_solutions.combine(grads, sizes)

    check = exercises.check_combine(wrong_in_the_run)
    assert not check and "distributed GD on 3 ranks (parts of [4, 3, 3] rows) with your " \
        "combine: the run's loss differs from single at step 1" in check.message, check
    assert distributed_gd.combine is original

    def raises_in_the_run(grads, sizes):
        if list(sizes) == [4, 3, 3]:
            raise RuntimeError("boom")
        return gd_solutions.combine(grads, sizes)

    check = exercises.check_combine(raises_in_the_run)
    assert not check and "a rank raised RuntimeError" in check.message, check
    assert distributed_gd.combine is original


def test_the_library_spies_are_removed_after_a_check():
    import sys

    before = sys.getprofile()
    assert not exercises.check_combine(imported_combine)
    assert not exercises.check_sgd_step(lambda params, grads, lr: optim.SGD(params, lr).step(grads))
    assert sys.getprofile() is before and distributed_gd.combine is imported_combine


@pytest.mark.parametrize("bad", [{"workers": []}, {"workers": [11]}, {"workers": 3},
                                 {"timeout": -1}])
def test_combine_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="workers|timeout"):
        exercises.check_combine(gd_solutions.combine, **bad)


def test_step_checker_refuses_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout"):
        exercises.check_sgd_step(gd_solutions.sgd_step, timeout=0)


# ----- lesson 04: the protocol over send and recv ---------------------------------------------

def protocol(send_back=True, stale=False, use_sizes=True, send_sizes=True, collective=False,
             size_first=False, in_place=False):
    """The solution's protocol with one typical mistake switched on."""
    def fn(comm, X, y, theta, lr, steps):
        thetas = []
        for _ in range(steps):
            grad = X.T @ (X @ theta - y) / len(y)
            if collective:
                comm.barrier()
            if comm.rank == 0:
                grads, sizes = [grad], [len(y) if use_sizes else 1]
                for k in range(1, comm.world_size):
                    grads.append(comm.recv(k))
                    size = int(comm.recv(k)[0]) if send_sizes else len(y)
                    sizes.append(size if use_sizes else 1)
                new = theta - lr * distributed_gd.combine(grads, sizes)
                for k in range(1, comm.world_size if send_back else 1):
                    comm.send(theta if stale else new, k)
                if in_place:
                    theta[...] = new  # the same array, appended again each step
                else:
                    theta = new
            else:
                size = np.array([len(y)], dtype=np.float64)
                for message in ([size, grad] if size_first else [grad, size][:1 + send_sizes]):
                    comm.send(message, 0)
                theta = comm.recv(0)
            thetas.append(theta)
        return thetas
    return fn


def test_distributed_gd_checker_passes_the_solution():
    check = exercises.check_distributed_gd(dgd_solutions.distributed_gd)
    assert check and "p = 1, 2, 3, 4 ranks" in check.message, check
    assert exercises.check_distributed_gd(protocol())  # the test's own copy is right too


@pytest.mark.parametrize("answer, words", [
    (protocol(stale=True), "on 2 ranks (parts of [5, 2] rows), rank 1's θ after step 1 is"),
    (protocol(stale=True), "yours is the θ before the step: the server must step before it "
                           "sends θ back"),
    (protocol(use_sizes=False), "rank 0's θ after step 1"),
    (protocol(use_sizes=False), "a step with the plain mean of the gradients"),
    (protocol(send_sizes=False), "on 2 ranks, rank 1 sent 4 messages in 4 steps, the protocol "
                                 "8: a worker sends two messages a step, its gradient and its "
                                 "size"),
    (protocol(collective=True), "rank 0 used barrier: this exercise builds the protocol from "
                                "comm.send and comm.recv alone"),
    (protocol(size_first=True), "on 2 ranks (parts of [5, 2] rows), rank 0's θ after step 1"),
    (protocol(size_first=True), "receive each worker's gradient and size in the order they were "
                                "sent (the gradient first, then the size)"),
    (protocol(in_place=True), "rank 0 returned the same array object for several steps"),
    (protocol(in_place=True), "Append a copy (thetas.append(theta.copy()))"),
])
def test_distributed_gd_checker_names_the_mistake(answer, words):
    check = exercises.check_distributed_gd(answer)
    assert not check and words in check.message, check


def test_distributed_gd_checker_names_who_waited_for_what():
    start = time.perf_counter()
    check = exercises.check_distributed_gd(protocol(send_back=False), timeout=1.0)
    assert not check and "on 2 ranks: the ranks hung" in check.message and \
        "rank 0: recv from rank 1; rank 1: recv from rank 0" in check.message and \
        "every recv needs a matching send" in check.message, check
    assert time.perf_counter() - start < 5


def test_a_worker_that_keeps_its_own_step_is_named():
    def selfish(comm, X, y, theta, lr, steps):
        thetas = dgd_solutions.distributed_gd(comm, X, y, theta, lr, steps)
        if comm.rank == 0:
            return thetas
        return [thetas[0] + 1.0] + thetas[1:]

    check = exercises.check_distributed_gd(selfish, world_sizes=[3])
    assert not check and "on 3 ranks (parts of [5, 2, 7] rows), rank 1's θ after step 1" \
        in check.message, check


def test_a_stub_is_reported_not_raised():
    def stub(comm, *args):
        raise NotImplementedError("write it")

    for checker in (exercises.check_distributed_gd, exercises.check_global_mean,
                    exercises.check_zero3_gpus, exercises.check_sgd_step, exercises.check_combine):
        check = checker(stub)
        assert not check and "raised NotImplementedError" in check.message, check


def test_one_rank_is_named_in_the_singular():
    def one_step_short(comm, X, y, theta, lr, steps):
        return dgd_solutions.distributed_gd(comm, X, y, theta, lr, steps)[:-1] + [theta]

    check = exercises.check_distributed_gd(one_step_short, world_sizes=[1])
    assert not check and "on 1 rank (parts of [5] rows), rank 0's θ after step 4" \
        in check.message, check


@pytest.mark.parametrize("bad", [{"world_sizes": ()}, {"world_sizes": [5]}, {"world_sizes": 3},
                                 {"world_sizes": [0]}, {"timeout": "1"}])
def test_distributed_gd_checker_refuses_what_it_cannot_check(bad):
    with pytest.raises(ValueError, match="world_sizes|timeout"):
        exercises.check_distributed_gd(dgd_solutions.distributed_gd, **bad)


def test_the_modules_declare_their_exercises():
    for module in (welcome_checkers, gd_checkers, dgd_checkers):
        assert all(name in vars(exercises) for name in module.__all__)
        assert [e.checker.__name__ for e in module.EXERCISES] == \
            [n for n in module.__all__ if n.startswith("check_")]
