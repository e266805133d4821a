"""Lesson 7 (model parallelism): RowParallelLinear's backward, the bubble, tensor-parallel sizes."""

import numpy as np

from minidist.exercises._common import Check, _call


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
            got, failed = _call(name, fn, X[:, rows].copy(), W[rows].copy(), dY.copy(),
                                convert=lambda grads: [np.asarray(g, np.float64) for g in grads])
            if failed is not None:
                return failed
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
        got, failed = _call(name, fn, p, m, convert=float)
        if failed is not None:
            return failed
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
        got, failed = _call(name, fn, d_in, hidden, d_out, t, convert=int)
        if failed is not None:
            return failed
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
