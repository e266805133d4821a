"""A worker's handle on the parameter servers: pull() the parameters, push(grad) a gradient.

Both talk to every shard in parallel: first a message to each server, then each answer in turn.

    pull():  ("pull", c) to every shard  ->  each answers once its rule allows  ->  I copy
             its θ_j out of shared memory into my flat θ and send ("release",)
    push(g): g_j into my push slot of shard j, ("push", c, weight) to every shard  ->  each
             takes it and answers  ->  my clock c ← c + 1

Every wait has a deadline and checks the abort word, so a dead server gives ServerError, not
a hang. `slow_factor` f > 1 makes this worker a straggler: before each push it sleeps (f − 1)
times the time it spent since its pull, so its steps take f times as long.
"""

import os
import time

import numpy as np

from minidist.comm.stats import Stats
from minidist.errors import CommTimeout, ServerError
from minidist.ps.shards import Control, ShardMemory


class PSClient:
    """rank, world_size, n (parameters), clock (gradients pushed so far, a resumed run's
    included), stats, server_pids, server_memory (per shard, the bytes its server holds:
    ShardServer.memory_bytes, sent with its hello)."""

    def __init__(self, rank, world_size, prefix, bounds, dtype, conns, timeout, slow_factor=1.0,
                 start_time=None):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.bounds, self.dtype, self.conns = bounds, np.dtype(dtype), conns
        self.n = bounds[-1][1]
        self.slow_factor = slow_factor
        self.start_time = time.monotonic() if start_time is None else start_time
        self.parent = os.getppid()  # if the caller goes away, stop waiting
        self.control = Control(prefix, world_size)
        self.shards = [ShardMemory(prefix, j, hi - lo, world_size, dtype)
                       for j, (lo, hi) in enumerate(bounds)]
        self.stats = Stats()
        self.log = []  # per push: (clock, pull start, pull end, push start, push end), seconds
        self._pull_times = (np.nan, np.nan)
        self.version = 0
        self._status("hello")
        for conn in conns:
            conn.send(("hello",))
        hellos = [self._answer(j, "hello") for j in range(len(conns))]
        self.clock = min(h[1] for h in hellos)  # > 0 when the run resumes from a checkpoint
        if any(h[1] != self.clock for h in hellos):  # shards saved at different clocks (async)
            for conn in conns:
                conn.send(("clock", self.clock))
        self.server_pids = [h[3] for h in hellos]
        self.server_memory = [h[4] for h in hellos]

    def pull(self, out=None):
        """The current parameters (into `out` if given, else a new array)."""
        out = np.empty(self.n, self.dtype) if out is None else out
        if out.shape != (self.n,):
            raise ValueError(f"pull(out=...) needs shape ({self.n},), got {out.shape}")
        start = time.monotonic()
        self._status(f"clock {self.clock}: waiting to pull")
        for conn in self.conns:
            conn.send(("pull", self.clock))
        for j, (lo, hi) in enumerate(self.bounds):
            self.version = self._answer(j, "params")[1]
            out[lo:hi] = self.shards[j].params
            self.conns[j].send(("release",))
        end = time.monotonic()
        self._count("pull", end - start)
        self._pull_times = (start - self.start_time, end - self.start_time)
        self._status(f"clock {self.clock}: computing")
        return out

    def push(self, grad, weight=1.0):
        """Send my gradient for this clock; returns when every shard has taken it."""
        grad = np.asarray(grad)
        if grad.shape != (self.n,) or grad.dtype != self.dtype:
            raise ValueError(f"push needs a gradient of shape ({self.n},) and dtype "
                             f"{self.dtype}, got {grad.shape} {grad.dtype}")
        if self.slow_factor > 1 and np.isfinite(self._pull_times[1]):
            busy = time.monotonic() - self.start_time - self._pull_times[1]
            time.sleep((self.slow_factor - 1) * busy)  # the straggler experiment, not a sync
        start = time.monotonic()
        self._status(f"clock {self.clock}: pushing")
        for j, (lo, hi) in enumerate(self.bounds):
            self.shards[j].push[self.rank][...] = grad[lo:hi]
            self.conns[j].send(("push", self.clock, float(weight)))
        for j in range(len(self.conns)):
            self.version = self._answer(j, "ack")[1]
        end = time.monotonic()
        self._count("push", end - start)
        self.log.append((self.clock, *self._pull_times, start - self.start_time,
                         end - self.start_time))
        self.clock += 1

    def finish(self):
        """Tell the servers this worker is done, so nobody waits for it."""
        self._status("finished")
        for conn in self.conns:
            conn.send(("done",))

    def report(self):
        """What the caller gets: stats per operation, the per-clock log, the final clock."""
        return {"stats": self.stats.as_dict(), "log": np.array(self.log).reshape(-1, 5),
                "clock": self.clock}

    def close(self):
        for shard in self.shards:
            shard.close()
        self.control.close()

    def _answer(self, j, kind):
        deadline = time.monotonic() + self.timeout
        while not self.conns[j].poll(0.05):
            why = self.control.aborted()
            if why:
                raise ServerError(j, f"worker {self.rank} stopped waiting for {kind}: {why}")
            if os.getppid() != self.parent:
                raise RuntimeError(f"worker {self.rank}: the caller that started the run is gone")
            if time.monotonic() > deadline:
                raise CommTimeout(f"worker {self.rank} waited {self.timeout} s for {kind} "
                                  f"from server shard {j}")
        try:
            message = self.conns[j].recv()
        except (EOFError, OSError) as exc:
            raise ServerError(j, f"its connection to worker {self.rank} closed") from exc
        if message[0] != kind:
            raise RuntimeError(f"worker {self.rank}: expected {kind!r} from shard {j}, "
                               f"got {message[0]!r}")
        return message

    def _count(self, op, seconds):
        stats = self.stats[op]
        stats.calls += 1
        stats.messages += len(self.conns)
        stats.seconds += seconds
        if op == "pull":
            stats.bytes_received += self.n * self.dtype.itemsize
        else:
            stats.bytes_sent += self.n * self.dtype.itemsize

    def _status(self, text):
        self.control.set_status(self.rank, text)
