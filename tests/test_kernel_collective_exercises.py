"""Lessons 2 and 3's checkers pass the reference solutions, explain typical mistakes, and put
the learner's piece inside minidist: the ring as `algorithm=` of comm.all_reduce and of
data-parallel training (the hook itself is tested here too), the SGD kernel as the kernel of
the optimizer step on the cuda device.

The kernel's checks run in child interpreters with NUMBA_ENABLE_CUDASIM=1 (as the grader must
be started without a GPU): numba reads it once, at its first import, which this shared test
process cannot promise."""

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minidist import exercises, nn, train
from minidist.comm import collectives
from minidist.data import make_classification
from minidist.errors import CollectiveMismatchError, WorkerError
from minidist.exercises import collectives as ring_exercise
from minidist.exercises import grading
from minidist.exercises.solutions import collectives as solutions
from minidist.launch import run

# ----- lesson 3: the ring, on its own and inside data-parallel training ----------------------


def chatty_ring(comm, array):
    """The solution's traffic in one message per element: right values and bytes."""
    p, r = comm.world_size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    chunks = np.array_split(array, p)
    for s in range(2 * (p - 1)):
        out, into = chunks[(r - s - 1) % p], chunks[(r - s - 2) % p]
        for i in range(len(out)):
            comm.send(out[i:i + 1], right)
        got = np.array([comm.recv(left)[0] for _ in range(len(into))])
        into[...] = into + got if s < p - 1 else got
    return array


def naive(comm, array):
    """Everything through rank 0: right values, whole arrays."""
    if comm.rank == 0:
        for src in range(1, comm.world_size):
            array += comm.recv(src)
        for dst in range(1, comm.world_size):
            comm.send(array, dst)
    else:
        comm.send(array, 0)
        array[...] = comm.recv(0)
    return array


def reduce_scatter_only(comm, array):
    p, r = comm.world_size, comm.rank
    chunks = np.array_split(array, p)
    for s in range(p - 1):
        comm.send(chunks[(r - s - 1) % p], (r + 1) % p)
        chunks[(r - s - 2) % p][...] += comm.recv((r - 1) % p)
    return array


def add_in_all_gather(comm, array):
    """The solution's reduce-scatter, then an all-gather that adds what arrives."""
    p, r = comm.world_size, comm.rank
    chunks = np.array_split(array, p)
    for s in range(p - 1):
        comm.send(chunks[(r - s - 1) % p], (r + 1) % p)
        chunks[(r - s - 2) % p] += comm.recv((r - 1) % p)
    for s in range(p - 1):
        comm.send(chunks[(r - s) % p], (r + 1) % p)
        chunks[(r - s - 1) % p] += comm.recv((r - 1) % p)
    return array


def float32_ring(comm, array):
    """The solution's schedule with every chunk sent as float32: exact on integers."""
    p, r = comm.world_size, comm.rank
    chunks = np.array_split(array, p)
    for s in range(2 * (p - 1)):
        comm.send(chunks[(r - s - 1) % p].astype(np.float32), (r + 1) % p)
        into = chunks[(r - s - 2) % p]
        into[...] = into + comm.recv((r - 1) % p) if s < p - 1 else comm.recv((r - 1) % p)
    return array


def rounded_ring(comm, array):
    """Right schedule and traffic, but the sum rounded to float32 at the end."""
    solutions.ring_all_reduce(comm, array)
    array[...] = array.astype(np.float32)
    return array


def receive_first(comm, array):
    for _ in range(comm.world_size - 1):
        array += comm.recv((comm.rank - 1) % comm.world_size)  # everyone waits, nobody sends
        comm.send(array, (comm.rank + 1) % comm.world_size)
    return array


def test_ring_checker_passes_the_solution_which_moves_what_the_librarys_ring_moves():
    check = exercises.check_ring_all_reduce(solutions.ring_all_reduce)
    assert check and "data_parallel with it equals one process on 2, 3, 4 ranks" in check.message

    def both(comm):
        x = np.random.default_rng(comm.rank).normal(size=13)
        mine, theirs = x.copy(), x.copy()
        comm.stats.reset()
        solutions.ring_all_reduce(comm, mine)
        sent = comm.stats["send"].bytes_sent
        collectives.all_reduce_ring(comm, theirs, "sum")
        return mine, theirs, sent, comm.stats["send"].bytes_sent - sent

    for mine, theirs, sent, library in run(both, 3, backend="thread", timeout=10):
        np.testing.assert_allclose(mine, theirs, rtol=1e-15)
        assert sent == library


@pytest.mark.parametrize("answer, words", [
    (lambda comm, array: array,
     "with 2 ranks and n = 12 elements, every rank still holds its own array"),
    (lambda comm, array: solutions.ring_all_reduce(comm, array) / comm.world_size,
     "with 2 ranks and n = 12 elements, you computed the mean; the exercise asks for the sum"),
    (reduce_scatter_only, "each rank has the full sum in only one chunk (≈ n/p positions): that "
                          "is the reduce-scatter half"),
    (lambda comm, array: solutions.ring_all_reduce(comm, array) + (comm.rank == 2),
     "with 3 ranks and n = 12 elements, rank(s) [2] end with wrong values; rank 2 is wrong at 12"
     " of 12 positions (first: index 0, expected"),
    (naive, "right values, but with 3 ranks and n = 12 float64s (96 bytes) rank 0 sent 192 "
            "bytes; a ring sends only 2(p−1)/p·n ≈ 128 bytes per rank"),
    (chatty_ring, "with 2 ranks a rank sent 12 messages; a ring needs only 2(p−1) = 2"),
    (lambda comm, array: comm.all_reduce(array), "your function called comm.all_reduce"),
    (add_in_all_gather, "with 2 ranks and n = 12 elements, rank 0 holds more than the sum at index "
                        "6 (expected 141, got 216): a chunk was added twice. In the all-gather "
                        "half the arriving chunks are already finished sums: copy them in"),
    (float32_ring, "right values, but with 2 ranks and n = 12 the ranks sent 96 bytes in all, and "
                   "a ring moves 2(p−1)·n = 24 float64s, 192 bytes: your messages carry float32s"),
    (lambda comm, array: solutions.ring_all_reduce(comm, array).astype(np.float32),
     "right values, but with 1 rank and n = 12 rank 0 returned a float32 array for a float64 one"),
    (rounded_ring, "inside minidist, as the all-reduce of data_parallel on 2 ranks: the run's loss "
                   "differs from single at step 1 by"),
    (lambda comm, array: 1 / 0, "with 1 rank, rank 0 raised ZeroDivisionError"),
], ids=["nothing-summed", "mean", "reduce-scatter-only", "wrong-rank", "naive", "chatty",
        "built-in", "adds-in-all-gather", "sends-float32", "returns-float32", "rounds-to-float32",
        "raises"])
def test_ring_checker_names_the_mistake(answer, words):
    check = exercises.check_ring_all_reduce(answer)
    assert not check and words in check.message and "✘" in repr(check), check


def test_ring_checker_says_float32s_rounding_is_not_a_wrong_schedule():
    check = exercises.check_ring_all_reduce(rounded_ring)
    assert "relative, which is float32's rounding (ε ≈ 1.2e-7), not a wrong schedule" in (
        check.message), check


LIBRARY = {name: getattr(collectives, name) for name in ring_exercise.LIBRARY}


@pytest.mark.parametrize("answer, name", [
    (lambda comm, array: collectives.all_reduce_ring(comm, array, "sum"), "all_reduce_ring"),
    (lambda comm, array: collectives.all_reduce_tree(comm, array, "sum"), "all_reduce_tree"),
    (lambda comm, array: collectives.all_gather_ring(comm, array).sum(axis=0),
     "all_gather_ring"),
], ids=["ring", "tree", "all-gather"])
def test_ring_checker_refuses_the_librarys_own_algorithms(answer, name):
    check = exercises.check_ring_all_reduce(answer)
    assert not check and check.message == (
        f"rank 0 called minidist's own collectives.{name} (minidist/comm/collectives.py): the "
        "exercise is to write the ring yourself, with comm.send and comm.recv only"), check
    assert all(getattr(collectives, n) is f for n, f in LIBRARY.items())


def test_ring_checker_restores_the_library_after_a_function_that_raises():
    assert not exercises.check_ring_all_reduce(lambda comm, array: 1 / 0)
    assert all(getattr(collectives, n) is f for n, f in LIBRARY.items())
    # and the library's own all-reduces inside training are not the learner's calls
    assert exercises.check_ring_all_reduce(solutions.ring_all_reduce, world_sizes=(2,),
                                           sizes=(5,), train_sizes=(2,))


def test_ring_checker_names_a_deadlock_quickly():
    start = time.perf_counter()
    check = exercises.check_ring_all_reduce(receive_first, timeout=0.5)
    assert not check and "with 2 ranks the run hung until the 0.5 s timeout" in check.message
    assert "deadlock" in check.message and time.perf_counter() - start < 5


def test_ring_checker_judges_the_training_inside_minidist():
    """On one rank nothing needs summing, so only the data-parallel run can tell."""
    check = exercises.check_ring_all_reduce(lambda comm, array: array, world_sizes=(1,))
    assert not check, check
    assert ("inside minidist, as the all-reduce of data_parallel on 2 ranks: the run's loss "
            "differs from single at step 1") in check.message


@pytest.mark.parametrize("options, words", [
    (dict(world_sizes=()), r"world_sizes must be a non-empty list of rank counts >= 1, got \(\)"),
    (dict(world_sizes=(0,)), r"world_sizes must be .* >= 1, got \(0,\)"),
    (dict(sizes=(-1,)), r"sizes must be a non-empty list of array sizes >= 0, got \(-1,\)"),
    (dict(train_sizes=(1,)), r"train_sizes must be a list of rank counts >= 2, got \(1,\)"),
    (dict(timeout=0), r"timeout must be a number of seconds > 0, got 0"),
], ids=["no-world-sizes", "zero-ranks", "negative-size", "one-rank-training", "timeout"])
def test_ring_checker_refuses_bad_arguments(options, words):
    with pytest.raises(ValueError, match=f"^{words}$"):
        exercises.check_ring_all_reduce(solutions.ring_all_reduce, **options)


# ----- the hook: comm.all_reduce(x, algorithm=fn), and train(..., algorithm=fn) -------------

def test_all_reduce_runs_a_function_of_yours_sync_and_async():
    def job(comm):
        x = np.arange(10.0) * (comm.rank + 1)
        comm.stats.reset()
        summed = comm.all_reduce(x.copy(), algorithm=solutions.ring_all_reduce)
        mean = comm.all_reduce(x.copy(), "mean", algorithm=solutions.ring_all_reduce)
        returned = comm.all_reduce(x.copy(), algorithm=lambda c, a: a + 1)  # a new array
        later = comm.all_reduce(x.copy(), algorithm=solutions.ring_all_reduce, async_op=True)
        later, yours = later.wait(), comm.stats["all_reduce"]
        comm.stats.reset()
        for _ in range(3):
            comm.all_reduce(x.copy(), algorithm="ring")
        return summed, mean, returned, later, yours, comm.stats["all_reduce"]

    p = 3
    want = np.arange(10.0) * sum(range(1, p + 1))
    for rank, (summed, mean, returned, later, yours, library) in enumerate(
            run(job, p, backend="thread", timeout=10)):
        np.testing.assert_array_equal(summed, want)
        np.testing.assert_allclose(mean, want / p, rtol=1e-15)
        np.testing.assert_array_equal(returned, np.arange(10.0) * (rank + 1) + 1)
        np.testing.assert_array_equal(later, want)
        # the function's messages count as the collective's: three rings (and a function that
        # sends nothing) move what the library's three rings move
        assert yours.calls == 4 and yours.messages == library.messages == 3 * 2 * (p - 1)
        assert yours.bytes_sent == library.bytes_sent > 0


@pytest.mark.parametrize("call, words", [
    (lambda comm, x: comm.all_reduce(x, "max", algorithm=solutions.ring_all_reduce),
     "algorithm=ring_all_reduce (your function) computes a sum: op must be 'sum' or 'mean'"),
    (lambda comm, x: comm.broadcast(x, algorithm=solutions.ring_all_reduce),
     "broadcast: algorithm must be one of tree, native, auto; only all_reduce takes a function"),
    (lambda comm, x: comm.all_reduce(x, algorithm=lambda c, a: a[:2]),
     "returned an array of shape (2,) on rank"),
    (lambda comm, x: comm.all_reduce(x, algorithm=solutions.ring_all_reduce if comm.rank
                                     else "ring"),
     ("all_reduce(op=sum, algorithm=ring_all_reduce) on a float64 array of shape (6,)",
      "all_reduce(op=sum, algorithm=ring) on a float64 array of shape (6,)")),
], ids=["max", "broadcast", "shape", "mismatch"])
def test_all_reduce_refuses_what_a_function_cannot_do(call, words):
    """words: what the error says (for a mismatch both calls, in either order: either rank may
    be the one that sees it first)."""
    with pytest.raises((WorkerError, CollectiveMismatchError)) as info:
        run(lambda comm: call(comm, np.ones(6)), 2, backend="thread", timeout=5)
    for part in (words,) if isinstance(words, str) else words:
        assert part in str(info.value), info.value


def mlp_problem():
    X, y = make_classification(40, 5, 4, seed=0)
    return functools.partial(nn.mlp, [5, 8, 4], seed=1), X, y


@pytest.mark.parametrize("strategy, options", [
    ("data_parallel", {}), ("data_parallel", {"overlap": True, "bucket_bytes": 64}),
    ("data_parallel", {"backend": "process"}), ("tensor_parallel", {}),
], ids=["dp", "dp-overlap", "dp-process", "tp"])
def test_train_passes_a_function_to_the_all_reduces(strategy, options):
    model_fn, X, y = mlp_problem()
    run_options = dict(strategy=strategy, workers=2, steps=3, batch_size=8, lr=0.1,
                       backend=options.pop("backend", "thread"), **options)
    single = train(model_fn, X, y, steps=3, batch_size=8, lr=0.1)
    mine = train(model_fn, X, y, algorithm=solutions.ring_all_reduce, **run_options)
    ring = train(model_fn, X, y, algorithm="ring", **run_options)
    np.testing.assert_allclose(mine.loss, single.loss, rtol=1e-12)
    np.testing.assert_allclose(mine.params, single.params, rtol=0, atol=1e-12)
    assert mine.options["algorithm"] is solutions.ring_all_reduce
    for yours, library in zip(mine.stats, ring.stats, strict=True):
        assert yours["all_reduce"]["bytes_sent"] == library["all_reduce"]["bytes_sent"]


@pytest.mark.parametrize("options, error, words", [
    ({"compression": "topk"}, ValueError, "compression='topk' sends something else"),
    ({"local_steps": 2}, ValueError, "local_steps=2 sends something else"),
    ({"algorithm": 3}, TypeError, "algorithm must be a string or a function fn(comm, array)"),
])
def test_train_refuses_a_function_where_no_all_reduce_runs_it(options, error, words):
    model_fn, X, y = mlp_problem()
    options = {"algorithm": solutions.ring_all_reduce, **options}
    with pytest.raises(error) as info:
        train(model_fn, X, y, strategy="data_parallel", workers=2, backend="thread", steps=2,
              batch_size=8, **options)
    assert words in str(info.value)


# ----- lesson 2: the matmul's traffic (formula; its solution is checked in the child below) --

def stub_reads(M, N, K, BM, BN):
    raise NotImplementedError("count the reads")


@pytest.mark.parametrize("answer, words", [
    (lambda M, N, K, BM, BN: (M * N * K, M * N * K),
     "M=64, N=64, K=64, BM=16, BN=16: expected (A, B) reads (16384, 16384), got (262144, "
     "262144): that is the naive kernel"),
    (lambda M, N, K, BM, BN: (M * K * (N // BN), K * N * (M // BM)),
     "M=17, N=5, K=33, BM=8, BN=8: expected (A, B) reads (561, 495), got (0, 330): the partial "
     "tiles at the edges load too"),
    (lambda M, N, K, BM, BN: (M * K * -(-M // BM), K * N * -(-N // BN)),
     "M=17, N=5, K=33, BM=8, BN=8: expected (A, B) reads (561, 495), got (1683, 165): A and B "
     "are swapped: a value of A is reused along a row of C's tile, so A is re-read once per block "
     "column"),
    (lambda M, N, K, BM, BN: (M * K, K * N), "M=64, N=64, K=64, BM=16, BN=16: expected (A, B) "
     "reads (16384, 16384), got (4096, 4096): count, for one element of A, how many blocks load "
     "it"),
    (lambda M, N, K, BM, BN: 1 / 0, "your function raised ZeroDivisionError"),
    (stub_reads, "your function raised NotImplementedError: count the reads"),
], ids=["naive", "floor", "swapped", "once", "raises", "stub"])
def test_matmul_traffic_checker_names_the_mistake(answer, words):
    check = exercises.check_matmul_traffic(answer)
    assert not check and words in check.message and "✘" in repr(check), check


# ----- lesson 2: the SGD kernel, in child interpreters with the CUDA simulator ---------------

KERNELS = '''
from numba import cuda

@cuda.jit
def no_bounds_check(params, grads, lr):
    i = cuda.grid(1)
    params[i] -= lr * grads[i]

@cuda.jit
def no_stride(params, grads, lr):
    i = cuda.grid(1)
    if i < params.shape[0]:
        params[i] -= lr * grads[i]

@cuda.jit
def block_stride(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.blockDim.x):
        params[i] -= lr * grads[i]

@cuda.jit
def uphill(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] += lr * grads[i]

@cuda.jit
def fixed_rate(params, grads, lr):  # right for the checker's launches (lr = 0.1) only
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] -= 0.1 * grads[i]

@cuda.jit
def raises_in_training(params, grads, lr):  # fails only once it is minidist's kernel (lr = 0.2)
    if lr > 0.15:
        raise ValueError("only the launches' rate")
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] -= lr * grads[i]

def stub(params, grads, lr):
    raise NotImplementedError("write the grid-stride SGD kernel")

def undecorated(params, grads, lr):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        params[i] -= lr * grads[i]
'''


def in_child(code, simulator=True, timeout=120):
    """Run `code` in a fresh interpreter (the simulator on or off); the JSON it prints."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sgd_kernel_checker_in_the_simulator():
    got = in_child(KERNELS + '''
import json
from minidist import exercises
from minidist.exercises import gpu_kernels
from minidist.exercises.solutions.gpu_kernels import matmul_reads, sgd_kernel
from minidist.kernels import cuda_elementwise

library = cuda_elementwise.sgd_update
out = {"matmul": str(exercises.check_matmul_traffic(matmul_reads))}
for name, kernel in [("solution", sgd_kernel), ("no_bounds_check", no_bounds_check),
                     ("no_stride", no_stride), ("block_stride", block_stride),
                     ("uphill", uphill), ("fixed_rate", fixed_rate),
                     ("raises_in_training", raises_in_training), ("stub", stub),
                     ("undecorated", undecorated)]:
    check = exercises.check_sgd_kernel(kernel)
    out[name] = [check.passed, check.message, cuda_elementwise.sgd_update is library]
for option in ({"seed": -1}, {"timeout": 0}, {"timeout": True}):
    try:
        exercises.check_sgd_kernel(sgd_kernel, **option)
    except ValueError as exc:
        out[str(option)] = str(exc)
with gpu_kernels.sgd_kernel(uphill):
    out["hooked"] = cuda_elementwise.sgd_update is not library
print(json.dumps(out))
''')
    passed, message, restored = got.pop("solution")
    assert passed and restored and "kernel[2, 32] on 67 parameters" in message, message
    assert got.pop("hooked")
    assert got.pop("{'seed': -1}") == "seed must be an integer >= 0, got -1"
    assert got.pop("{'timeout': 0}") == "timeout must be a number of seconds > 0, got 0"
    assert got.pop("{'timeout': True}") == "timeout must be a number of seconds > 0, got True"
    assert got.pop("matmul").startswith("✔ passed — check_matmul_traffic")
    words = {
        "no_bounds_check": "kernel[2, 32] on 50 elements raised IndexError",
        "no_stride": "kernel[2, 16] on 100 elements: elements 32… were not updated: 2 × 16 = "
                     "32 threads must cover 100 elements",
        "block_stride": "were updated 2 times: the stride is the whole grid",
        "uphill": "θ moved uphill",
        "fixed_rate": "as the SGD step of a training run on the cuda device (simulator; 67 "
                      "parameters, launched as kernel[2, 32]), against the same run on numpy "
                      "(η = 0.2; the launches on their own used η = 0.1): the run's loss "
                      "differs from numpy at step 1",
        "raises_in_training": "launched as kernel[2, 32]), against the same run on numpy (η = "
                              "0.2; the launches on their own used η = 0.1): ValueError: ",
        "stub": "your kernel raised NotImplementedError: write the grid-stride SGD kernel",
        "undecorated": "<function undecorated at 0x",
    }
    for name, (passed, message, restored) in got.items():
        assert not passed and words[name] in message and restored, (name, message)


def test_sgd_kernel_checker_reports_a_kernel_that_never_ends():
    """Alone in its child: the stuck launch keeps running (threads cannot be stopped)."""
    got = in_child(KERNELS + '''
import json, os, time
from minidist import exercises
from minidist.kernels import cuda_elementwise

@cuda.jit
def endless_in_training(params, grads, lr):  # i grows only at the launches' rate, 0.1
    i = cuda.grid(1)
    while i < params.shape[0]:
        params[i] -= lr * grads[i]
        if lr < 0.15:
            i += cuda.gridsize(1)

library = cuda_elementwise.sgd_update
start = time.perf_counter()
check = exercises.check_sgd_kernel(endless_in_training, timeout=5)  # the launches: < 5 s
print(json.dumps([check.passed, check.message, time.perf_counter() - start,
                  cuda_elementwise.sgd_update is library]), flush=True)
os._exit(0)
''')
    passed, message, seconds, restored = got
    assert not passed and restored and seconds < 40, got
    assert ("against the same run on numpy (η = 0.2; the launches on their own used η = 0.1): "
            "the run did not finish within the 5 s timeout: some thread never leaves its loop. "
            "In a while loop, i must grow by cuda.gridsize(1) on every pass.") in message, message


def test_sgd_kernel_checker_names_the_launch_that_never_ends():
    got = in_child('''
import json, os
from numba import cuda
from minidist import exercises

@cuda.jit
def forgot_increment(params, grads, lr):
    i = cuda.grid(1)
    while i < params.shape[0]:
        params[i] -= lr * grads[i]

print(json.dumps(str(exercises.check_sgd_kernel(forgot_increment, timeout=0.5))), flush=True)
os._exit(0)
''')
    assert got.startswith("✘ not yet — check_sgd_kernel: kernel[2, 32] on 64 elements did not "
                          "finish within the 0.5 s timeout"), got


def test_the_grader_passes_lesson_2s_solutions_with_the_simulator(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    graded = grading.grade_file(2, grading.SOLUTIONS, timeout=120)
    assert graded["passed"] == graded["total"] == 2, graded


def test_sgd_kernel_checker_says_what_it_needs_without_cuda():
    got = in_child('''
import json
from minidist import exercises, kernels
from minidist.exercises.solutions.gpu_kernels import sgd_kernel
print(json.dumps([kernels.cuda_mode(), str(exercises.check_sgd_kernel(sgd_kernel))]))
''', simulator=False)
    if got[0] == "gpu":
        pytest.skip("a CUDA GPU is here: the checker runs on it")
    assert "✘" in got[1] and "no CUDA device to launch your kernel on" in got[1], got
    assert "NUMBA_ENABLE_CUDASIM=1" in got[1], got
