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
    """(convert(fn(*args)), None), or (None, a failed Check) if the learner's function (or the
    conversion of what it returned) raised."""
    try:
        return convert(fn(*args)), None
    except Exception as exc:  # noqa: BLE001 - any error in learner code is reported, not raised
        return None, Check(name, False, f"your function raised {type(exc).__name__}: {exc}")
