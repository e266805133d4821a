"""ps.run(worker_fn, workers, params, ...): start the servers and workers, watch them, clean up.

The caller is the supervisor. It creates the shared memory, starts k server processes (one per
shard) and W worker processes, each running worker_fn(client, *args) (shipped by value with
cloudpickle, so notebook functions work under every start method), then waits on every result
pipe and process handle at once:

- every worker returns         -> stop the servers, gather θ and their records: PSResult
- a worker raises or dies      -> WorkerError naming it; with elastic=True the servers are told
                                  to stop waiting for it, the run goes on, and PSResult.events
                                  says so
- a server dies or fails       -> the abort word tells waiting workers (they raise ServerError),
                                  then the caller raises ServerError naming the shard
- the deadline passes          -> CommTimeout with what each unfinished worker was doing

Whatever happens, every process is stopped and reaped and every segment is unlinked. There
are no sockets: servers and workers talk over pipes the caller created (no listening port).
"""

import contextlib
import glob
import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import cloudpickle
import numpy as np

from minidist.comm.process_launcher import _died, _stop, unwinding_on_sigterm
from minidist.data import is_integer
from minidist.errors import CommTimeout, ServerError, failure_report, remote_failure
from minidist.ps import checkpoint, shards
from minidist.ps import consistency as rules
from minidist.ps.client import PSClient
from minidist.ps.server import serve


@dataclass
class PSResult:
    """params: the final θ. results: each worker's return value (None if it died).
    staleness: τ of every applied gradient, in shard 0's order of application (max over
    shards). pulls: (worker, clock, slowest clock, version) of every answered pull, per shard.
    stats/log/clock: per worker, from PSClient.report(). events: what went wrong and how the
    run carried on."""

    params: np.ndarray
    results: list
    staleness: np.ndarray
    applied: list  # per shard: gradients applied (BSP: W per step; ASP, SSP: one per push)
    updates: list  # per shard: optimizer steps taken in this run
    pulls: list
    stats: list
    log: list
    clocks: list
    start_clock: int = 0  # the checkpoint version a resumed run started from
    events: list = field(default_factory=list)


def run(worker_fn, workers, params, optimizer="sgd", lr=0.1, optimizer_options=None,
        consistency="bsp", staleness=None, num_servers=1, slow_workers=None, elastic=False,
        timeout=60.0, checkpoint_dir=None, checkpoint_every=0, resume=False, args=(),
        start_method=None, threads=1):
    """Run worker_fn(client, *args) on `workers` processes against `num_servers` servers that
    hold `params` (a 1-D float array) and update it with `optimizer`; returns a PSResult.

    consistency "bsp" | "asp" | "ssp" (with staleness=s); slow_workers={rank: factor} makes
    stragglers; elastic=True lets the run go on when a worker dies. checkpoint_dir with
    checkpoint_every=N saves every N-th update of each shard; resume=True restarts from the
    newest version all shards wrote (exact for BSP; ASP and SSP restart each worker at its
    smallest clock over the shards, so a few gradients may be applied twice)."""
    params, slow = _check(worker_fn, workers, params, consistency, staleness, num_servers,
                          slow_workers, timeout, checkpoint_dir, checkpoint_every, resume)
    return unwinding_on_sigterm(lambda: _run(
        worker_fn, workers, params, optimizer, lr, optimizer_options, consistency, staleness,
        num_servers, slow, elastic, timeout, checkpoint_dir, checkpoint_every, resume, args,
        start_method, threads))


def _run(worker_fn, workers, params, optimizer, lr, optimizer_options, consistency, staleness,
         num_servers, slow, elastic, timeout, checkpoint_dir, checkpoint_every, resume, args,
         start_method, threads):
    """run() after its checks: start the servers and workers, supervise, stop them all."""
    resume_version = None
    if resume:
        resume_version = checkpoint.latest(checkpoint_dir, num_servers)
        if resume_version is None:
            raise FileNotFoundError(f"resume=True but {checkpoint_dir!r} holds no checkpoint "
                                    f"written by all {num_servers} shards")
    config = cloudpickle.dumps({
        "optimizer": optimizer, "lr": lr, "optimizer_options": dict(optimizer_options or {}),
        "consistency": consistency, "staleness": staleness, "ssp_rule": rules.ssp_may_pull,
        "checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every,
        "resume_version": resume_version})
    ctx = mp.get_context(start_method)
    prefix = f"md{os.getpid()}_{uuid.uuid4().hex[:8]}"
    limits = shards.bounds(len(params), num_servers)
    segments, children, pipes = [], [], []  # all closed, stopped, unlinked in the end
    try:
        segments += [shards.ShardMemory(prefix, j, hi - lo, workers, params.dtype, create=True)
                     for j, (lo, hi) in enumerate(limits)]
        control = shards.Control(prefix, workers, create=True)
        segments.append(control)
        links = [[ctx.Pipe() for _ in range(workers)] for _ in range(num_servers)]  # [j][w]
        orders = [ctx.Pipe() for _ in range(num_servers)]
        results = [ctx.Pipe(duplex=False) for _ in range(workers)]
        pipes += [c for pair in [*orders, *results, *(p for row in links for p in row)]
                  for c in pair]
        payload = cloudpickle.dumps((worker_fn, tuple(args)))
        children += [ctx.Process(target=serve, name=f"minidist-ps-server-{j}", daemon=True,
                                 args=(j, lo, hi, params[lo:hi].copy(), workers, config,
                                       prefix, [links[j][w][0] for w in range(workers)],
                                       orders[j][1], threads))
                     for j, (lo, hi) in enumerate(limits)]
        start = time.monotonic()
        children += [ctx.Process(target=_worker_main, name=f"minidist-ps-worker-{w}",
                                 daemon=True,
                                 args=(w, workers, prefix, limits, params.dtype,
                                       [links[j][w][1] for j in range(num_servers)], timeout,
                                       slow.get(w, 1.0), start, payload, threads,
                                       results[w][1]))
                     for w in range(workers)]
        for proc in children:
            proc.start()
        for conn in [c for row in links for pair in row for c in pair] + \
                [o[1] for o in orders] + [r[1] for r in results]:
            conn.close()  # the children hold their own ends now
        supervisor = _Supervisor(children[:num_servers], children[num_servers:],
                                 [o[0] for o in orders], [r[0] for r in results], control,
                                 timeout, elastic)
        result = supervisor.finish(supervisor.watch(), len(params), params.dtype)
        result.start_clock = resume_version or 0
        return result
    finally:
        _stop(children)
        for conn in pipes:
            conn.close()
        for segment in segments:
            segment.close()
        for path in glob.glob(f"/dev/shm/{prefix}_*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _worker_main(rank, workers, prefix, limits, dtype, conns, timeout, slow_factor, start,
                 payload, threads, result_conn):
    """What each worker process runs."""
    client = None
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
        client = PSClient(rank, workers, prefix, limits, dtype, conns, timeout, slow_factor,
                          start)
        fn, args = cloudpickle.loads(payload)
        result = fn(client, *args)
        client.finish()
        message = ("ok", cloudpickle.dumps((result, client.report())))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        message = failure_report(exc)
    result_conn.send(message)
    result_conn.close()
    if client is not None:
        client.close()


class _Supervisor:
    def __init__(self, servers, procs, orders, results, control, timeout, elastic):
        self.servers, self.procs, self.orders, self.results = servers, procs, orders, results
        self.control, self.timeout, self.elastic = control, timeout, elastic
        self.deadline = time.monotonic() + timeout
        self.events, self.failed = [], {}

    def watch(self):
        """Each worker's (result, report), or None for a worker that failed (elastic)."""
        done, waiting = {}, set(range(len(self.procs)))
        while waiting:
            handles = {self.results[w]: ("result", w) for w in waiting}
            handles |= {self.procs[w].sentinel: ("worker", w) for w in waiting}
            handles |= {s.sentinel: ("server", j) for j, s in enumerate(self.servers)}
            handles |= {o: ("server", j) for j, o in enumerate(self.orders)}
            ready = wait(list(handles), timeout=max(0.0, self.deadline - time.monotonic()))
            if not ready:
                raise CommTimeout(f"{len(waiting)} of {len(self.procs)} parameter-server "
                                  f"workers did not finish within {self.timeout} s",
                                  {w: self.control.get_status(w) for w in waiting})
            for handle in ready:
                kind, index = handles[handle]
                if kind == "server":
                    self._server_failed(index, waiting)
                if index not in waiting:
                    continue
                message = self._message(index)
                if message is not None and message[0] == "ok":
                    done[index] = cloudpickle.loads(message[1])
                    waiting.discard(index)
                    continue
                error = _died(index, self.procs[index]) if message is None else \
                    remote_failure(index, *message[1:4])
                if message is not None and message[4]:
                    error = CommTimeout(f"worker {index} timed out: {message[2]}",
                                        {w: self.control.get_status(w) for w in waiting})
                self._worker_failed(index, error, waiting)
        return [done.get(w) for w in range(len(self.procs))]

    def _message(self, w):
        conn = self.results[w]
        if not conn.poll(0.5 if not self.procs[w].is_alive() else 0):
            return None
        try:
            return conn.recv()
        except EOFError:
            return None

    def _worker_failed(self, w, error, waiting):
        waiting.discard(w)
        alive = [k for k in range(len(self.procs)) if k not in self.failed and k != w]
        if not self.elastic or not alive:
            raise error
        self.failed[w] = error
        reason = str(error).splitlines()[0]
        self.events.append(f"worker {w} failed at {self.control.get_status(w)!r} ({reason}); "
                           f"the run continued with the {len(alive)} remaining workers")
        for j, order in enumerate(self.orders):
            try:
                order.send(("dead", w))
            except OSError:  # that server is gone too
                self._server_failed(j, waiting)

    def _server_failed(self, j, waiting):
        why = "its process ended"
        if self.orders[j].poll(0):
            try:
                message = self.orders[j].recv()
                why = message[1] + "\n\n--- traceback of the server ---\n" + message[2]
            except EOFError:
                pass
        self.servers[j].join(1.0)
        if self.servers[j].exitcode is not None and self.servers[j].exitcode < 0:
            why = f"killed by signal {-self.servers[j].exitcode}"
        self.control.abort(f"server shard {j} died ({why.splitlines()[0]})")
        heard = {}
        end = time.monotonic() + 2.0
        for w in sorted(waiting):  # let the waiting workers notice and say what they saw
            if self.results[w].poll(max(0.0, end - time.monotonic())):
                message = self.results[w].recv()
                if message[0] == "error":
                    heard[w] = f"{message[1]}: {message[2]}"
        raise ServerError(j, why, heard)

    def finish(self, outcomes, n, dtype):
        """Stop the servers, reassemble θ from the shards and merge their records."""
        pieces, records = [], []
        for j, order in enumerate(self.orders):
            try:
                order.send(("stop",))
                message = order.recv() if order.poll(self.timeout) else \
                    ("error", f"no final state within {self.timeout} s", "")
            except (EOFError, OSError):
                message = ("error", "its process ended before sending its final state", "")
            if message[0] != "final":
                raise ServerError(j, f"{message[1]}\n{message[2]}".rstrip())
            pieces.append(message[1])
            records.append(message[2])
        tau = {}
        for record in records:
            for w, clock, t in record["staleness"]:
                tau[w, clock] = max(t, tau.get((w, clock), 0))
        order0 = [(w, c) for w, c, _ in records[0]["staleness"]]
        reports = [o[1] if o else None for o in outcomes]
        return PSResult(
            params=np.concatenate(pieces).astype(dtype, copy=False),
            results=[o[0] if o else None for o in outcomes],
            staleness=np.array([tau[key] for key in order0], dtype=np.int64),
            applied=[r["applied"] for r in records], updates=[r["updates"] for r in records],
            pulls=[r["pulls"] for r in records],
            stats=[r and r["stats"] for r in reports], log=[r and r["log"] for r in reports],
            clocks=[r and r["clock"] for r in reports],
            events=list(self.events))


def _check(worker_fn, workers, params, consistency, staleness, num_servers, slow_workers,
           timeout, checkpoint_dir, checkpoint_every, resume):
    if not callable(worker_fn):
        raise ValueError(f"worker_fn must be callable, got {type(worker_fn).__name__}")
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    params = np.asarray(params)
    if params.ndim != 1 or params.dtype.kind != "f":
        raise ValueError("params must be a 1-D float array (the model's flat buffer), got "
                         f"{params.dtype} {params.shape}")
    rules.check(consistency, staleness)
    if not is_integer(num_servers) or not 1 <= num_servers <= len(params):
        raise ValueError(f"num_servers must be an integer in [1, {len(params)}] (one shard "
                         f"per server, at least one parameter each), got {num_servers!r}")
    slow = dict(slow_workers or {})
    for rank, factor in slow.items():
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < workers:
            raise ValueError(f"slow_workers: rank {rank!r} is not in [0, {workers})")
        if not factor >= 1:
            raise ValueError(f"slow_workers: worker {rank}'s slowdown must be >= 1, got {factor}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if (checkpoint_every or resume) and not checkpoint_dir:
        raise ValueError("checkpoint_every and resume need checkpoint_dir (a directory)")
    if not is_integer(checkpoint_every) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0 steps, got "
                         f"{checkpoint_every!r}")
    return params, slow
