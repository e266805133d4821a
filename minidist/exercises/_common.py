"""What every checker shares: the Check result and calling the learner's function safely."""

import numpy as np


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


def _call(name, fn, *args, convert=lambda result: np.asarray(result, dtype=np.float64)):
    """(convert(fn(*args)), None), or (None, a failed Check) if the learner's function raised,
    or what it returned could not be converted (each said as such)."""
    try:
        result = fn(*args)
    except SystemExit as exc:
        return None, Check(name, False, _exited(exc))
    except Exception as exc:  # noqa: BLE001 - any error in learner code is reported, not raised
        return None, Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
    try:
        return convert(result), None
    except Exception as exc:  # noqa: BLE001 - a result of the wrong kind is reported too
        return None, Check(name, False, f"your function returned {_brief(result)}, which is not "
                                        f"what the exercise asks for ({type(exc).__name__}: "
                                        f"{exc})")


def _brief(value, limit=80):
    """repr(value), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _exited(exc):
    """What a learner's sys.exit inside a check is told: it would end the notebook's kernel or
    the grader, so it is reported like an error."""
    return f"your code called sys.exit({exc.code!r}): return a value instead"


def _check_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")


def _guarded(run, timeout):
    """(run(), None), or (None, why it failed): a hang, a rank that raised, or any error in
    the learner's code (reported, never raised)."""
    from minidist.errors import CommTimeout, WorkerError

    try:
        return run(), None
    except SystemExit as exc:
        return None, _exited(exc)
    except CommTimeout as exc:
        return None, f"the ranks hung (ended after {timeout} s): {exc}"
    except WorkerError as exc:
        return None, f"a rank raised {exc.exc_type}: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - learner code: report, never raise
        return None, f"{type(exc).__name__}: {exc}"


def _train(model_fn, X, y, timeout, **options):
    """(History, None) or (None, why the run failed): train on thread ranks."""
    from minidist import train

    return _guarded(lambda: train(model_fn, X, y, backend="thread", timeout=timeout,
                                  **options), timeout)


def _differs(hist, single, label="single"):
    """None if hist is single's training (1e-10), else where it first left it; label names
    the reference run in the message."""
    loss = np.abs(np.asarray(hist.loss) - single.loss)
    if np.all(loss <= 1e-10 * np.abs(single.loss)) and np.allclose(
            hist.params, single.params, rtol=0, atol=1e-10):
        return None
    bad = np.flatnonzero(loss > 1e-10 * np.abs(single.loss))
    if len(bad):
        return f"the run's loss differs from {label} at step {bad[0]} by {loss[bad[0]]:.3g}"
    return (f"the run's parameters differ from {label}'s by up to "
            f"{np.abs(hist.params - single.params).max():.3g}")


class Exercise:
    """One exercise of a lesson, as the catalog lists it and `python -m minidist check` grades it.

    name: what the learner defines (a function, or a class), named as in the lesson's stub cell;
    checker: the check_… function that judges it; solution: the reference answer's name in
    `minidist.exercises.solutions.<the lesson's module>`; builds: one line, what the learner
    builds; kind: "build" (a piece that runs inside minidist, on real ranks, judged by what it
    does) or "formula" (a number worked out by hand; at most one per lesson)."""

    KINDS = ("build", "formula")

    def __init__(self, lesson, name, checker, solution, builds, kind="build"):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.lesson, self.name, self.checker = lesson, name, checker
        self.solution, self.builds, self.kind = solution, builds, kind

    def __repr__(self):
        return f"Exercise(lesson {self.lesson}, {self.name}, {self.kind})"
