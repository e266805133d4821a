"""Lesson 1 (gradient descent): the descent step on the flat buffer, and the server's combine
of the workers' gradients.

Both run INSIDE minidist: the step becomes the update of minidist's SGD in `train` (one process,
and distributed GD's server), the combine becomes distributed GD's server combine on thread ranks
with parts of unequal sizes; each run must equal training with the library's own piece (float64,
1e-10). A combine that is, or calls, the library's own is refused.
"""

import contextlib
import functools
import sys

import numpy as np

from minidist.exercises._common import (
    Check,
    Exercise,
    _call,
    _check_timeout,
    _differs,
    _regression_problem,
    _train,
)
from minidist.gradcheck import relative_error

RUN = {"steps": 4, "batch_size": 10, "lr": 0.1}  # 10 rows: parts 4, 3, 3 or 3, 3, 2, 2
COMBINE_WORKERS = (3, 4)


def _problem():
    """A regression problem of 40 rows and 3 features, and its model."""
    from minidist import data, nn

    X, y, _ = data.make_regression(n=40, d=3, noise=0.1, seed=0)
    return functools.partial(nn.linear_regression, 3, seed=0), X, y


# ----- exercise 2: the descent step, in place on the flat buffer -------------------------------

@contextlib.contextmanager
def descent_step(fn):
    """Inside: minidist's SGD (no momentum) updates θ with fn(params, grads, lr), which must
    write θ − η·grads into `params` in place (thread ranks share the class); restored after."""
    from minidist import optim

    saved = optim.SGD._update

    def update(self, grads, lr):
        if self.momentum or self.weight_decay:
            return saved(self, grads, lr)
        fn(self.params, grads, lr)

    optim.SGD._update = update
    try:
        yield
    finally:
        optim.SGD._update = saved


def _step_problem(fn, name):
    """The learner's step on numbers: a message, or None."""
    rng = np.random.default_rng(0)
    theta, grads, lr = rng.normal(size=6), rng.normal(size=6), 0.3
    params, given = theta.copy(), grads.copy()
    from minidist import optim

    (returned, failed), called = _calling(name, fn, (params, given, lr), optim.SGD._update,
                                          convert=lambda r: r)
    if called:
        return STEP
    if failed is not None:
        return failed.message
    if not np.array_equal(given, grads):
        i = int(np.argmax(given != grads))
        return (f"your step changed grads: grads[{i}] was {grads[i]:.6g} and became "
                f"{given[i]:.6g}. The gradient is the model's (model.grads), not the step's to "
                f"keep: subtract lr * grads, a new array, from params (params -= lr * grads)")
    want = theta - lr * grads
    if np.allclose(params, want, rtol=1e-12, atol=1e-14):
        return None
    if np.array_equal(params, theta):
        made = returned is not None and np.shape(returned) == theta.shape and np.allclose(
            np.asarray(returned, dtype=np.float64), want)
        return ("params did not change" + (": your function made θ − η·grads as a NEW array"
                                           if made else "") +
                ". The model's layers look at views of its one flat buffer, and the optimizer "
                "passes you that buffer: write the step into it (params -= …, or params[...] = "
                "…); a new array, or params = …, leaves the model where it was")
    for wrong, hint in [(theta + lr * grads, "you stepped uphill: descent subtracts η·grads"),
                        (theta - grads, "the learning rate is missing: θ ← θ − η·grads")]:
        if np.allclose(params, wrong, rtol=1e-12, atol=1e-14):
            return hint
    i = int(np.argmax(np.abs(params - want)))
    return (f"with lr = {lr}, params[{i}] became {params[i]:.6g}; θ − η·grads there is "
            f"{want[i]:.6g}")


def check_sgd_step(fn, timeout=30.0):
    """fn(params, grads, lr) writes one gradient-descent step θ ← θ − η·∇L into `params`, the
    model's flat buffer, in place (what it returns is not used). Checked on numbers, then made
    the update of minidist's SGD in train(): one process and distributed GD on 3 thread ranks
    must train as with the library's SGD (1e-10)."""
    name = "check_sgd_step"
    _check_timeout(timeout)
    problem = _step_problem(fn, name)
    if problem:
        return Check(name, False, problem)
    model_fn, X, y = _problem()
    for strategy, workers in (("single", 1), ("distributed_gd", 3)):
        reference, failure = _train(model_fn, X, y, timeout, strategy=strategy, workers=workers,
                                    **RUN)
        if failure is None:
            with descent_step(fn):
                hist, failure = _train(model_fn, X, y, timeout, strategy=strategy,
                                       workers=workers, **RUN)
            failure = failure or _differs(hist, reference)
            if failure and "RecursionError" in failure:
                failure = STEP
        if failure:
            return Check(name, False, f"train(strategy={strategy!r}) with your step: {failure}")
    return Check(name, True, "your step moves the flat buffer, and train() with it equals the "
                             "library's SGD (one process, and distributed GD on 3 ranks)")


# ----- exercise 3: the server's combine --------------------------------------------------------

@contextlib.contextmanager
def server_combine(fn):
    """Inside: distributed GD's server combines the workers' mean gradients with
    fn(grads, sizes) (on thread ranks, which share the module); restored after."""
    from minidist.parallel import distributed_gd

    saved = distributed_gd.combine
    distributed_gd.combine = fn
    try:
        yield
    finally:
        distributed_gd.combine = saved


def _calling(name, fn, args, library, convert=lambda r: np.asarray(r, dtype=np.float64)):
    """(what _call gives, whether fn ran `library`'s code, under any name): a profiler on this
    thread sees every Python call, so a name bound by `from … import` counts too. Restored
    after."""
    called = []

    def spy(frame, event, arg):
        if event == "call" and frame.f_code is library.__code__:
            called.append(True)

    saved = sys.getprofile()
    sys.setprofile(spy)
    try:
        result = _call(name, fn, *args, convert=convert)
    finally:
        sys.setprofile(saved)
    return result, bool(called)


def _library(what, how):
    return (f"your function calls the library's {what}, the piece this exercise asks you to "
            f"write: {how} yourself")


COMBINE = _library("combine (minidist.parallel.distributed_gd.combine)",
                   "write the weighted sum Σ_k (|B_k|/|B|) ∇L_k")
STEP = _library("SGD (minidist.optim.SGD)", "write θ − η·grads into params")


def _combine_problem(fn, trials=5, seed=0):
    """The learner's combine on random uneven splits, against the full-batch gradient."""
    from minidist.parallel import distributed_gd

    library = distributed_gd.combine
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        theta, X, y = _regression_problem(rng, n=int(rng.integers(7, 40)))
        cuts = np.sort(rng.choice(np.arange(1, len(y)), size=int(rng.integers(1, 4)),
                                  replace=False))
        parts = np.split(np.arange(len(y)), cuts)
        grads = [X[p].T @ (X[p] @ theta - y[p]) / len(p) for p in parts]
        sizes = [len(p) for p in parts]
        (got, failed), called = _calling("check_combine", fn,
                                         ([g.copy() for g in grads], list(sizes)), library)
        if called:
            return COMBINE
        if failed is not None:
            return failed.message
        want = X.T @ (X @ theta - y) / len(y)
        if got.shape != want.shape:
            return f"return one gradient of shape {want.shape}, got {got.shape}"
        if relative_error(got, want) < 1e-10:
            continue
        if relative_error(got, np.mean(grads, axis=0)) < 1e-10:
            return (f"a plain mean is right only for equal parts; these have sizes {sizes}: "
                    f"weight each by its share of the batch")
        if relative_error(got, np.sum(grads, axis=0)) < 1e-10:
            return (f"you added the mean gradients; weight each by its share |B_k|/|B| of the "
                    f"batch (sizes {sizes}: the weights must sum to 1)")
        return (f"with parts of sizes {sizes}, your gradient differs from the full-batch "
                f"gradient (relative error {relative_error(got, want):.2e})")
    return None


def check_combine(fn, workers=COMBINE_WORKERS, timeout=30.0):
    """fn(grads, sizes) should combine per-worker mean gradients into the global-batch gradient:
    ∇L = Σ_k (|B_k| / |B|) ∇L_k. Checked on random uneven splits, then made the server's
    combine of train(strategy="distributed_gd") on each number of thread ranks in `workers`
    (batches of 10 rows: uneven parts), which must equal one process (1e-10)."""
    name = "check_combine"
    try:
        counts = list(workers)
    except TypeError:
        counts = None
    if not counts or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 10
                         for p in counts):
        raise ValueError(f"workers must be a non-empty list of rank counts in 1 … 10 (the "
                         f"batch has 10 rows), got {workers!r}")
    _check_timeout(timeout)
    problem = _combine_problem(fn)
    if problem:
        return Check(name, False, problem)
    from minidist import data, train

    model_fn, X, y = _problem()
    single = train(model_fn, X, y, **RUN)
    for p in counts:
        with server_combine(fn):
            hist, failure = _train(model_fn, X, y, timeout, strategy="distributed_gd",
                                   workers=p, **RUN)
        failure = failure or _differs(hist, single)
        if failure and "RecursionError" in failure:
            failure = COMBINE
        if failure:
            parts = [len(data.shard(RUN["batch_size"], k, p)) for k in range(p)]
            return Check(name, False, f"distributed GD on {p} ranks (parts of {parts} rows) "
                                      f"with your combine: {failure}")
    return Check(name, True, f"your combine gives the full-batch gradient, and distributed GD "
                             f"with it trains as one process on "
                             f"{', '.join(map(str, counts))} ranks (uneven parts)")


__all__ = ["check_sgd_step", "check_combine"]

EXERCISES = (
    Exercise(1, "my_sgd_step", check_sgd_step, "sgd_step",
             "the in-place descent step on the flat buffer, run as minidist's SGD in train() "
             "(one process and distributed GD on 3 ranks)"),
    Exercise(1, "my_combine", check_combine, "combine",
             "the server's size-weighted combine, run inside distributed GD on 3 and 4 ranks "
             "with uneven parts"),
)
