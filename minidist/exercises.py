"""Checkers for the lessons' exercises: a clear pass, or a message that helps fix the answer.

Each checker runs the learner's function on several random problems against an independent
reference (finite differences, or the full-batch computation) and returns a `Check`, which
prints as ✔ or ✘ with the reason, and is truthy when passed.
"""

import numpy as np

from minidist.gradcheck import numerical_gradient, relative_error


class Check:
    """The outcome of a checker: `passed` and a message for the learner."""

    def __init__(self, name, passed, message):
        self.name, self.passed, self.message = name, passed, message

    def __bool__(self):
        return self.passed

    def __repr__(self):
        mark = "✔ passed" if self.passed else "✘ not yet"
        return f"{mark} — {self.name}: {self.message}"


def _regression_problem(rng, n=None, d=None):
    n = n or int(rng.integers(5, 30))
    d = d or int(rng.integers(1, 8))
    return rng.normal(size=d), rng.normal(size=(n, d)), rng.normal(size=n)


def half_mse(theta, X, y):
    """L(θ) = (1/2N) ‖Xθ − y‖²."""
    r = X @ theta - y
    return 0.5 * float(r @ r) / len(y)


def _call(name, fn, *args):
    """Run the learner's function; turn an exception into a failed Check."""
    try:
        return np.asarray(fn(*args), dtype=np.float64), None
    except Exception as exc:  # noqa: BLE001 - any error in learner code is reported, not raised
        return None, Check(name, False, f"your function raised {type(exc).__name__}: {exc}")


def check_gradient(fn, trials=5, seed=0):
    """fn(θ, X, y) should return ∇L(θ) = (1/N) Xᵀ(Xθ − y) for L(θ) = (1/2N)‖Xθ − y‖²."""
    name = "check_gradient"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng)
        got, failed = _call(name, fn, theta.copy(), X, y)
        if failed is not None:
            return failed
        want = numerical_gradient(lambda t, X=X, y=y: half_mse(t, X, y), theta.copy())
        if got.shape != want.shape:
            return Check(name, False, f"the gradient must have θ's shape {want.shape}, "
                                      f"got {got.shape}. Did you sum over the wrong axis?")
        if relative_error(got, want) < 1e-6:
            continue
        if relative_error(-got, want) < 1e-6:
            return Check(name, False, "right size, wrong sign: the residual is Xθ − y, not y − Xθ")
        if relative_error(got / len(y), want) < 1e-6:
            return Check(name, False, f"too large by a factor N = {len(y)}: L is a mean, "
                                      "so divide the sum by N")
        if relative_error(got / 2, want) < 1e-6:
            return Check(name, False, "too large by a factor 2: the ½ in L cancels the 2 "
                                      "from differentiating the square")
        return Check(name, False, f"differs from finite differences (relative error "
                                  f"{relative_error(got, want):.2e}) on a {X.shape} problem")
    return Check(name, True, f"matches finite differences on {trials} random problems")


def check_gd_step(fn, trials=5, seed=0):
    """fn(θ, grad, lr) should return the new parameters θ − η·grad."""
    name = "check_gd_step"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, grad, lr = rng.normal(size=4), rng.normal(size=4), float(rng.uniform(0.01, 1))
        got, failed = _call(name, fn, theta.copy(), grad.copy(), lr)
        if failed is not None:
            return failed
        if got.shape != theta.shape:
            return Check(name, False, f"return the new θ of shape {theta.shape}, got {got.shape}")
        if np.allclose(got, theta + lr * grad):
            return Check(name, False, "you stepped uphill: descent subtracts η·∇L")
        if not np.allclose(got, theta - lr * grad, rtol=1e-12, atol=1e-12):
            return Check(name, False, "the new θ should be θ − η·grad")
    return Check(name, True, f"θ − η∇L on {trials} random cases")


def check_combine(fn, trials=5, seed=0):
    """fn(grads, sizes) should combine per-worker mean gradients into the global-batch gradient:
    ∇L = Σ_k (|B_k| / |B|) ∇L_k."""
    name = "check_combine"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng, n=int(rng.integers(7, 40)))
        cuts = np.sort(rng.choice(np.arange(1, len(y)), size=int(rng.integers(1, 4)),
                                  replace=False))
        parts = np.split(np.arange(len(y)), cuts)
        grads = [X[p].T @ (X[p] @ theta - y[p]) / len(p) for p in parts]
        sizes = [len(p) for p in parts]
        got, failed = _call(name, fn, [g.copy() for g in grads], list(sizes))
        if failed is not None:
            return failed
        want = X.T @ (X @ theta - y) / len(y)
        if got.shape != want.shape:
            return Check(name, False, f"return one gradient of shape {want.shape}, "
                                      f"got {got.shape}")
        if relative_error(got, want) < 1e-10:
            continue
        if relative_error(got, np.mean(grads, axis=0)) < 1e-10:
            return Check(name, False, f"a plain mean is right only for equal parts; these have "
                                      f"sizes {sizes}: weight each by its size")
        return Check(name, False, "does not equal the full-batch gradient "
                                  f"(relative error {relative_error(got, want):.2e})")
    return Check(name, True, f"equals the full-batch gradient for {trials} uneven splits")


# ---- lesson 3: ring all-reduce over send/recv ---------------------------------------------------
def _ring_input(seed, rank, n):
    """Rank `rank`'s array: integers 1..99 as float64: every order of summing is exact, and no
    partial sum can equal the full one."""
    return np.random.default_rng([seed, rank, n]).integers(1, 100, size=n).astype(np.float64)


def _ranks(p):
    return f"{p} rank" + "s" * (p != 1)


def _ring_trial(comm, fn, sizes, seed):
    """On each rank: run fn(comm, array) for every size; keep its answer and the traffic."""
    out = []
    for n in sizes:
        array = _ring_input(seed, comm.rank, n)
        comm.stats.reset()
        got = fn(comm, array)
        got = np.array(array if got is None else got, dtype=np.float64, copy=True)
        builtins = sorted(op for op, s in comm.stats.ops.items() if s.calls and op != "barrier")
        out.append((got, comm.stats.bytes_sent, comm.stats["send"].messages, builtins))
    return out


def _diagnose_values(p, n, got, inputs, want):
    """Why the ranks' answers differ from the sum: the common mistakes first."""
    where = f"with {_ranks(p)} and n = {n} elements"
    if any(g.shape != want.shape for g in got):
        shapes = sorted({g.shape for g in got})
        return f"{where}, every rank should end with shape {want.shape}; got {shapes}"
    if p > 1 and all(np.array_equal(g, x) for g, x in zip(got, inputs, strict=True)):
        return f"{where}, every rank still holds its own array: nothing was summed"
    if p > 1 and all(np.allclose(g, want / p) for g in got):
        return f"{where}, you computed the mean; the exercise asks for the sum"
    right = [g == want for g in got]
    if p > 1 and all(0 < r.sum() <= -(-n // p) for r in right):
        return (f"{where}, each rank has the full sum in only one chunk (≈ n/p positions): "
                "that is the reduce-scatter half. Now pass the finished chunks around the ring "
                "for p − 1 more steps (the all-gather), copying instead of adding")
    bad = [r for r, ok in enumerate(right) if not ok.all()]
    r = bad[0]
    i = int(np.flatnonzero(~right[r])[0])
    return (f"{where}, rank(s) {bad} end with wrong values; rank {r} is wrong at "
            f"{int((~right[r]).sum())} of {n} positions (first: index {i}, expected "
            f"{want[i]:g}, got {got[r][i]:g}). Check which chunk each step sends and adds")


def check_ring_all_reduce(fn, world_sizes=(1, 2, 3, 4, 5), sizes=(12, 7, 1001, 2, 1, 0),
                          timeout=5.0, seed=0):
    """fn(comm, array) should leave the sum of every rank's `array` on every rank (in place, or
    returned), using only comm.send / comm.recv and sending no more than a ring's
    2(p−1)/p·n bytes per rank. Runs on the thread backend; a hang ends after `timeout` s."""
    from minidist.errors import CommTimeout, WorkerError
    from minidist.launch import run

    name = "check_ring_all_reduce"
    for p in world_sizes:
        try:
            results = run(_ring_trial, p, args=(fn, tuple(sizes), seed), backend="thread",
                          timeout=timeout)
        except CommTimeout as exc:
            return Check(name, False, f"with {_ranks(p)} the run hung until the {timeout} s "
                         f"timeout ({exc}). That is a deadlock: some rank waits in recv for a "
                         "message nobody sends. In each step, first send to the right "
                         "(send never waits), then recv from the left")
        except WorkerError as exc:
            what = str(exc).splitlines()[0].split("failed: ", 1)[-1]
            return Check(name, False, f"with {_ranks(p)}, rank {exc.rank} raised {what}")
        except Exception as exc:  # noqa: BLE001 - a checker reports, never raises
            return Check(name, False, f"with {_ranks(p)} the run failed: "
                                      f"{type(exc).__name__}: {exc}")
        for i, n in enumerate(sizes):
            got, sent, messages, builtins = zip(*(res[i] for res in results), strict=True)
            inputs = [_ring_input(seed, r, n) for r in range(p)]
            want = np.sum(inputs, axis=0) if p > 1 else inputs[0]
            used = sorted(set().union(*builtins))
            if used:
                return Check(name, False, f"your function called comm.{', comm.'.join(used)}; "
                                          "write the ring yourself with comm.send and comm.recv")
            if not all(g.shape == want.shape and np.array_equal(g, want) for g in got):
                return Check(name, False, _diagnose_values(p, n, got, inputs, want))
            limit = 2 * (p - 1) * -(-n // p) * 8  # 2(p−1) chunks of at most ⌈n/p⌉ float64s
            if max(sent) > limit:
                r = int(np.argmax(sent))
                return Check(name, False, f"right values, but with {p} ranks and n = {n} "
                             f"float64s ({8 * n} bytes) rank {r} sent {sent[r]} bytes; a ring "
                             f"sends only 2(p−1)/p·n ≈ {2 * (p - 1) * 8 * n // p} bytes per rank. "
                             "Sending whole arrays (through one rank, or up a tree) is the naive "
                             "all-reduce: split the array into p chunks, one chunk per message")
            if max(messages) > 2 * (p - 1):
                return Check(name, False, f"right values and bytes, but with {p} ranks a rank "
                             f"sent {max(messages)} messages; a ring needs only 2(p−1) = "
                             f"{2 * (p - 1)}: send each step's chunk as one message")
    return Check(name, True, f"the sum on every rank, with ring traffic, for world sizes "
                             f"{tuple(world_sizes)} and sizes {tuple(sizes)}")


# ---- lesson 4: the server's step in distributed gradient descent -------------------------------
def _uneven_parts(rng, n):
    """2 to 4 contiguous parts of range(n), not all of the same size."""
    while True:
        cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, 4)), replace=False))
        parts = np.split(np.arange(n), cuts)
        if len({len(p) for p in parts}) > 1:
            return parts


def check_server_step(fn, trials=5, seed=0):
    """fn(grads, sizes, theta, lr) should return the server's new parameters after one step of
    distributed gradient descent: θ − η Σ_k (|B_k|/|B|) ∇L_k, where grads[k] = ∇L_k is worker
    k's mean gradient over its sizes[k] = |B_k| rows. Checked against the full-batch step."""
    name = "check_server_step"
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng, n=int(rng.integers(7, 40)))
        parts = _uneven_parts(rng, len(y))
        grads = [X[p].T @ (X[p] @ theta - y[p]) / len(p) for p in parts]
        sizes, lr = [len(p) for p in parts], float(rng.uniform(0.05, 0.5))
        got, failed = _call(name, fn, [g.copy() for g in grads], list(sizes), theta.copy(), lr)
        if failed is not None:
            return failed
        full = X.T @ (X @ theta - y) / len(y)  # the gradient of the mean loss over all rows
        want = theta - lr * full
        if got.shape != want.shape:
            return Check(name, False, f"return the new θ, of shape {want.shape}; got {got.shape}")
        if relative_error(got, want) < 1e-10:
            continue
        mistakes = [
            (theta, "θ came back unchanged: subtract η times the combined gradient"),
            (theta - lr * np.mean(grads, axis=0), f"a plain mean of the gradients is right only "
             f"for equal parts; these have sizes {sizes}: weight ∇L_k by |B_k|/|B|"),
            (theta + lr * full, "you stepped uphill: the update subtracts η·∇L"),
            (theta - full, "the learning rate is missing: the step is θ − η·∇L"),
            (full, "you returned the combined gradient; return the new parameters θ − η·∇L"),
            (theta - lr * np.sum(grads, axis=0), "you added the mean gradients; weight each by "
             "its share |B_k|/|B| of the batch (the weights must sum to 1)"),
            (theta - lr * sum(s * g for s, g in zip(sizes, grads, strict=True)),
             f"the weights must be shares of the batch: divide |B_k| by |B| = {sum(sizes)}"),
        ]
        for wrong, hint in mistakes:
            if relative_error(got, wrong) < 1e-10:
                return Check(name, False, hint)
        return Check(name, False, "differs from one full-batch gradient-descent step "
                                  f"(relative error {relative_error(got, want):.2e}) with parts "
                                  f"of sizes {sizes} and lr = {lr:.3f}")
    return Check(name, True, f"one full-batch gradient-descent step for {trials} uneven splits")


# ---- lesson 5: data parallelism ----------------------------------------------------------------
def check_shard_weights(fn, cases=((12, 4), (10, 4), (7, 3), (5, 5), (64, 1), (13, 8), (100, 7))):
    """fn(batch_size, world_size) should return rank k's weight |B_k|/|B| for every rank, where
    the batch is cut into contiguous shards as minidist.data.shard_bounds cuts it: the first
    |B| mod p ranks get one row more."""
    from minidist.data import shard_bounds

    name = "check_shard_weights"
    for batch, p in cases:
        sizes = np.array([hi - lo for lo, hi in (shard_bounds(batch, k, p) for k in range(p))])
        want = sizes / batch
        try:
            got = np.asarray(fn(batch, p), dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
        where = f"with |B| = {batch} rows on p = {p} ranks (shards of {sizes.tolist()} rows)"
        if got.shape != want.shape:
            return Check(name, False, f"{where}, return one weight per rank ({p}), "
                                      f"got {got.size}")
        if np.allclose(got, want, rtol=1e-12, atol=1e-15):
            continue
        if np.allclose(got, sizes):
            return Check(name, False, f"{where}, you returned the shard sizes {sizes.tolist()}; "
                                      f"divide by |B| = {batch} so that the weights sum to 1")
        if np.allclose(got, 1 / p):
            return Check(name, False, f"{where}, every rank got 1/p; that is right only when p "
                                      f"divides |B|. Weight rank k by its own share |B_k|/|B|")
        if np.allclose(np.sort(got), np.sort(want)):
            return Check(name, False, f"{where}, right weights, wrong ranks: the first "
                                      f"|B| mod p = {batch % p} ranks hold the extra rows")
        if not np.isclose(got.sum(), 1.0):
            return Check(name, False, f"{where}, the weights sum to {got.sum():.4g}, not 1: "
                                      "every row of the batch must be counted exactly once. "
                                      "Did integer division drop the remainder?")
        return Check(name, False, f"{where}, expected {np.round(want, 4).tolist()}, "
                                  f"got {np.round(got, 4).tolist()}")
    return Check(name, True, f"|B_k|/|B| for {len(cases)} batches, even and uneven")


def _as_bounds(bucket):
    """(start, stop) of a slice(start, stop) or a (start, stop) pair; ValueError otherwise."""
    if isinstance(bucket, slice):
        if bucket.step not in (None, 1):
            raise ValueError(f"slice {bucket} has a step; buckets are contiguous")
        return int(bucket.start or 0), int(bucket.stop)
    start, stop = bucket
    return int(start), int(stop)


def check_bucket_slices(fn, cases=((100, 8, 32), (10, 8, 20), (9610, 8, 4096), (7, 8, 8),
                                   (5, 8, 1 << 20), (12, 4, 16), (1, 8, 8), (0, 8, 64))):
    """fn(n_params, itemsize, bucket_bytes) should cut the flat gradient of n_params elements of
    itemsize bytes into contiguous buckets (slices, in order) of at most bucket_bytes each,
    covering every element exactly once, with as few buckets as possible (one message each)."""
    name = "check_bucket_slices"
    for n, itemsize, limit in cases:
        where = f"with n = {n} elements of {itemsize} bytes and buckets of at most {limit} bytes"
        try:
            bounds = [_as_bounds(b) for b in fn(n, itemsize, limit)]
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"{where}, your function raised {type(exc).__name__}: "
                                      f"{exc}. Return a list of slice(start, stop)")
        bounds = [(lo, hi) for lo, hi in bounds if hi > lo]  # empty buckets cost nothing
        per = limit // itemsize
        too_big = [(lo, hi) for lo, hi in bounds if (hi - lo) * itemsize > limit]
        if too_big:
            lo, hi = too_big[0]
            hint = {per + 1: f" Round down: {limit} bytes hold only {per} elements",
                    limit: " bucket_bytes counts bytes, not elements: divide it by itemsize"}
            hint = hint.get(hi - lo, f" A bucket may hold at most {per} elements")
            return Check(name, False, f"{where}, bucket {lo}:{hi} holds {(hi - lo) * itemsize} "
                                      f"bytes.{hint}")
        covered = np.zeros(n, dtype=int)
        for lo, hi in bounds:
            covered[max(lo, 0):min(hi, n)] += 1
        if any(lo < 0 or hi > n for lo, hi in bounds):
            return Check(name, False, f"{where}, a bucket reaches outside 0:{n}: clip the last "
                                      "one at n")
        if (covered > 1).any():
            return Check(name, False, f"{where}, element {int(np.argmax(covered > 1))} is in two "
                                      "buckets: each bucket starts where the previous stops")
        if (covered == 0).any():
            first = int(np.argmax(covered == 0))
            tail = " (the last, partial bucket is missing)" if first > n - per else ""
            return Check(name, False, f"{where}, element {first} is in no bucket{tail}")
        if bounds != sorted(bounds):
            return Check(name, False, f"{where}, list the buckets in order along the buffer")
        fewest = -(-n // per)
        if len(bounds) > fewest:
            return Check(name, False, f"{where}, {len(bounds)} buckets where {fewest} suffice: "
                                      f"fill each one up to {per} elements (one message each)")
    return Check(name, True, f"contiguous buckets, each at most bucket_bytes, covering every "
                             f"element once, for {len(cases)} cases")


def _row_parallel_problem(rng, t):
    """X (n, d_in), W (d_in, d_out), ∂Y (n, d_out) with d_in = t·(1 or 2) rows and d_out ≥ 3."""
    n, d_out, d_in = int(rng.integers(3, 9)), int(rng.integers(3, 6)), t * int(rng.integers(1, 3))
    return rng.normal(size=(n, d_in)), rng.normal(size=(d_in, d_out)), rng.normal(size=(n, d_out))


def check_row_parallel_backward(fn, world_sizes=(2, 3, 4, 2), seed=0):
    """fn(X_k, W_k, dY) -> (dW_k, db, dX_k): RowParallelLinear's backward on rank k, whose
    forward was Y = all_reduce(X_k W_k) + b, with X_k its columns of X and W_k its rows of W.
    The reference is the whole layer's gradient (Xᵀ∂Y, Σ_n ∂Y, ∂Y Wᵀ), cut the same way."""
    name = "check_row_parallel_backward"
    rng = np.random.default_rng(seed)
    for t in world_sizes:
        X, W, dY = _row_parallel_problem(rng, t)
        for k in range(t):
            rows = slice(k * W.shape[0] // t, (k + 1) * W.shape[0] // t)
            want = (X.T @ dY)[rows], dY.sum(axis=0), (dY @ W.T)[:, rows]
            try:
                got = [np.asarray(g, dtype=np.float64) for g in fn(X[:, rows].copy(),
                                                                    W[rows].copy(), dY.copy())]
            except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
                return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
            if len(got) != 3:
                return Check(name, False, "return three arrays: (dW_k, db, dX_k)")
            where = f"with t = {t} ranks, rank {k}, X_k {X[:, rows].shape}, W_k {W[rows].shape}"
            for label, g, w in zip(("dW_k", "db", "dX_k"), got, want, strict=True):
                if g.shape != w.shape:
                    hint = (" ∂X_k is only this rank's columns: ∂Y W_kᵀ" if label == "dX_k"
                            else " check which factor is transposed")
                    return Check(name, False, f"{where}, {label} should have shape {w.shape}, "
                                              f"got {g.shape}.{hint}")
                if np.allclose(g, w, rtol=1e-10, atol=1e-12):
                    continue
                if label == "db" and np.allclose(g * t, w):
                    return Check(name, False, f"{where}, db is 1/t of the answer: every rank "
                                              "adds the whole bias once, after the all-reduce, "
                                              "so its gradient is the whole Σ_n ∂Y")
                if label == "dX_k" and np.allclose(g, t * w):
                    return Check(name, False, f"{where}, dX_k is t times too large: g's "
                                              "backward is the identity, no all-reduce")
                return Check(name, False, f"{where}, {label} is wrong (largest error "
                                          f"{np.max(np.abs(g - w)):.3g})")
    return Check(name, True, f"dW_k = X_kᵀ∂Y, db = Σ_n ∂Y, dX_k = ∂Y W_kᵀ on every rank, for "
                             f"t = {', '.join(map(str, world_sizes))}")


def check_bubble_fraction(fn, cases=((2, 1), (2, 4), (4, 1), (4, 4), (4, 16), (8, 8), (3, 5),
                                     (1, 4))):
    """fn(p, m) -> the share of a step that a stage spends idle with p equal stages and m
    micro-batches (GPipe or 1F1B). The reference is measured from an ideal timeline
    (minidist.parallel.pipeline.simulate), not from the formula."""
    from minidist.parallel.pipeline import simulate
    from minidist.trace import bubble_fraction

    name = "check_bubble_fraction"
    for p, m in cases:
        want = float(bubble_fraction(simulate("gpipe", p, m))[0])
        try:
            got = float(fn(p, m))
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
        if abs(got - want) < 1e-9:
            continue
        where = f"with p = {p} stages and m = {m} micro-batches"
        if m and abs(got - (p - 1) / m) < 1e-9:
            return Check(name, False, f"{where}: (p−1)/m is idle time over *useful* time; the "
                                      "question asks for idle time over the *total*")
        return Check(name, False, f"{where}, the ideal timeline is idle {want:.4f} of the time, "
                                  f"you said {got:.4f}. Count the slots: how long is a step, in "
                                  "units of one micro-batch's forward + backward?")
    return Check(name, True, f"matches the measured ideal timeline for {len(cases)} (p, m)")


def check_tensor_parallel_params(fn, cases=((8, 16, 4, 2), (64, 128, 10, 4), (5, 6, 3, 3),
                                            (4, 8, 4, 1), (10, 40, 7, 8))):
    """fn(d_in, hidden, d_out, t) -> how many parameters one rank stores of the tensor-parallel
    block Linear(d_in→hidden), ReLU, Linear(hidden→d_out). The reference builds the block's
    shard for every rank (minidist.parallel.shard.ModelShard) and counts."""
    from types import SimpleNamespace

    from minidist.nn import mlp
    from minidist.parallel.shard import ModelShard

    name = "check_tensor_parallel_params"
    for d_in, hidden, d_out, t in cases:
        model = mlp([d_in, hidden, d_out])
        sizes = {ModelShard(model, tp_comm=SimpleNamespace(rank=k, world_size=t)).params.size
                 for k in range(t)}
        (want,) = sizes
        try:
            got = int(fn(d_in, hidden, d_out, t))
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
        if got == want:
            continue
        where = f"for d_in={d_in}, hidden={hidden}, d_out={d_out} on t={t} ranks"
        if got == want - d_out + d_out // max(t, 1) or got * t == model.num_params:
            return Check(name, False, f"{where}, you split the second layer's bias too: it is "
                                      "added after the all-reduce, so every rank keeps it whole")
        if got == (d_in * hidden + hidden * d_out) // t:
            return Check(name, False, f"{where}, the biases are missing")
        return Check(name, False, f"{where}, a rank stores {want} parameters, you said {got}")
    return Check(name, True, f"parameters per rank for {len(cases)} blocks")


# ---- lesson 6: the parameter server ------------------------------------------------------------
def check_ssp_rule(fn, bounds=(0, 1, 2, 5)):
    """fn(clock, slowest_clock, staleness) should say whether a worker at `clock` may pull now
    under SSP: True exactly when clock − slowest_clock ≤ staleness (Ho et al. 2013)."""
    from minidist.ps.consistency import may_serve_pull

    name = "check_ssp_rule"
    for s in bounds:
        for slowest in (0, 3):
            for clock in range(slowest, slowest + s + 3):
                want = may_serve_pull("ssp", clock, 0, slowest, s)
                try:
                    got = fn(clock, slowest, s)
                except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
                    return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
                if not isinstance(got, (bool, np.bool_)):
                    return Check(name, False, f"return True or False, got {got!r}")
                if got == want:
                    continue
                where = (f"a worker at clock {clock} with the slowest at {slowest} and s = {s} "
                         f"(it is {clock - slowest} clocks ahead)")
                if want:
                    hint = ("being exactly s clocks ahead is allowed: the bound is ≤ s, not < s"
                            if clock - slowest == s else "it is within the bound")
                    return Check(name, False, f"{where} may pull: {hint}")
                return Check(name, False, f"{where} must wait: more than s = {s} ahead. "
                                          "Compare clock − slowest_clock with s")
    return Check(name, True, f"allowed exactly when clock − slowest ≤ s, for s in {bounds}")


def check_server_traffic(fn, cases=((1000, 8, 4, 1), (1000, 8, 4, 3), (10, 4, 2, 2),
                                    (999, 4, 8, 4), (7, 8, 3, 7))):
    """fn(n_params, itemsize, workers, num_servers) should return the bytes the busiest server
    sends plus receives per BSP step: every worker pushes its slice of the gradient to each
    server and pulls the slice of the parameters back. Shards are cut as
    minidist.data.shard_bounds cuts them (the first n mod k servers hold one parameter more)."""
    from minidist.data import shard_bounds

    name = "check_server_traffic"
    for n, itemsize, workers, k in cases:
        largest = max(hi - lo for lo, hi in (shard_bounds(n, j, k) for j in range(k)))
        want = 2 * workers * largest * itemsize
        try:
            got = fn(n, itemsize, workers, k)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
        where = f"with n = {n} parameters of {itemsize} B, {workers} workers, {k} servers"
        if np.isclose(got, want):
            continue
        mistakes = [
            (workers * largest * itemsize, "you counted one direction only: each worker "
             "pushes a gradient slice AND pulls a parameter slice"),
            (2 * workers * n * itemsize, "every server holds only its shard: divide the "
             "parameters among the servers"),
            (2 * workers * largest, "count bytes: multiply the elements by itemsize"),
            (2 * workers * (n // k) * itemsize, "the busiest server holds ⌈n/k⌉ parameters, "
             "not ⌊n/k⌋: the first n mod k shards get one more"),
            (2 * workers * n / k * itemsize, "shards hold whole parameters: the busiest holds "
             "⌈n/k⌉ of them, not n/k"),
            (2 * largest * itemsize, "all the workers talk to every server: multiply by W"),
        ]
        for wrong, hint in mistakes:
            if np.isclose(got, wrong):
                return Check(name, False, f"{where}: {hint}")
        return Check(name, False, f"{where}: expected {want} bytes, got {got}")
    return Check(name, True, f"bytes through the busiest server for {len(cases)} layouts")


def check_sgd_kernel(kernel, seed=0):
    """kernel[blocks, threads](params, grads, lr) should do θᵢ ← θᵢ − η gᵢ for every i exactly
    once, whatever the grid: a grid-stride loop i = cuda.grid(1), + cuda.gridsize(1), …

    Needs a GPU or the CUDA simulator (minidist.kernels.setup_cuda() before numba is imported).
    """
    from numba import cuda

    name = "check_sgd_kernel"
    rng = np.random.default_rng(seed)
    # (n, blocks, threads): exact fit, spare threads, a single element, fewer threads than n
    for n, blocks, threads in ((64, 2, 32), (50, 2, 32), (1, 1, 8), (100, 2, 16)):
        params, grads, lr = rng.normal(size=n), rng.normal(size=n), 0.1
        device_params = cuda.to_device(params)
        launch = f"kernel[{blocks}, {threads}] on {n} elements"
        try:
            kernel[blocks, threads](device_params, cuda.to_device(grads), lr)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            hint = (" A thread read or wrote past the end: skip i ≥ params.shape[0] (the grid "
                    "has more threads than elements)." if isinstance(exc, IndexError) else "")
            return Check(name, False, f"{launch} raised {type(exc).__name__}: {exc}.{hint}")
        got = device_params.copy_to_host()
        wrong = np.flatnonzero(~np.isclose(got, params - lr * grads, rtol=1e-12, atol=1e-12))
        if not len(wrong):
            continue
        steps = (params[wrong] - got[wrong]) / (lr * grads[wrong])  # how many η·g were taken
        first = wrong[0]
        if np.allclose(got, params):
            return Check(name, False, f"{launch}: params did not change. Write into params "
                                      "in place (params[i] -= ...), do not rebind it.")
        if np.allclose(steps, 0.0):
            return Check(name, False, f"{launch}: elements {first}… were not updated: "
                         f"{blocks} × {threads} = {blocks * threads} threads must cover {n} "
                         "elements, so each thread loops: i, i + cuda.gridsize(1), …")
        if np.allclose(steps, -1.0):
            return Check(name, False, f"{launch}: θ moved uphill; the update subtracts η·g.")
        if np.allclose(steps, 1.0 / lr):
            return Check(name, False, f"{launch}: the learning rate is missing: θ − η·g.")
        if np.all(steps > 1.5):
            return Check(name, False, f"{launch}: elements {first}… were updated "
                         f"{steps[0]:.0f} times: the stride is the whole grid, "
                         "cuda.gridsize(1), not the block size.")
        return Check(name, False, f"{launch}: element {first} should be "
                                  f"{params[first] - lr * grads[first]:.6f}, got {got[first]:.6f}")
    return Check(name, True, "every element is updated once, for every grid: a correct "
                             "elementwise kernel")


def check_matmul_traffic(fn):
    """fn(M, N, K, BM, BN) should return (reads of A, reads of B): how many elements a tiled
    matmul C = AB loads from global memory with BM × BN blocks: M·K·⌈N/BN⌉ and K·N·⌈M/BM⌉."""
    name = "check_matmul_traffic"
    cases = ((64, 64, 64, 16, 16), (17, 5, 33, 8, 8), (128, 256, 512, 128, 64), (1, 1, 1, 16, 16),
             (100, 30, 7, 32, 16))
    for M, N, K, BM, BN in cases:
        want = (M * K * -(-N // BN), K * N * -(-M // BM))
        try:
            got = tuple(int(v) for v in fn(M, N, K, BM, BN))
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
        if got == want:
            continue
        case = f"M={M}, N={N}, K={K}, BM={BM}, BN={BN}"
        hints = [
            ((M * N * K, M * N * K), "that is the naive kernel: every output reads a row of A "
             "and a column of B. A tile of A is loaded once per block and reused by BN outputs"),
            ((M * K * (N // BN), K * N * (M // BM)), "the partial tiles at the edges load "
             "too: count ⌈N/BN⌉ block columns, not ⌊N/BN⌋"),
            ((M * K * -(-M // BM), K * N * -(-N // BN)), "A is re-read by every block column "
             "(⌈N/BN⌉ of them), B by every block row (⌈M/BM⌉)"),
        ]
        hint = next((h for wrong, h in hints if got == wrong), "count, for one element of A, "
                    "how many blocks load it")
        return Check(name, False, f"{case}: expected (A, B) reads {want}, got {got}: {hint}.")
    return Check(name, True, "A is read ⌈N/BN⌉ times and B ⌈M/BM⌉ times: bigger tiles, less "
                             "traffic per multiply-add")


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
        try:
            with np.errstate(all="ignore"):
                got = np.asarray(fn(v.copy(), s, u.copy()), dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
            return Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
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


def _number(name, fn, *args):
    """(value, None) or (None, a failing Check) for a learner function that returns a number."""
    try:
        return float(fn(*args)), None
    except Exception as exc:  # noqa: BLE001 - any error in learner code is reported
        return None, Check(name, False, f"your function raised {type(exc).__name__}: {exc}")


def check_model_states(fn, cases=((1e9, 1, 1, 1), (7.5e9, 64, 1, 1), (175e9, 8, 8, 12),
                                  (8.3e9, 1, 8, 1), (1.3e9, 4, 2, 4), (6.7e9, 2, 1, 8))):
    """fn(n_params, dp, tp, pp) should return the bytes of model states one device holds with
    mixed-precision Adam on a dp × tp × pp grid: (2 + 2 + 12)·Ψ / (tp·pp) (ZeRO's count;
    replicas hold copies, so dp does not divide)."""
    name = "check_model_states"
    for psi, dp, tp, pp in cases:
        want = 16 * psi / (tp * pp)
        got, failed = _number(name, fn, psi, dp, tp, pp)
        if failed is not None:
            return failed
        if np.isclose(got, want, rtol=1e-9):
            continue
        case = f"Ψ = {psi:.3g}, dp×tp×pp = {dp}×{tp}×{pp}"
        hints = [
            (want / dp, "data parallelism replicates: each of the dp replicas holds its whole "
             "share, so dp does not divide the memory (that is what ZeRO changes)"),
            (16 * psi / tp, "a pipeline stage holds only its layers: divide by pp too"),
            (16 * psi / pp, "tensor parallelism splits every matrix: divide by tp too"),
            (16 * psi, "tensor and pipeline parallelism split the model: divide by tp·pp"),
            (4 * psi / (tp * pp), "add the optimizer: mixed-precision Adam keeps an fp32 copy "
             "of θ, m and v, 12 bytes per parameter on top of 2 + 2"),
            (2 * psi / (tp * pp), "count the gradients and the optimizer state, not only the "
             "fp16 parameters: 2 + 2 + 12 = 16 bytes per parameter"),
            (12 * psi / (tp * pp), "the optimizer's 12 bytes are not all: add 2 bytes of fp16 "
             "parameters and 2 of fp16 gradients"),
        ]
        hint = next((h for wrong, h in hints if np.isclose(got, wrong, rtol=1e-9)),
                    f"expected {want:.4g} bytes, got {got:.4g}")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"model states per device on {len(cases)} grids, 1 to 768 ways")


def check_pipeline_compute(fn, cases=((1e9, 1e6, 8, 1e14, 1, 1), (1e9, 1e6, 8, 1e14, 8, 32),
                                      (175e9, 3.1e6, 1024, 1.5e14, 16, 64),
                                      (6.7e9, 1e6, 64, 1e14, 4, 4), (1e8, 5e5, 2, 1e13, 2, 1))):
    """fn(n_params, tokens, devices, flops, pp, m) should return a step's compute seconds on
    one device with the pipeline bubble: 6ΨT / (devices · flops) · (1 + (pp − 1)/m)."""
    name = "check_pipeline_compute"
    for psi, tokens, devices, flops, pp, m in cases:
        ideal = 6 * psi * tokens / (devices * flops)
        want = ideal * (1 + (pp - 1) / m)
        got, failed = _number(name, fn, psi, tokens, devices, flops, pp, m)
        if failed is not None:
            return failed
        if np.isclose(got, want, rtol=1e-9):
            continue
        case = f"Ψ = {psi:.3g}, T = {tokens:.3g}, {devices} devices, pp = {pp}, m = {m}"
        hints = [
            (want / 3, "2Ψ FLOPs per token is the forward pass only; the backward pass costs "
             "twice the forward, 6Ψ per token in all"),
            (ideal, "add the bubble: with pp stages and m micro-batches every device idles "
             "(pp − 1)/m of the ideal time"),
            (ideal * (1 + (pp - 1) / (m + pp - 1)), "(pp − 1)/(m + pp − 1) is the bubble's "
             "share of the whole step; relative to the ideal time it is (pp − 1)/m"),
            (want * devices, "the work 6ΨT is shared by all devices: divide by devices · flops"),
        ]
        hint = next((h for wrong, h in hints if np.isclose(got, wrong, rtol=1e-9)),
                    f"expected {want:.4g} s, got {got:.4g} s")
        return Check(name, False, f"{case}: {hint}")
    return Check(name, True, f"compute time with the bubble on {len(cases)} layouts")
