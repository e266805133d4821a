"""Async collectives: a Work handle per op, and one progress thread per rank that runs them.

`comm.all_reduce(x, async_op=True)` checks its arguments in the caller, then queues the op on
its rank's Progress: a FIFO run by one daemon thread (started at the rank's first async op), so
a rank's ops complete in the order it issued them, over all its groups (a split communicator
shares its parent's Progress). Every blocking call first waits until nothing is pending
(`Progress.settle`), so at any moment one thread of a rank drives the transport.

An op that fails breaks its rank's communicator (its peers may be halfway through it): the
ops queued after it are not run, and they and every later blocking call fail, with an error
of the first failure's type that names it.
"""

import math
import threading
import time
from collections import deque

import numpy as np

from minidist.errors import CommTimeout

STOP_GRACE = 1.0  # seconds a rank's end waits for its interrupted progress thread to stop


def restate(exc, message):
    """An exception of exc's type and attributes that says `message`, caused by exc (so a
    CommTimeout stays one, and its traceback on the progress thread is kept)."""
    new = type(exc).__new__(type(exc), message)
    new.__dict__.update(exc.__dict__)
    new.args = (message,)
    new.__cause__ = exc
    return new


def check_timeout(timeout):
    """A wait's timeout: a number of seconds > 0, as a float (math.inf: None, no limit)."""
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, (int, float, np.number)) \
            or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (or None: the communicator's), "
                         f"got {timeout!r}")
    return None if timeout == math.inf else float(timeout)


class Work:
    """The handle of one async op: `wait()` -> its result, `is_completed()`, `name`, and the
    time.perf_counter() stamps `issued`, `started`, `finished` (None until they happen)."""

    __slots__ = ("name", "index", "issued", "started", "finished", "_progress", "_timeout",
                 "_result", "_error")

    def __init__(self, progress, name, index, timeout):
        self.name, self.index, self._progress, self._timeout = name, index, progress, timeout
        self.issued, self.started, self.finished = time.perf_counter(), None, None
        self._result = self._error = None  # _error: (the exception, what wait says)

    def __repr__(self):
        state = "completed" if self.finished is not None else "pending"
        return f"<Work {self._what()} of rank {self._progress.rank}: {state}>"

    def _what(self):
        return f"async {self.name} #{self.index}"

    def is_completed(self):
        """Whether the op has finished (done or failed): then wait() returns at once."""
        return self.finished is not None

    def wait(self, timeout=None):
        """The op's result (all_reduce, broadcast: the array, in place; all_gather: the stacked
        array; reduce_scatter: this rank's chunk; all_to_all: the list of arrays received).
        Raises the op's error, of its type, naming the op and the rank; CommTimeout if the op
        has not completed within `timeout` s (default: the communicator's timeout); the op
        itself goes on."""
        progress = self._progress
        if self.finished is None:
            timeout = self._timeout if timeout is None else check_timeout(timeout)
            with progress.cond:
                done = progress.cond.wait_for(self.is_completed, timeout)
            if not done:
                raise CommTimeout(f"rank {progress.rank} waited {timeout} s for {self._what()}, "
                                  f"which has not completed")
        if self._error is not None:
            progress.reported = True
            raise restate(*self._error)
        return self._result


class Progress:
    """One rank's async ops, run in the order issued by one daemon thread."""

    def __init__(self, rank):
        self.rank = rank
        self.cond = threading.Condition()
        self.queue = deque()  # (work, body) of ops not started yet
        self.pending = 0  # ops issued and not finished
        self.busy = False  # ops pending, or one failed: a blocking call must settle() first
        self.failure = None  # (work, exception) of the first op that failed
        self.reported = False  # whether an error made from it has reached the caller
        self.running = None  # the Work whose body runs now
        self.thread, self.closed, self.issued = None, False, 0

    def submit(self, name, body, timeout, check):
        """Queue body() (which runs op `name`) and return its Work; check() before the first."""
        if self.closed:
            raise RuntimeError(f"rank {self.rank}: async {name} issued after the run ended")
        if self.thread is None:
            check()
            self.thread = threading.Thread(target=self._run, name=f"minidist-progress-{self.rank}",
                                           daemon=True)
            self.thread.start()
        self.issued += 1
        work = Work(self, name, self.issued, timeout)
        with self.cond:
            self.queue.append((work, body))
            self.pending += 1
            self.busy = True
            self.cond.notify_all()
        return work

    def _run(self):
        """The progress thread: each op in turn; after a failure, fail the rest unrun."""
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                work, body = self.queue.popleft()
                self.running = work
            work.started = time.perf_counter()
            result = error = None
            if self.failure is None and not self.closed:
                try:
                    result = body()
                except BaseException as exc:  # noqa: BLE001 - wait() raises it in the caller
                    error = (exc, f"rank {self.rank} failed in {work._what()}: {exc}")
            elif self.failure is None:
                error = (RuntimeError("the run ended first"),
                         f"rank {self.rank} could not run {work._what()}: the run ended first")
            else:
                first, exc = self.failure
                error = (exc, f"rank {self.rank} could not run {work._what()}: "
                              f"{first._what()} failed before it: {exc}")
            body = None  # let go of the op's arrays
            with self.cond:
                work._result, work._error = result, error
                work.finished = time.perf_counter()
                if error is not None and self.failure is None:
                    self.failure = (work, error[0])
                self.pending -= 1
                self.running = None
                self.busy = self.pending > 0 or self.failure is not None
                self.cond.notify_all()

    def settle(self, what, timeout):
        """Before blocking call `what` (on any thread but the progress thread, whose ops call
        the communicator too): wait until no op is pending; then raise the first failure."""
        if threading.get_ident() == self.thread.ident:
            return
        with self.cond:
            if not self.cond.wait_for(lambda: self.pending == 0, timeout):
                late = self.running or self.queue[0][0]
                raise CommTimeout(f"rank {self.rank}: {what} waited {timeout} s for the async ops "
                                  f"issued before it; {late._what()} has not completed")
        if self.failure is not None:
            first, exc = self.failure
            self.reported = True
            raise restate(exc, f"rank {self.rank} could not run {what}: {first._what()} failed "
                               f"before it: {exc}")

    def drain(self, timeout):
        """A rank's fn returned: wait for its pending ops; raise a failure no caller has seen."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.pending == 0, timeout):
                late = self.running or self.queue[0][0]
                raise CommTimeout(f"rank {self.rank} returned with {late._what()} pending, which "
                                  f"did not complete within {timeout} s")
        if self.failure is not None and not self.reported:
            first, exc = self.failure
            raise restate(exc, f"rank {self.rank} failed in {first._what()}, which it never "
                               f"waited for: {exc}")

    def stop(self, grace):
        """Stop the progress thread: ops not started fail unrun; wait up to `grace` s."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(grace)


class AsyncOps:
    """The Communicator's side of async ops: `self._queue` is its rank's Progress."""

    def _start(self, name, body, async_op):
        """body() now (async_op False), or queued as an async op (True): its Work."""
        if async_op is False or async_op is np.False_:
            return body()
        if async_op is True or async_op is np.True_:
            return self._submit(name, body)
        raise TypeError(f"{name}: async_op must be True or False, got {async_op!r}")

    def _submit(self, name, body):
        """Queue body() on this rank's progress thread; returns its Work."""
        return self._queue.submit(name, body, self.timeout, self._check_async)

    def _check_async(self):
        """Before the first async op: raise if this backend cannot run one (see MPI)."""

    def wait_pending(self, timeout=None):
        """Wait until every async op this rank issued has completed (at most `timeout` s,
        default the communicator's); raises the error of one that failed."""
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        if self._queue.busy:
            self._queue.settle("wait_pending", timeout)

    def _interrupt(self):
        """Make a wait of the progress thread end soon: the backends' waits raise when
        _interrupted() (process: also wake a recv asleep on its semaphore)."""
        self._closing = True

    def _interrupted(self):
        """Whether this thread is the progress thread and was told to stop by _interrupt."""
        return self._closing and threading.current_thread() is self._queue.thread

    def _end_async(self, wait=True):
        """A launcher's last call for this rank's async ops. wait: wait for them, raising a
        failure that no wait() reported; else interrupt the running op and fail the queued ones
        unrun. Then stop the progress thread (after a failed wait, call again with wait=False)."""
        if self._queue.thread is None:
            return
        if wait:
            self._queue.drain(self.timeout)
        else:
            self._interrupt()
        self._queue.stop(STOP_GRACE)
