"""Lesson 0 (welcome): the fewest GPUs for ZeRO-3 by hand, and a first worker on real ranks.

The ZeRO-3 answer is a formula: the fewest N_d with (2 + 2 + K)Ψ / N_d ≤ M − A bytes, a ceiling,
checked exactly (Fraction) on a few cases. The global mean is a function that every rank runs:
`check_global_mean` starts 1 … 5 thread ranks with shards of different sizes (minidist.run) and
judges what each rank returns and whether it left its shard as it was given.
"""

import math
from fractions import Fraction

import numpy as np

from minidist.exercises._common import Check, Exercise, _brief, _call, _check_timeout, _guarded

K = 12  # mixed-precision Adam: optimizer bytes per parameter (fp32 θ, m, v)
SHARD_SIZES = (3, 1, 6, 2, 5)  # rank k of p holds SHARD_SIZES[k] numbers: never all equal
ZERO3_CASES = ((7.5e9, 80, 20), (175e9, 80, 10), (175e9, 80, 20), (70e9, 40, 8), (1e9, 80, 20),
               (13e9, 24, 4))  # (Ψ, GB per GPU, GB kept for activations): exact and inexact


def zero3_gpus_exact(psi, gpu_gb, reserve_gb):
    """⌈(2 + 2 + K)·Ψ / ((M − A)·10⁹)⌉, in exact arithmetic."""
    state = (2 + 2 + K) * Fraction(psi)
    return math.ceil(state / ((Fraction(gpu_gb) - Fraction(reserve_gb)) * 10**9))


def _is_real(value, low, strict=True):
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and
            math.isfinite(value) and (value > low if strict else value >= low))


def _valid_cases(given):
    try:
        cases = [tuple(case) for case in given]
    except TypeError:
        cases = None
    if not cases or any(len(case) != 3 or not _is_real(case[0], 0) or not _is_real(case[1], 0)
                        or not _is_real(case[2], 0, strict=False) or not case[2] < case[1]
                        for case in cases):
        raise ValueError(f"cases must be a non-empty list of (n_params > 0, gpu_gb > 0, "
                         f"0 ≤ reserve_gb < gpu_gb), got {_brief(given)}")
    return cases


def check_zero3_gpus(fn, cases=ZERO3_CASES):
    """fn(n_params, gpu_gb, reserve_gb) should return the fewest GPUs N_d on which ZeRO-3 fits
    a model of Ψ = n_params parameters trained with mixed-precision Adam, when each GPU has
    gpu_gb GB (10⁹ bytes) and keeps reserve_gb of them for activations: the smallest whole N_d
    with (2 + 2 + K)Ψ / N_d ≤ (M − A)·10⁹, checked exactly."""
    name = "check_zero3_gpus"
    for psi, gpu_gb, reserve_gb in _valid_cases(cases):
        got, failed = _call(name, fn, psi, gpu_gb, reserve_gb, convert=lambda r: r)
        if failed is not None:
            return failed
        want = zero3_gpus_exact(psi, gpu_gb, reserve_gb)
        case = (f"for Ψ = {psi:.3g} parameters, {gpu_gb:g} GB per GPU of which {reserve_gb:g} "
                f"GB for activations, you return {_brief(got)}")
        number = _as_number(got)
        if number is None:
            return Check(name, False, f"{case}: return the number of GPUs, one whole number")
        if number != int(number):
            return Check(name, False, f"{case}: a number of GPUs is whole — the fewest that "
                                      f"hold the state is the next whole number up (a ceiling)")
        if int(number) == want:
            continue
        usable = (Fraction(gpu_gb) - Fraction(reserve_gb)) * 10**9
        ratio = (2 + 2 + K) * Fraction(psi) / usable
        mistakes = [
            (math.floor(ratio), "too few: on that many GPUs each share is larger than what a "
                                "GPU has left; round up (ceil), not down"),
            (math.floor(ratio) + 1, "one too many: here the state divides exactly, so "
                                    f"{want} GPUs already hold it — round up with a ceiling, "
                                    "not floor + 1"),
            (zero3_gpus_exact(psi, gpu_gb, 0), "the reserve is missing: only gpu_gb − "
                                               "reserve_gb of each GPU is left for the state"),
            (math.ceil(4 * Fraction(psi) / usable), "the optimizer's K = 12 bytes per "
                                                    "parameter are missing (fp32 master weight, "
                                                    "Adam's m and v)"),
            (math.ceil(K * Fraction(psi) / usable), "only the optimizer state: add the fp16 "
                                                    "weights and gradients, 2 + 2 bytes per "
                                                    "parameter"),
            (math.ceil(ratio * 10**9), "the memory is in GB: multiply gpu_gb − reserve_gb by "
                                       "10⁹ to compare it with bytes")]
        for wrong, hint in mistakes:
            if int(number) == wrong != want:
                return Check(name, False, f"{case}: {hint}")
        return Check(name, False, f"{case}; the fewest is {want}: each of N_d GPUs holds "
                                  f"(2 + 2 + K)Ψ / N_d bytes, which must fit in "
                                  f"(gpu_gb − reserve_gb)·10⁹")
    psi, gpu_gb, reserve_gb = ZERO3_CASES[2]
    return Check(name, True, f"the fewest GPUs, exactly, on {len(cases)} cases: GPT-3 "
                             f"(Ψ = {psi:.3g}) on {gpu_gb} GB GPUs keeping {reserve_gb} GB for "
                             f"activations needs {zero3_gpus_exact(psi, gpu_gb, reserve_gb)}")


def _shards(p, seed=0):
    rng = np.random.default_rng(seed + p)
    return [rng.normal(loc=3.0, size=n) for n in SHARD_SIZES[:p]]


def _as_number(value):
    """float(value) for a number or a one-element array; None for anything else."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _on_rank(comm, fn, shards):
    """What the learner's function returned on this rank, and whether it changed its shard."""
    shard = shards[comm.rank].copy()
    result = fn(comm, shard)
    return result, not np.array_equal(shard, shards[comm.rank])


def _first_wrong(results, shards):
    """The first rank whose answer is wrong, in words (None: every rank is right)."""
    values = np.concatenate(shards)
    want = values.mean()
    sizes = [len(s) for s in shards]
    means = [s.mean() for s in shards]

    def right(value):
        return value is not None and abs(value - want) <= 1e-12 * max(1.0, abs(want))

    for rank, (result, changed) in enumerate(results):
        where = (f"on {len(shards)} rank{'s' * (len(shards) > 1)} with shards of sizes {sizes}, "
                 f"rank {rank}")
        if changed:
            return (f"{where}: its shard was changed by your function; all_reduce works in "
                    f"place, so reduce a new array (e.g. np.array([shard.sum(), ...])), never "
                    f"the shard itself — the caller still needs its data")
        got = _as_number(result)
        if right(got):
            continue
        if rank and right(_as_number(results[0][0])):
            return (f"{where} returned {result!r}, but rank 0 returned the mean {want:.6g}: "
                    f"every rank must end with it, so use all_reduce (reduce, or sending to "
                    f"rank 0, leaves the others without it)")
        if got is None:
            return f"{where} returned {result!r}; return the mean as one number"
        hints = [(np.mean(means), "the mean of the ranks' means: that is right only for equal "
                                  "shards; all-reduce the sum AND the count, then divide"),
                 (means[rank], "the mean of its own shard: the ranks must combine what they "
                               "hold, with comm.all_reduce"),
                 (values.sum(), f"the sum of all the numbers: divide by how many there are "
                                f"({len(values)}, the all-reduced count)"),
                 (values.sum() / len(shards), f"the sum divided by the number of ranks, "
                                              f"{len(shards)}: divide by the number of values, "
                                              f"{len(values)}")]
        for wrong, hint in hints:
            if abs(got - wrong) <= 1e-12 * max(1.0, abs(wrong)):
                return f"{where} returned {got:.6g}, {hint}; the mean is {want:.6g}"
        return f"{where} returned {got:.6g}; the mean of all {len(values)} values is {want:.6g}"
    return None


def check_global_mean(fn, world_sizes=(1, 2, 3, 4, 5), timeout=10.0):
    """fn(comm, shard) -> the mean of all the ranks' shards together, on every rank:
    Σ_k Σ shard_k / Σ_k |shard_k|, with comm.all_reduce (shards of unequal sizes; the shard
    must stay as it was given). Run with minidist.run on p thread ranks for each p of
    world_sizes."""
    from minidist import run

    name = "check_global_mean"
    try:
        sizes = list(world_sizes)
    except TypeError:
        sizes = None
    if not sizes or any(isinstance(p, bool) or not isinstance(p, int) or
                        not 1 <= p <= len(SHARD_SIZES) for p in sizes):
        raise ValueError(f"world_sizes must be a non-empty list of rank counts in 1 … "
                         f"{len(SHARD_SIZES)}, got {world_sizes!r}")
    _check_timeout(timeout)
    for p in sizes:
        shards = _shards(p)
        results, failure = _guarded(lambda p=p, shards=shards: run(
            _on_rank, p, args=(fn, shards), backend="thread", timeout=timeout), timeout)
        if failure:
            hint = (" — every rank must make the same all_reduce calls, in the same order"
                    if failure.startswith("the ranks hung") else "")
            return Check(name, False, f"on {p} rank{'s' * (p > 1)}: {failure}{hint}")
        problem = _first_wrong(results, shards)
        if problem:
            return Check(name, False, problem)
    return Check(name, True, f"every rank holds the mean of all the shards on p = "
                             f"{', '.join(map(str, sizes))} ranks, shards untouched")


__all__ = ["check_zero3_gpus", "check_global_mean"]

EXERCISES = (
    Exercise(0, "my_zero3_gpus", check_zero3_gpus, "zero3_gpus",
             "the fewest GPUs on which ZeRO-3 fits Ψ parameters (mixed-precision Adam, memory "
             "kept for activations), a ceiling worked out by hand",
             kind="formula"),
    Exercise(0, "my_global_mean", check_global_mean, "global_mean",
             "the mean of unevenly sharded numbers on every rank, with all_reduce, run on 1–5 "
             "thread ranks"),
)
