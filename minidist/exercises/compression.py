"""Lesson 8 (communication efficiency): top-k with error feedback, QSGD codes."""

import numpy as np

from minidist.exercises._common import Check, _call


def _topk_dense(values, k, key=np.abs):
    """values kept at the k entries with the largest key(values), zeros elsewhere."""
    kept = np.zeros_like(values)
    top = np.argsort(-key(values), kind="stable")[:k]
    kept[top] = values[top]
    return kept


def check_topk_error_feedback(fn, trials=4, seed=0):
    """fn(grad, residual, k) should return (sent, new_residual): with c = grad + residual, `sent`
    keeps the k entries of c with the largest |c| (zeros elsewhere) and new_residual = c − sent."""
    name = "check_topk_error_feedback"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        n = int(rng.integers(8, 40))
        k = int(rng.integers(1, n // 2))
        grad, residual = rng.normal(size=n), 0.5 * rng.normal(size=n)
        corrected = grad + residual
        want = _topk_dense(corrected, k)
        try:
            sent, new = (np.asarray(a, dtype=np.float64).reshape(-1)
                         for a in fn(grad.copy(), residual.copy(), k))
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}. "
                                      "Return the pair (sent, new_residual)")
        case = f"n = {n}, k = {k}"
        if sent.shape != (n,) or new.shape != (n,):
            return Check(name, False, f"{case}: return two vectors of length n = {n}, got "
                                      f"shapes {sent.shape} and {new.shape}")
        if np.allclose(sent, want) and np.allclose(new, corrected - want):
            continue
        hints = [
            (sent, _topk_dense(grad, k), "you compressed the gradient alone: add the residual "
             "first (c = grad + residual), or what was held back is never sent"),
            (sent, _topk_dense(corrected, k, key=lambda v: v), "you kept the k largest values; "
             "keep the k largest magnitudes |c|: a large negative entry matters as much"),
            (new, grad - want, "the new residual is c − sent, with c = grad + residual: the "
             "old residual that was not sent this time must stay"),
            (new, residual, "the residual must change: it becomes c − sent, what was held back"),
        ]
        for got, wrong, hint in hints:
            if np.allclose(got, wrong):
                return Check(name, False, f"{case}: {hint}")
        if np.count_nonzero(sent) != k:
            return Check(name, False, f"{case}: send exactly k = {k} entries, got "
                                      f"{np.count_nonzero(sent)} non-zero ones")
        return Check(name, False, f"{case}: expected sent = {np.round(want, 3).tolist()}")
    return Check(name, True, f"top-k of grad + residual, and the rest kept, on {trials} problems")


def check_qsgd_codes(fn, cases=((5, 1), (12, 3), (40, 7), (9, 127)), seed=0):
    """fn(v, levels, u) should return QSGD's integer codes sign(v_i)·⌊s·|v_i|/‖v‖₂ + u_i⌋, with
    s = levels and u one uniform draw in [0, 1) per entry; all zeros when v = 0."""
    name = "check_qsgd_codes"
    rng = np.random.default_rng(seed)
    problems = [(rng.normal(size=n), s, rng.random(n)) for n, s in cases]
    problems.append((np.zeros(4), 3, rng.random(4)))
    for v, s, u in problems:
        norm = np.linalg.norm(v)
        scaled = s * np.abs(v) / norm if norm > 0 else np.zeros_like(v)
        want = np.sign(v) * np.floor(scaled + u)
        with np.errstate(all="ignore"):
            got, failed = _call(name, fn, v.copy(), s, u.copy())
        if failed is not None:
            return failed
        got = got.reshape(-1)
        case = f"n = {len(v)}, levels s = {s}"
        if got.shape != want.shape:
            return Check(name, False, f"{case}: return one code per entry ({len(v)}), got "
                                      f"{got.size}")
        if np.array_equal(got, want):
            continue
        if norm == 0:
            return Check(name, False, "a zero vector has no direction: its codes are all 0 "
                                      "(guard the division by ‖v‖₂ = 0)")
        hints = [
            (np.sign(v) * np.round(scaled), "you rounded to the nearest level; use the draws: "
             "⌊x + u⌋ rounds x up with probability equal to its fractional part, which is what "
             "makes the codes unbiased"),
            (np.sign(v) * np.floor(scaled), "always rounding down makes every code too small on "
             "average; add the uniform draw u before the floor"),
            (np.floor(scaled + u), "the codes lost their sign: multiply by sign(v_i)"),
            (np.sign(v) * np.floor(s * np.abs(v) / np.abs(v).max() + u), "scale by the 2-norm "
             "‖v‖₂, not by the largest entry"),
        ]
        hint = next((h for wrong, h in hints if np.array_equal(got, wrong)),
                    f"expected {want.astype(int).tolist()}, got {got.tolist()}")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"QSGD codes on {len(problems)} vectors, the zero vector included")
