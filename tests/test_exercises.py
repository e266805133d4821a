import functools
import time

import numpy as np

from minidist import exercises


def test_check_gradient_passes_the_right_answer_and_explains_wrong_ones():
    right = exercises.check_gradient(lambda t, X, y: X.T @ (X @ t - y) / len(y))
    assert right and "✔" in repr(right)
    cases = {
        "sign": lambda t, X, y: X.T @ (y - X @ t) / len(y),
        "factor N": lambda t, X, y: X.T @ (X @ t - y),
        "factor 2": lambda t, X, y: 2 * X.T @ (X @ t - y) / len(y),
        "shape": lambda t, X, y: X @ t - y,
        "raised ZeroDivisionError": lambda t, X, y: 1 / 0,
        "finite differences": lambda t, X, y: np.zeros_like(t),
    }
    for hint, fn in cases.items():
        result = exercises.check_gradient(fn)
        assert not result and hint in result.message and "✘" in repr(result), hint


def test_check_gd_step():
    assert exercises.check_gd_step(lambda t, g, lr: t - lr * g)
    uphill = exercises.check_gd_step(lambda t, g, lr: t + lr * g)
    assert not uphill and "uphill" in uphill.message
    assert not exercises.check_gd_step(lambda t, g, lr: t - g)


def test_check_combine():
    def weighted(grads, sizes):
        return sum(s * g for s, g in zip(sizes, grads, strict=True)) / sum(sizes)

    assert exercises.check_combine(weighted)
    plain = exercises.check_combine(lambda grads, sizes: np.mean(grads, axis=0))
    assert not plain and "weight" in plain.message


def ring_all_reduce(comm, array, per_element=False):
    """A correct ring: reduce-scatter then all-gather, chunks as np.array_split makes them.
    per_element: the same traffic in one message per element (right, but chatty)."""
    p, r = comm.world_size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    chunks = np.array_split(array, p)  # views into array

    def send(chunk):
        for piece in [chunk[i:i + 1] for i in range(len(chunk))] if per_element else [chunk]:
            comm.send(piece, right)

    def recv(like):
        return np.array([comm.recv(left)[0] for _ in like]) if per_element else comm.recv(left)

    for step in range(p - 1):  # reduce-scatter
        send(chunks[(r - step) % p])
        mine = chunks[(r - step - 1) % p]
        mine += recv(mine)
    for step in range(p - 1):  # all-gather
        send(chunks[(r + 1 - step) % p])
        mine = chunks[(r - step) % p]
        mine[...] = recv(mine)
    return array


def naive_all_reduce(comm, array):
    if comm.rank == 0:
        for src in range(1, comm.world_size):
            array += comm.recv(src)
        for dst in range(1, comm.world_size):
            comm.send(array, dst)
    else:
        comm.send(array, 0)
        array[...] = comm.recv(0)
    return array


def half_ring(comm, array):  # the reduce-scatter only
    p, r = comm.world_size, comm.rank
    chunks = np.array_split(array, p)
    for step in range(p - 1):
        comm.send(chunks[(r - step) % p], (r + 1) % p)
        chunks[(r - step - 1) % p] += comm.recv((r - 1) % p)
    return array


def deadlock(comm, array):
    for _ in range(comm.world_size - 1):
        array += comm.recv((comm.rank - 1) % comm.world_size)  # everyone waits, nobody sends
        comm.send(array, (comm.rank + 1) % comm.world_size)
    return array


def test_check_ring_all_reduce_passes_a_ring():
    result = exercises.check_ring_all_reduce(ring_all_reduce)
    assert result and "✔" in repr(result)


def test_check_ring_all_reduce_explains_wrong_answers():
    def mean(comm, array):
        return ring_all_reduce(comm, array) / comm.world_size

    cases = {
        "naive all-reduce": naive_all_reduce,
        "all-gather": half_ring,
        "nothing was summed": lambda comm, array: array,
        "the mean": mean,
        "comm.all_reduce": lambda comm, array: comm.all_reduce(array),
        "raised ZeroDivisionError": lambda comm, array: 1 / 0,
        "wrong at": lambda comm, array: ring_all_reduce(comm, array) + (comm.rank == 2),
        "2(p−1) = 2": functools.partial(ring_all_reduce, per_element=True),
    }
    for hint, fn in cases.items():
        result = exercises.check_ring_all_reduce(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_check_ring_all_reduce_names_a_deadlock_quickly():
    start = time.perf_counter()
    result = exercises.check_ring_all_reduce(deadlock, timeout=0.5)
    assert not result and "deadlock" in result.message and "send" in result.message
    assert time.perf_counter() - start < 5


def test_check_server_step_passes_the_right_answer_and_explains_wrong_ones():
    def step(grads, sizes, theta, lr):
        total = sum(sizes)
        return theta - lr * sum(n / total * g for g, n in zip(grads, sizes, strict=True))

    right = exercises.check_server_step(step)
    assert right and "✔" in repr(right)

    def weighted(grads, sizes):
        return sum(n / sum(sizes) * g for g, n in zip(grads, sizes, strict=True))

    cases = {
        "plain mean": lambda g, s, t, lr: t - lr * np.mean(g, axis=0),
        "uphill": lambda g, s, t, lr: t + lr * weighted(g, s),
        "learning rate is missing": lambda g, s, t, lr: t - weighted(g, s),
        "returned the combined gradient": lambda g, s, t, lr: weighted(g, s),
        "added the mean gradients": lambda g, s, t, lr: t - lr * np.sum(g, axis=0),
        "divide |B_k| by |B|": lambda g, s, t, lr: t - lr * (np.array(s) @ np.array(g)),
        "unchanged": lambda g, s, t, lr: t,
        "shape": lambda g, s, t, lr: np.stack(g),
        "raised ZeroDivisionError": lambda g, s, t, lr: 1 / 0,
        "relative error": lambda g, s, t, lr: t - lr * weighted(g, s) + 1e-3,
    }
    for hint, fn in cases.items():
        result = exercises.check_server_step(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def shard_weights(batch_size, world_size):
    base, extra = divmod(batch_size, world_size)
    return [(base + (k < extra)) / batch_size for k in range(world_size)]


def test_check_shard_weights_passes_the_right_answer_and_explains_wrong_ones():
    assert exercises.check_shard_weights(shard_weights)
    cases = {
        "1/p": lambda b, p: [1 / p] * p,
        "shard sizes": lambda b, p: [w * b for w in shard_weights(b, p)],
        "wrong ranks": lambda b, p: shard_weights(b, p)[::-1],
        "sum to": lambda b, p: [(b // p) / b] * p if b % p else [1 / p] * p,
        "one weight per rank": lambda b, p: [1.0],
        "raised ZeroDivisionError": lambda b, p: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_shard_weights(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def bucket_slices(n, itemsize, bucket_bytes):
    per = bucket_bytes // itemsize
    return [slice(start, min(start + per, n)) for start in range(0, n, per)]


def test_check_bucket_slices_passes_the_right_answer_and_explains_wrong_ones():
    assert exercises.check_bucket_slices(bucket_slices)
    pairs = lambda n, s, b: [(x.start, x.stop) for x in bucket_slices(n, s, b)]  # noqa: E731
    assert exercises.check_bucket_slices(pairs)  # (start, stop) pairs are fine too

    def elements(n, itemsize, bucket_bytes):  # bytes taken for elements
        return [slice(s, min(s + bucket_bytes, n)) for s in range(0, n, bucket_bytes)]

    def round_up(n, itemsize, bucket_bytes):
        per = -(-bucket_bytes // itemsize)
        return [slice(s, min(s + per, n)) for s in range(0, n, per)]

    def drop_last(n, itemsize, bucket_bytes):
        per = bucket_bytes // itemsize
        return [slice(k * per, (k + 1) * per) for k in range(n // per)]

    def overlap(n, itemsize, bucket_bytes):
        per = bucket_bytes // itemsize
        return [slice(max(0, s - 1), min(s + per - 1, n)) for s in range(0, n, per - 1 or 1)]

    def past_the_end(n, itemsize, bucket_bytes):
        per = bucket_bytes // itemsize
        return [slice(s, s + per) for s in range(0, n, per)]

    def one_each(n, itemsize, bucket_bytes):
        return [slice(i, i + 1) for i in range(n)]

    cases = {
        "counts bytes, not elements": elements,
        "Round down": round_up,
        "at most 4 elements": lambda n, s, b: [slice(0, n)],
        "last, partial bucket is missing": drop_last,
        "in two buckets": overlap,
        "outside": past_the_end,
        "suffice": one_each,
        "in order": lambda n, s, b: bucket_slices(n, s, b)[::-1],
        "raised TypeError": lambda n, s, b: [slice(0, n, 2)] + None,
    }
    for hint, fn in cases.items():
        result = exercises.check_bucket_slices(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_row_parallel_backward_checker():
    assert exercises.check_row_parallel_backward(lambda X, W, dY: (X.T @ dY, dY.sum(0), dY @ W.T))
    cases = {  # with t = 2 ranks
        "db is 1/t of the answer": lambda X, W, dY: (X.T @ dY, dY.sum(0) / 2, dY @ W.T),
        "t times too large": lambda X, W, dY: (X.T @ dY, dY.sum(0), 2 * dY @ W.T),
        "dX_k should have shape": lambda X, W, dY: (X.T @ dY, dY.sum(0), dY),
        "dW_k should have shape": lambda X, W, dY: (dY.T @ X, dY.sum(0), dY @ W.T),
        "dW_k is wrong": lambda X, W, dY: (-X.T @ dY, dY.sum(0), dY @ W.T),
        "three arrays": lambda X, W, dY: (X.T @ dY, dY.sum(0)),
        "raised ZeroDivisionError": lambda X, W, dY: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_row_parallel_backward(fn, world_sizes=(2,))
        assert not result and hint in result.message, (hint, result)


def test_bubble_fraction_checker():
    assert exercises.check_bubble_fraction(lambda p, m: (p - 1) / (m + p - 1))
    wrong = exercises.check_bubble_fraction(lambda p, m: (p - 1) / m)
    assert not wrong and "idle time over *useful* time" in wrong.message
    wrong = exercises.check_bubble_fraction(lambda p, m: 0.0)
    assert not wrong and "Count the slots" in wrong.message


def test_tensor_parallel_params_checker():
    assert exercises.check_tensor_parallel_params(
        lambda d_in, h, d_out, t: (d_in * h + h + h * d_out) // t + d_out)
    cases = {
        "split the second layer's bias too": lambda d_in, h, d_out, t: (
            (d_in * h + h + h * d_out + d_out) // t),
        "biases are missing": lambda d_in, h, d_out, t: (d_in * h + h * d_out) // t,
        "a rank stores 108 parameters, you said 128": lambda d_in, h, d_out, t: d_in * h,
    }
    for hint, fn in cases.items():
        result = exercises.check_tensor_parallel_params(fn)
        assert not result and hint in result.message, (hint, result)


def test_ssp_rule_checker():
    assert exercises.check_ssp_rule(lambda c, slowest, s: c - slowest <= s)
    cases = {
        "the bound is ≤ s, not < s": lambda c, slowest, s: c - slowest < s,
        "must wait": lambda c, slowest, s: True,
        "may pull": lambda c, slowest, s: c - slowest <= s - 1 if s else c == slowest,
        "return True or False": lambda c, slowest, s: None,
        "raised ZeroDivisionError": lambda c, slowest, s: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_ssp_rule(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_server_traffic_checker():
    def right(n, itemsize, workers, k):
        return 2 * workers * -(-n // k) * itemsize

    assert exercises.check_server_traffic(right)
    cases = {
        "one direction only": lambda n, i, w, k: w * -(-n // k) * i,
        "divide the parameters": lambda n, i, w, k: 2 * w * n * i,
        "multiply the elements by itemsize": lambda n, i, w, k: 2 * w * -(-n // k),
        "not ⌊n/k⌋": lambda n, i, w, k: 2 * w * (n // k) * i,
        "multiply by W": lambda n, i, w, k: 2 * -(-n // k) * i,
        "expected": lambda n, i, w, k: 0,
        "raised KeyError": lambda n, i, w, k: {}[n],
    }
    for hint, fn in cases.items():
        result = exercises.check_server_traffic(fn)
        assert not result and hint in result.message, (hint, result)


def test_matmul_traffic_checker():
    def right(M, N, K, BM, BN):
        return M * K * -(-N // BN), K * N * -(-M // BM)

    assert exercises.check_matmul_traffic(right)
    cases = {
        "naive kernel": lambda M, N, K, BM, BN: (M * N * K, M * N * K),
        "⌈N/BN⌉ block columns, not ⌊N/BN⌋": lambda M, N, K, BM, BN: (M * K * (N // BN),
                                                                      K * N * (M // BM)),
        "re-read by every block column": lambda M, N, K, BM, BN: (M * K * -(-M // BM),
                                                                  K * N * -(-N // BN)),
        "how many blocks load it": lambda M, N, K, BM, BN: (M * K, K * N),
        "raised ZeroDivisionError": lambda M, N, K, BM, BN: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_matmul_traffic(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_topk_error_feedback_checker():
    def right(grad, residual, k):
        corrected = grad + residual
        sent = np.zeros_like(corrected)
        top = np.argsort(-np.abs(corrected))[:k]
        sent[top] = corrected[top]
        return sent, corrected - sent

    def top_of(values, k, key=np.abs):
        sent = np.zeros_like(values)
        top = np.argsort(-key(values))[:k]
        sent[top] = values[top]
        return sent

    assert exercises.check_topk_error_feedback(right)
    cases = {
        "add the residual first": lambda g, r, k: (top_of(g, k), g - top_of(g, k)),
        "largest magnitudes": lambda g, r, k: (top_of(g + r, k, key=lambda v: v),
                                               g + r - top_of(g + r, k, key=lambda v: v)),
        "old residual that was not sent": lambda g, r, k: (top_of(g + r, k), g - top_of(g + r, k)),
        "the residual must change": lambda g, r, k: (top_of(g + r, k), r),
        "send exactly k": lambda g, r, k: (top_of(g + r, k + 1), g + r - top_of(g + r, k + 1)),
        "return two vectors": lambda g, r, k: (g[:k], r),
        "raised ValueError": lambda g, r, k: top_of(g + r, k),
    }
    for hint, fn in cases.items():
        result = exercises.check_topk_error_feedback(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_qsgd_codes_checker():
    def right(v, s, u):
        norm = np.linalg.norm(v)
        if norm == 0:
            return np.zeros_like(v)
        return np.sign(v) * np.floor(s * np.abs(v) / norm + u)

    assert exercises.check_qsgd_codes(right)
    scaled = lambda v, s: s * np.abs(v) / np.linalg.norm(v)  # noqa: E731
    cases = {
        "rounded to the nearest level": lambda v, s, u: np.sign(v) * np.round(scaled(v, s)),
        "add the uniform draw": lambda v, s, u: np.sign(v) * np.floor(scaled(v, s)),
        "lost their sign": lambda v, s, u: np.floor(scaled(v, s) + u),
        "not by the largest entry": lambda v, s, u: np.sign(v) * np.floor(
            s * np.abs(v) / np.abs(v).max() + u),
        "zero vector has no direction": lambda v, s, u: np.sign(v) * np.floor(scaled(v, s) + u),
        "one code per entry": lambda v, s, u: right(v, s, u)[:-1],
        "raised ZeroDivisionError": lambda v, s, u: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_qsgd_codes(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_model_states_checker():
    assert exercises.check_model_states(lambda psi, dp, tp, pp: 16 * psi / (tp * pp))
    cases = {
        "dp does not divide": lambda psi, dp, tp, pp: 16 * psi / (dp * tp * pp),
        "divide by tp·pp": lambda psi, dp, tp, pp: 16 * psi,
        "divide by pp too": lambda psi, dp, tp, pp: 16 * psi / tp,
        "divide by tp too": lambda psi, dp, tp, pp: 16 * psi / pp,
        "add the optimizer": lambda psi, dp, tp, pp: 4 * psi / (tp * pp),
        "2 + 2 + 12 = 16": lambda psi, dp, tp, pp: 2 * psi / (tp * pp),
        "add 2 bytes of fp16": lambda psi, dp, tp, pp: 12 * psi / (tp * pp),
        "expected 1.6e+10 bytes": lambda psi, dp, tp, pp: 8 * psi,
        "raised TypeError": lambda psi, dp, tp, pp: None + 1,
    }
    for hint, fn in cases.items():
        result = exercises.check_model_states(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_pipeline_compute_checker():
    def right(psi, tokens, devices, flops, pp, m):
        return 6 * psi * tokens / (devices * flops) * (1 + (pp - 1) / m)

    assert exercises.check_pipeline_compute(right)
    ideal = lambda psi, t, n, f: 6 * psi * t / (n * f)  # noqa: E731
    cases = {
        "forward pass only": lambda psi, t, n, f, pp, m: right(psi, t, n, f, pp, m) / 3,
        "add the bubble": lambda psi, t, n, f, pp, m: ideal(psi, t, n, f),
        "share of the whole step": lambda psi, t, n, f, pp, m: ideal(psi, t, n, f) * (
            1 + (pp - 1) / (m + pp - 1)),
        "divide by devices": lambda psi, t, n, f, pp, m: right(psi, t, n, f, pp, m) * n,
        "expected": lambda psi, t, n, f, pp, m: 1.0,
        "raised ZeroDivisionError": lambda psi, t, n, f, pp, m: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_pipeline_compute(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def causal_attention(q, k, v, scale=None, hide=1, axis=-1):
    """softmax(q kᵀ·scale + M) v with M = −∞ on np.triu(·, k=hide) (hide=None: no mask;
    hide=-1 with np.tril: the wrong side); the softmax over `axis`."""
    T = q.shape[-2]
    s = q @ k.swapaxes(-1, -2) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if hide is not None:
        hidden = np.triu(np.ones((T, T), bool), k=hide) if hide > 0 else np.tril(
            np.ones((T, T), bool), k=hide)
        s = np.where(hidden, -np.inf, s)
    p = np.exp(s - s.max(axis=axis, keepdims=True))
    return p / p.sum(axis=axis, keepdims=True) @ v


def test_causal_attention_checker():
    right = exercises.check_causal_attention(causal_attention)
    assert right and "same logits" in right.message, right

    def zeroed_after(q, k, v):  # the mask applied to the weights after the softmax
        s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        return np.tril(p / p.sum(axis=-1, keepdims=True)) @ v

    def not_implemented(q, k, v):
        raise NotImplementedError("your code here")

    def weights(q, k, v):
        T = q.shape[-2]
        s = q @ k.swapaxes(-1, -2) + np.where(np.triu(np.ones((T, T)), 1), -np.inf, 0)
        return np.exp(s) / np.exp(s).sum(axis=-1, keepdims=True)

    cases = {
        "sees the later positions": lambda q, k, v: causal_attention(q, k, v, hide=None),
        "wrong side": lambda q, k, v: causal_attention(q, k, v, hide=-1),
        "not scaled": lambda q, k, v: causal_attention(q, k, v, scale=1.0),
        "not 1/d_head": lambda q, k, v: causal_attention(q, k, v, scale=1 / q.shape[-1]),
        "wrong axis": lambda q, k, v: causal_attention(q, k, v, axis=-2),
        "BEFORE the softmax": zeroed_after,
        "the attention weights P": weights,
        "heads on axis 1": lambda q, k, v: causal_attention(q, k, v).transpose(0, 2, 1, 3),
        "NaN": lambda q, k, v: causal_attention(q, k, v, hide=0),  # the diagonal hidden too
        "differs from CausalSelfAttention": lambda q, k, v: causal_attention(q, k, v) + 1e-3,
        "raised NotImplementedError": not_implemented,
    }
    with np.errstate(invalid="ignore"):
        for hint, fn in cases.items():
            result = exercises.check_causal_attention(fn)
            assert not result and hint in result.message and "✘" in repr(result), (hint, result)


def test_causal_attention_checker_runs_the_function_inside_a_gpt():
    calls = []

    def stateful(q, k, v):  # right on the direct problems, then wrong inside the model
        calls.append(q.shape)
        return causal_attention(q, k, v) * (1.0 if len(calls) <= 3 else 1.5)

    result = exercises.check_causal_attention(stateful)
    assert not result and "GPT with your attention" in result.message, result
    assert calls[3:] == [(2, 4, 8, 4)] * 2  # one call per block of the 2-block GPT


def layernorm_backward(dy, x, gamma, eps=1e-5, mean_path=True, variance_path=True):
    centred = x - x.mean(axis=-1, keepdims=True)
    inv = 1 / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    x_hat, g = centred * inv, gamma * dy
    dx = g - (g.mean(axis=-1, keepdims=True) if mean_path else 0)
    dx = inv * (dx - (x_hat * (g * x_hat).mean(axis=-1, keepdims=True) if variance_path else 0))
    d = x.shape[-1]
    return dx, (dy * x_hat).reshape(-1, d).sum(axis=0), dy.reshape(-1, d).sum(axis=0)


def test_layernorm_backward_checker():
    right = exercises.check_layernorm_backward(layernorm_backward)
    assert right and "finite differences" in right.message, right

    def replace(i, make):
        def fn(dy, x, gamma, eps=1e-5):
            grads = list(layernorm_backward(dy, x, gamma, eps))
            x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
            grads[i] = make(dy, x_hat, grads)
            return tuple(grads)
        return fn

    cases = {
        "mean's path": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g, eps,
                                                                    mean_path=False),
        "variance's path": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g, eps,
                                                                        variance_path=False),
        "treats μ and σ as constants": lambda dy, x, g, eps=1e-5: layernorm_backward(
            dy, x, g, eps, mean_path=False, variance_path=False),
        "multiply ∂y by γ": lambda dy, x, g, eps=1e-5: layernorm_backward(
            dy, x, np.ones_like(g), eps)[:1] + layernorm_backward(dy, x, g, eps)[1:],
        "use the eps you are given": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g),
        "dgamma is Σ ∂y": replace(1, lambda dy, x_hat, grads: grads[2]),
        "dgamma is summed over the wrong axis": replace(1, lambda dy, x_hat, grads: (
            dy * x_hat).sum(axis=-1)),
        "dgamma should have shape (4,), got (3, 4)": replace(1, lambda dy, x_hat, grads: (
            dy * x_hat).sum(axis=0)),
        "dbeta is Σ ∂y ⊙ x̂": replace(2, lambda dy, x_hat, grads: grads[1]),
        "dbeta differs from finite differences": replace(2, lambda dy, x_hat, grads: 2 * grads[2]),
        "three arrays": lambda dy, x, g, eps=1e-5: layernorm_backward(dy, x, g, eps)[:2],
        "raised ZeroDivisionError": lambda dy, x, g, eps=1e-5: 1 / 0,
    }
    for hint, fn in cases.items():
        result = exercises.check_layernorm_backward(fn)
        assert not result and hint in result.message and "✘" in repr(result), (hint, result)
