"""Lesson 6 (parameter server): the SSP pull rule, driving real servers; and the traffic through
the busiest server (a formula).

check_ssp_rule makes the learner's may_pull(clock, slowest_clock, staleness) THE rule by which
ps.run's server processes answer pulls under consistency="ssp" (`ssp_rule`: shipped to them
by value, so it works under every start method, wherever the learner's function was defined).
Every time a server asks the rule, it writes the question and the answer to a log. Then:

1. a held-back worker: worker 1 does nothing until the server has kept worker 0 waiting (the
   rule said no) or worker 0 has finished; so, deterministically, worker 0 runs ahead of a
   slowest worker at clock 0 and must get exactly s clocks ahead, then wait;
2. SSP(0) training: 2 workers train an MLP, each pushing clock c only once both have pulled
   it; if the rule holds clock c + 1's pulls until both pushes are in, that is synchronous
   SGD, and it must equal one process (1e-10).

Each answer the servers got is judged against SSP: a pull is allowed iff c − c_min ≤ s. No
timing is involved: a worker waits for an event in the log, never for a while.
"""

import contextlib
import functools
import numbers
import os
import sys
import tempfile
import time

import numpy as np

from minidist.exercises._common import Check, Exercise, _call, _check_timeout, _differs, _guarded

MLP_SIZES = [6, 8, 3]
RUN = {"steps": 4, "batch_size": 12, "lr": 0.1}  # plain SGD: g_0 then g_1 is a step with Σ g_k


@contextlib.contextmanager
def ssp_rule(fn, log=None):
    """Inside: every ps.run started here (train(strategy="parameter_server") too) answers SSP
    pulls with fn(clock, slowest_clock, staleness), each question and answer written to the
    file `log` if one is given. fn's module is pickled by value for the run (cloudpickle), so
    that servers started by spawn or forkserver get fn itself even where its module cannot be
    imported (a notebook, a graded submission). Restored after."""
    import cloudpickle

    from minidist.ps import consistency

    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    by_value = (module is not None and module.__name__ != "__main__"
                and module.__name__ not in cloudpickle.list_registry_pickle_by_value())
    original = consistency.ssp_may_pull
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    consistency.ssp_may_pull = fn if log is None else _Logged(fn, log)
    try:
        yield
    finally:
        consistency.ssp_may_pull = original
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


class _Logged:
    """The rule as the server calls it, writing "clock slowest staleness answer" (or
    "raised ...") to the log file for every question."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __call__(self, clock, slowest, staleness):
        try:
            answer = self.fn(clock, slowest, staleness)
        except Exception as exc:
            _write(self.log, f"raised {clock} {slowest} {staleness} {type(exc).__name__}: {exc}")
            raise
        _write(self.log, f"rule {clock} {slowest} {staleness} {bool(answer)}")
        return answer


def _write(log, line):
    with open(log, "a", encoding="utf-8") as f:  # one short append: whole lines
        f.write(line.replace("\n", " ") + "\n")


def _read(log):
    """[(kind, the rest of the line)] of the log's whole lines."""
    with open(log, encoding="utf-8") as f:
        return [tuple([*line.split(" ", 1), ""][:2]) for line in f.read().splitlines()]


def _wait_for(log, condition, timeout, what):
    """Return once condition(the log's lines) holds; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition(_read(log)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.002)  # polls for an event in the log; what happens never depends on it


def _held_back(client, log, steps, timeout):
    """Worker 0 pulls and pushes `steps` times as fast as the rule lets it; worker 1 first waits
    until the log shows the server kept worker 0 waiting, or worker 0 finished."""
    if client.rank == 1:
        _wait_for(log, lambda lines: any(kind in ("done", "raised") or rest.endswith("False")
                                         for kind, rest in lines),
                  timeout, "worker 0 to wait or finish")
    for _ in range(steps):
        client.pull()
        client.push(np.zeros(client.n))
    if client.rank == 0:
        _write(log, "done")


def _questions(log):
    """[(clock, slowest, staleness, answer)] the servers asked, and the first error raised."""
    asked, raised = [], None
    for kind, rest in _read(log):
        if kind == "rule":
            c, low, s, answer = rest.split()
            asked.append((int(c), int(low), int(s), answer == "True"))
        elif kind == "raised" and raised is None:
            c, low, s, why = rest.split(" ", 3)
            raised = (f"your rule raised {why} when the server asked about a worker at clock "
                      f"{c} with the slowest at {low}, staleness {s}")
    return asked, raised


def _judged(asked, pulls, s):
    """The first answer the servers got that SSP would not give, named; None if all are right."""
    for w, clock, low, _ in pulls:
        if clock - low > s:
            return (f"worker {w} pulled at clock {clock} while the slowest was at {low}, "
                    f"staleness {s}: a worker may run at most s = {s} clocks ahead")
    for clock, low, staleness, answer in asked:
        if not answer and clock - low <= staleness:
            who = next((f"worker {w}" for w, c, lo, _ in pulls if c == clock and lo > low),
                       "a worker")  # the first pull at that clock answered later: that one
            ahead = clock - low
            hint = "the bound is ≤ s, not < s" if ahead == staleness else "it is within it"
            return (f"{who} was kept waiting at clock {clock} while the slowest was at {low}, "
                    f"staleness {staleness}: {ahead} clock{'s' * (ahead != 1)} ahead may pull "
                    f"({hint})")
    return None


def _table(fn, bounds, slowests):
    """None, or the first problem on fn's own: an error, an answer that is not True or False,
    or the slowest worker itself kept waiting (which would hang every run)."""
    for s in bounds:
        for slowest in slowests:
            for clock in range(slowest, slowest + s + 3):
                got, failed = _call("", fn, clock, slowest, s, convert=lambda answer: answer)
                where = (f"a worker at clock {clock} with the slowest at {slowest} and "
                         f"staleness {s}")
                if failed is not None:
                    return f"for {where}, {failed.message}"
                if not isinstance(got, (bool, np.bool_)):
                    return f"for {where}, return True or False, got {got!r}"
                if clock == slowest and not got:
                    return (f"your rule says {where} must wait: it IS the slowest, 0 clocks "
                            "ahead (the bound is ≤ s, not < s); if the slowest may not pull, "
                            "nobody ever moves and the server hangs")
    return None


def _held_run(fn, s, log, timeout, start_method):
    """Scenario 1 with staleness s on ps.run: None, or the first thing that went wrong."""
    from minidist import ps

    open(log, "w").close()
    with ssp_rule(fn, log):
        result, failure = _guarded(lambda: ps.run(
            _held_back, 2, np.zeros(4), consistency="ssp", staleness=s, timeout=timeout,
            start_method=start_method, args=(log, s + 2, timeout)), timeout)
    asked, raised = _questions(log)
    failure = raised or failure or _judged(asked, result.pulls[0], s)
    ahead = [] if failure else [c for w, c, low, _ in result.pulls[0] if w == 0 and low == 0]
    if not failure and max(ahead) != s:
        failure = (f"worker 0 got to clock {max(ahead)} while worker 1 was held at 0; it "
                   f"should get exactly s = {s} ahead, then wait")
    return failure


def _lockstep(client, model_fn, X, y, log, timeout):
    """Lesson 6's article loop, where each worker pushes clock c only once every worker has
    pulled clock c (the log says so). Then all of clock c's gradients are taken at the same θ,
    and if the rule holds pulls back as SSP(0) must, that θ has all of clock c − 1's updates:
    one process's SGD, exactly. Returns |B_k|/|B|·L_k per step."""
    from minidist import data

    model, losses = model_fn(), []
    for t, batch in enumerate(data.step_batches(len(X), RUN["batch_size"], RUN["steps"])):
        lo, hi = data.shard_bounds(len(batch), client.rank, client.world_size)
        client.pull(out=model.params)
        _write(log, f"pulled {client.rank} {t}")
        _wait_for(log, lambda lines, t=t: all(("pulled", f"{w} {t}") in lines
                                              for w in range(client.world_size)),
                  timeout, f"every worker's pull at clock {t}")
        share = (hi - lo) / len(batch)
        losses.append(share * model.loss_and_grad(X[batch[lo:hi]], y[batch[lo:hi]]))
        client.push(model.grads * share)
    return losses


def _ssp0_training(fn, log, timeout):
    """Scenario 2: SSP(0) training against one process: None, or what went wrong."""
    from types import SimpleNamespace

    from minidist import data, nn, ps, train

    X, y = data.make_classification(48, MLP_SIZES[0], MLP_SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, MLP_SIZES, seed=1)
    single = train(model_fn, X, y, **RUN)
    open(log, "w").close()
    with ssp_rule(fn, log):
        result, failure = _guarded(lambda: ps.run(
            _lockstep, 2, model_fn().params.copy(), lr=RUN["lr"], consistency="ssp",
            staleness=0, timeout=timeout, args=(model_fn, X, y, log, timeout)), timeout)
    asked, raised = _questions(log)
    failure = raised or failure or _judged(asked, result.pulls[0], 0)
    if failure:
        return failure
    run = SimpleNamespace(loss=np.sum(result.results, axis=0), params=result.params)
    return _differs(run, single)


def check_ssp_rule(fn, bounds=(0, 1, 2), timeout=30.0, start_method=None):
    """fn(clock, slowest_clock, staleness) -> True when a worker at `clock` may pull under SSP
    (Ho et al. 2013): exactly when clock − slowest_clock ≤ staleness. fn drives ps.run's real
    servers: for each s of `bounds`, worker 1 is held at clock 0 while worker 0 runs ahead (it
    must get exactly s ahead, then wait); then SSP(0) must train as one process does; finally
    fn is asked about clocks no run reached. start_method: the held-back runs' (ps.run's)."""
    from minidist import data

    name = "check_ssp_rule"
    bounds = list(bounds)
    if not bounds or any(not data.is_integer(s) or s < 0 for s in bounds):
        raise ValueError(f"bounds must be a non-empty list of staleness bounds, integers >= 0, "
                         f"got {bounds!r}")
    _check_timeout(timeout)
    problem = _table(fn, bounds, range(4))  # the slowest may always pull, else runs hang
    if problem:
        return Check(name, False, problem)
    with tempfile.TemporaryDirectory(prefix="minidist-ssp-") as tmp:
        for s in bounds:
            failure = _held_run(fn, s, os.path.join(tmp, f"held_{s}.log"), timeout,
                                start_method)
            if failure:
                return Check(name, False, f"with worker 1 held at clock 0: {failure}")
        failure = _ssp0_training(fn, os.path.join(tmp, "train.log"), timeout)
        if failure:
            return Check(name, False, f"training an MLP on 2 workers with SSP(0): {failure}")
    for s in bounds:  # the rule on its own, where no run went
        for slowest in (0, 3, 10):
            for clock in range(slowest, slowest + s + 3):
                got, failed = _call(name, fn, clock, slowest, s, convert=bool)
                if failed is not None:
                    return failed
                if got != (clock - slowest <= s):
                    verb = "may pull" if clock - slowest <= s else "must wait"
                    return Check(name, False, f"a worker at clock {clock} with the slowest at "
                                              f"{slowest} and staleness {s} {verb}: compare "
                                              "clock − slowest_clock with s")
    return Check(name, True, f"on real servers, a worker ran exactly s clocks ahead of a held "
                             f"one and waited, for s in {tuple(bounds)}; SSP(0) trained as one "
                             f"process; and every answer was clock − slowest ≤ s")


def _a_number(answer):
    """answer as a float, if it is a number (an int, a float, a NumPy scalar; not a bool)."""
    if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, numbers.Real):
        raise TypeError("return a number of bytes")
    return float(answer)


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
        got, failed = _call(name, fn, n, itemsize, workers, k, convert=_a_number)
        if failed is not None:
            return failed
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


__all__ = ["check_ssp_rule", "check_server_traffic"]

EXERCISES = (
    Exercise(6, "may_pull", check_ssp_rule, "may_pull",
             "the SSP pull rule, by which real parameter-server processes answer pulls (a "
             "worker held back while another runs ahead; SSP(0) training equal to one process)"),
    Exercise(6, "server_bytes", check_server_traffic, "server_bytes",
             "the bytes through the busiest server in one BSP step", kind="formula"),
)
