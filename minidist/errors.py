"""The errors a distributed run can end in. Each names the ranks involved and what they did."""

import time
import traceback


def clock(t):
    """Wall-clock time t (from time.time()) as HH:MM:SS.d, as statuses and timeouts print it."""
    tenths = int(t * 10 + 1e-6)  # + 1e-6: t may be tenths / 10, a hair below
    return time.strftime("%H:%M:%S", time.localtime(tenths // 10)) + f".{tenths % 10}"


class WorkerError(RuntimeError):
    """A rank failed: it raised, exited, or was killed by a signal.

    Attributes: rank, exc_type (the remote exception's class name, or None), remote_traceback
    (text, or None), exitcode (the process exit code, or None), signal (its name, or None).
    """

    def __init__(self, rank, message, exc_type=None, remote_traceback=None, exitcode=None,
                 signal=None):
        self.rank, self.exc_type, self.remote_traceback = rank, exc_type, remote_traceback
        self.exitcode, self.signal = exitcode, signal
        who = "a rank" if rank is None else f"rank {rank}"  # None: MPI could not tell which
        text = f"{who} failed: {message}"
        if remote_traceback:
            text += f"\n\n--- traceback of {who} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)


class CommTimeout(TimeoutError):
    """Ranks did not finish in time. `pending` maps each unfinished rank to what it was doing."""

    def __init__(self, message, pending=None):
        self.pending = dict(pending or {})
        if self.pending:
            where = "; ".join(f"rank {r}: {what}" for r, what in sorted(self.pending.items()))
            message = f"{message} (unfinished at {clock(time.time())} — {where})"
        super().__init__(message)


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives, or the same one with different arguments, shapes or
    dtypes. `calls` maps each rank the raising rank heard from to the call it made."""

    def __init__(self, message, calls=None):
        self.calls = dict(calls or {})
        super().__init__(message)

    @classmethod
    def between(cls, rank, calls):
        """What rank `rank` raises on seeing `calls` (rank -> the call it made) disagree."""
        mine = calls[rank]
        others = "; ".join(f"rank {r} called {call}" for r, call in sorted(calls.items())
                           if call != mine)
        return cls(f"rank {rank} expected every rank to call {mine}, but {others} (every rank "
                   "must make the same call, with the same dtype and shape)", calls)


class OutOfMemory(MemoryError):
    """A rank would hold more than train's max_memory_per_rank: a simulated device's memory
    wall. Attributes: rank (None: every rank, found from the plan before training), held
    ({params, grads, optimizer, activations, peak} bytes at that moment, or None when the
    error came from another process) and budget (bytes)."""

    def __init__(self, message, rank=None, held=None, budget=None):
        self.rank, self.held, self.budget = rank, None if held is None else dict(held), budget
        super().__init__(message)

    @classmethod
    def over(cls, rank, held, budget, when):
        """The error of `rank` (None: every rank) holding `held` bytes by category, `when`."""
        who = "every rank" if rank is None else f"rank {rank}"
        parts = ", ".join(f"{key} {value:,} B" for key, value in held.items() if key != "peak")
        return cls(f"{who} would hold {held['peak']:,} B {when} ({parts}), over "
                   f"max_memory_per_rank={budget:,} B", rank, held, budget)


def failure_report(exc):
    """What a rank process sends its caller when it fails (remote_failure reads it back)."""
    return ("error", type(exc).__name__, str(exc), traceback.format_exc(),
            isinstance(exc, CommTimeout))


def remote_failure(rank, exc_type, text, remote_traceback):
    """The error the caller sees for an exception raised on a rank: a mismatch stays a
    CollectiveMismatchError, anything else becomes a WorkerError carrying the traceback."""
    if exc_type == "CollectiveMismatchError":  # its text names the rank, or gets it in front
        return CollectiveMismatchError(text if text.startswith(f"rank {rank} ")
                                       else f"rank {rank}: {text}")
    if exc_type == "OutOfMemory":  # the text names the rank, what it held and the budget
        return OutOfMemory(text, rank)
    return WorkerError(rank, f"{exc_type}: {text}", exc_type, remote_traceback)


class ServerError(RuntimeError):
    """A parameter-server shard failed or vanished. `shard` is its index; `worker_errors` maps
    each worker that noticed to what it reported."""

    def __init__(self, shard, message, worker_errors=None):
        self.shard, self.worker_errors = shard, dict(worker_errors or {})
        super().__init__(f"parameter server shard {shard} failed: {message}")
