"""Start one process per rank, watch them, and always clean up.

The launcher creates the shared control segment and the semaphores, ships `fn` to every rank
by value (cloudpickle: so a function defined in a notebook cell runs under fork, spawn and
forkserver alike), then waits on each rank's result pipe and process handle together:

- a result from every rank            -> the results, in rank order
- a rank reports an exception         -> WorkerError with its rank and traceback
- a rank's process ends with no result -> WorkerError naming its exit code or signal
- the deadline passes                  -> CommTimeout naming each unfinished rank's operation

Whatever happens, the other ranks are killed, and every shared-memory segment of the run
(named with the run's prefix) is unlinked: also on Ctrl-C (KeyboardInterrupt unwinds the wait)
and on SIGTERM, which unwinds it the same way and is then delivered again (run_processes).
"""

import functools
import glob
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from multiprocessing.connection import wait

import cloudpickle

from minidist.comm import shm
from minidist.comm.process import ProcessCommunicator
from minidist.comm.shm import attach
from minidist.errors import CommTimeout, WorkerError, failure_report, remote_failure


def _rank_main(rank, world_size, prefix, capacity, timeout, debug, doorbells, spaces, payload,
               threads, conn):
    """What each rank's process runs."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a fork inherits the launcher's handler
    comm = None
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)  # p ranks on p cores must not each start p BLAS threads
        comm = ProcessCommunicator(rank, world_size, prefix, capacity, timeout, debug, doorbells,
                                   spaces)
        fn, args, kwargs = cloudpickle.loads(payload)
        result = fn(comm, *args, **kwargs)
        comm._end_async()  # fn may return with async ops pending: they count too
        comm.flush()
        comm._set_status("finished")
        message = ("ok", cloudpickle.dumps(result))
        del result
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the launcher
        message = failure_report(exc)
    conn.send(message)
    conn.close()
    if comm is not None:
        comm.close()


def run_processes(fn, world_size, args, kwargs, timeout, debug, start_method=None, threads=1):
    """Run fn(comm, *args, **kwargs) in `world_size` processes; results in rank order (with
    SIGTERM unwinding the run: `unwinding_on_sigterm`)."""
    return unwinding_on_sigterm(functools.partial(
        _run_processes, fn, world_size, args, kwargs, timeout, debug, start_method, threads))


def unwinding_on_sigterm(launch):
    """launch(), a run that starts processes and stops them in its `finally`.

    While it runs, SIGTERM unwinds it as Ctrl-C does, so the children are stopped and the
    segments unlinked; then SIGTERM goes again to the handler it had before: by default the
    process ends by SIGTERM, as the sender asked. Only the main thread may set a handler: in
    other threads, or where SIGTERM is ignored or handled outside Python, SIGTERM keeps its
    handler.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            previous in (signal.SIG_IGN, None):
        return launch()
    signal.signal(signal.SIGTERM, functools.partial(_unwind, os.getpid()))
    try:
        return launch()
    except _Terminated:
        pass  # leaving this block frees the run's frames: spawn's named semaphores unlink now
    finally:
        signal.signal(signal.SIGTERM, previous)
    signal.raise_signal(signal.SIGTERM)  # the default action ends the process right here
    raise RuntimeError("the run was stopped by SIGTERM (its processes were stopped and its "
                       "shared memory freed)")  # reached only if the previous handler returned


class _Terminated(BaseException):
    """SIGTERM arrived during a run (a BaseException, as KeyboardInterrupt: no `except
    Exception` may swallow it)."""


def _unwind(launcher_pid, signum, frame):
    if os.getpid() != launcher_pid:  # a child forked with the launcher's handler (a rank before
        signal.signal(signum, signal.SIG_DFL)  # _rank_main resets it, a parameter server or
        os.kill(os.getpid(), signum)  # worker): it ends as SIGTERM asks, not in launcher code
        return
    signal.signal(signal.SIGTERM, lambda *_: None)  # a second SIGTERM must not cut cleanup short
    raise _Terminated


def _run_processes(fn, world_size, args, kwargs, timeout, debug, start_method, threads):
    ctx = mp.get_context(start_method)
    prefix = f"md{os.getpid()}_{uuid.uuid4().hex[:8]}"  # short: macOS allows 31 bytes
    capacity = shm.ring_capacity(world_size)
    layout = shm.Layout(world_size, capacity)
    payload = cloudpickle.dumps((fn, args, kwargs))
    doorbells = [ctx.Semaphore(0) for _ in range(world_size)]
    spaces = [[ctx.Semaphore(0) if s != d else None for d in range(world_size)]
              for s in range(world_size)]
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [ctx.Process(target=_rank_main, name=f"minidist-rank-{r}", daemon=True,
                         args=(r, world_size, prefix, capacity, timeout, debug, doorbells,
                               spaces, payload, threads, pipes[r][1]))
             for r in range(world_size)]
    control = None
    try:
        control = attach(f"{prefix}_ctl", create=True, size=layout.total)
        status = functools.partial(_read_status, control, layout.status, world_size)
        for proc in procs:
            proc.start()
        for _, child_end in pipes:
            child_end.close()
        return _supervise(procs, [p[0] for p in pipes], status, timeout)
    finally:
        _stop(procs)
        for reader, _ in pipes:
            reader.close()
        if control is not None:
            control.close()
        for path in glob.glob(f"/dev/shm/{prefix}_*"):  # the control segment and rank buffers
            os.unlink(path)


def _read_status(control, offset, world_size):
    """Every rank's status line, copied out of the control segment: no view of the mapping
    outlives the call (a traceback that kept one would read unmapped memory after cleanup)."""
    size = shm.STATUS_BYTES
    raw = bytes(control.buf[offset:offset + world_size * size])
    return [raw[r * size:(r + 1) * size].rstrip(b"\0").decode(errors="replace") or "starting"
            for r in range(world_size)]


def _supervise(procs, conns, status, timeout):
    """Each rank's result, in rank order; `status()` reads what every rank is doing."""
    world_size = len(procs)
    results, waiting = {}, set(range(world_size))
    deadline = time.monotonic() + timeout

    def doing(ranks):
        lines = status()
        return {r: lines[r] for r in ranks}

    while waiting:
        handles = {conns[r]: r for r in waiting} | {procs[r].sentinel: r for r in waiting}
        ready = wait(list(handles), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise CommTimeout(f"{len(waiting)} of {world_size} ranks did not finish within "
                              f"{timeout} s", doing(waiting))
        for handle in ready:
            rank = handles[handle]
            if rank not in waiting:
                continue
            if conns[rank].poll():  # a message, even if the process has exited since
                message = _message(conns[rank])
            elif handle is conns[rank]:
                message = None  # the pipe closed without a message
            else:
                procs[rank].join(1.0)  # exited: its last message may still be in flight
                message = _message(conns[rank], 0.5)
            if message is None:
                raise _died(rank, procs[rank])
            if message[0] == "ok":
                results[rank] = cloudpickle.loads(message[1])
                waiting.discard(rank)
                continue
            _, exc_type, text, tb, timed_out = message
            if timed_out:
                pending = doing(waiting)
                raise CommTimeout(f"rank {rank} timed out: {text}", pending)
            raise remote_failure(rank, exc_type, text, tb)
    return [results[r] for r in range(world_size)]


def _message(conn, seconds=0.0):
    """What the rank sent on `conn` (waiting up to `seconds`), or None: it sent nothing."""
    try:
        return conn.recv() if conn.poll(seconds) else None
    except EOFError:  # the pipe closed first (poll says "ready" on a closed pipe too)
        return None


def _died(rank, proc):
    proc.join(1.0)
    code = proc.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return WorkerError(rank, f"killed by signal {name}", exitcode=code, signal=name)
    return WorkerError(rank, f"the process exited with code {code} before returning a result",
                       exitcode=code)


def _stop(procs):
    """Terminate, then kill, whatever is still running; reap everything."""
    procs = [proc for proc in procs if proc.pid is not None]  # started (a failed start stops)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
