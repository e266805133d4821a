"""run(fn, world_size, backend=...): start the ranks, run fn(comm, ...) on each, collect results.

Nothing hangs: a rank that raises or dies stops the run with WorkerError (its rank and
traceback); ranks that do not finish within `timeout` seconds end it with CommTimeout, naming
each unfinished rank and the operation it was in.
"""

import os

import numpy as np

BACKENDS = ("thread", "process", "mpi")


def run(fn, world_size, args=(), kwargs=None, backend="process", timeout=60.0, debug=None,
        start_method=None, threads_per_rank=1):
    """Run fn(comm, *args, **kwargs) once per rank; returns each rank's result, in rank order.

    backend: "thread" (in-process), "process" (one OS process per rank, shared-memory
    transport) or "mpi" (mpi4py; under `mpiexec -n N` or started by this call).
    Ranks that pass different dtypes, shapes or arguments to a collective always raise
    CollectiveMismatchError naming both; debug (or MINIDIST_DEBUG=1) adds a fingerprint round
    before each collective, which also names a native path on one rank against messages on another.
    start_method: "fork", "spawn" or "forkserver" for the process backend (default: the
    platform's). threads_per_rank: BLAS/OpenMP threads each rank process may use.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if debug is None:
        debug = os.environ.get("MINIDIST_DEBUG") == "1"
    kwargs = dict(kwargs or {})
    if backend == "thread":
        from minidist.comm.thread import run_threads

        return run_threads(fn, int(world_size), tuple(args), kwargs, timeout, debug,
                           threads_per_rank)
    if backend == "process":
        from minidist.comm.process_launcher import run_processes

        return run_processes(fn, int(world_size), tuple(args), kwargs, timeout, debug,
                             start_method, threads_per_rank)
    from minidist.comm.mpi import run_mpi

    return run_mpi(fn, int(world_size), tuple(args), kwargs, timeout, debug)
