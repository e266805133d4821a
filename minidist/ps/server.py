"""A parameter-server shard: its own process, owning a slice of θ and its optimizer state.

Messages are small tuples over one pipe per worker; parameters and gradients go through the
shard's shared memory (minidist.ps.shards), never through the pipe.

    worker -> server   ("hello",)           reply ("hello", clock_w, version, server pid,
                                            the shard's memory: see ShardServer.memory_bytes)
                       ("pull", c)          reply ("params", version, c_min) once allowed; the
                                            worker copies θ_j out of shared memory, then
                       ("release",)         says so: until every reader has, θ_j is not written
                       ("push", c, weight)  reply ("ack", version) once the gradient is used
                       ("clock", c)         resume: restart my clock at c (min over shards)
                       ("done",)            finished: nobody waits for this worker any more
    caller -> server   ("dead", w)          worker w died (elastic run): stop waiting for it
                       ("stop",)            reply ("final", θ_shard, records) and exit

A push that arrives while workers are reading θ_j waits for their releases; no pull is
answered while an update is waiting (updates first, so readers cannot starve them).
BSP acknowledges a push only when its step is applied, and sums the step's gradients in rank
order, so a BSP run is deterministic. If workers died (elastic), the step applies the weighted
mean of the gradients that arrived: Σ_k g_k / Σ_k weight_k.
"""

import contextlib
import glob
import os
import traceback
from multiprocessing.connection import wait

import cloudpickle
import numpy as np

from minidist import optim
from minidist.kernels import cpu_fused
from minidist.memory import Ledger, array_bytes, optimizer_bytes
from minidist.ps import checkpoint
from minidist.ps.consistency import applies_at_once, may_serve_pull
from minidist.ps.shards import ShardMemory


class ShardServer:
    """The state and the rules of one shard; `handle` takes one message from worker w."""

    def __init__(self, shard, params, conns, memory, config):
        self.shard, self.conns, self.memory, self.config = shard, conns, memory, config
        self.params = memory.params  # θ_j lives in shared memory, so workers read it directly
        self.params[...] = params
        self.opt = optim.make(config["optimizer"], self.params, config["lr"], ops=cpu_fused,
                              **config["optimizer_options"])  # this process never runs CUDA
        workers = len(conns)
        self.version, self.clocks = 0, np.zeros(workers, np.int64)
        if config["resume_version"] is not None:
            params, state, clocks = checkpoint.load(config["checkpoint_dir"], shard,
                                                    config["resume_version"])
            if params.shape != self.params.shape or len(clocks) != workers:
                raise ValueError(f"checkpoint of shard {shard} holds {params.shape[0]} "
                                 f"parameters and {len(clocks)} workers; this run has "
                                 f"{self.params.shape[0]} and {workers}")
            self.params[...] = params
            self.opt.load_state_dict(state)
            self.version, self.clocks[...] = config["resume_version"], clocks
        self.applied = self.clocks.copy()  # per worker, the pushes already in θ_j (checkpointed)
        self.live, self.finished, self.died = set(range(workers)), set(), []
        self.pulled_version = [self.version] * workers
        self.waiting = {}   # worker -> clock of its pull, not yet allowed
        self.readers = set()  # workers copying θ_j out right now: nobody writes it meanwhile
        self.deferred = []  # ASP/SSP: (worker, clock) of pushes that wait for the readers
        self.pushers = {}   # BSP: worker -> weight, for the step being collected
        self.sum = np.zeros_like(self.params) if config["consistency"] == "bsp" else None
        self.staleness, self.pulls = [], []  # (w, clock, τ) per applied gradient; pull records
        self.start_version = self.version

    def handle(self, w, message):
        kind = message[0]
        if kind == "hello":
            self.pulled_version[w] = self.version
            self.conns[w].send(("hello", int(self.clocks[w]), self.version, os.getpid(),
                                self.memory_bytes()))
        elif kind == "pull":
            self.waiting[w] = message[1]
        elif kind == "release":
            self.readers.discard(w)
        elif kind == "push":
            self._push(w, message[1], message[2])
        elif kind == "clock":  # a resumed async run restarts w here, on every shard
            self.clocks[w] = self.applied[w] = message[1]
        elif kind == "done":
            self.finished.add(w)
        else:
            raise ValueError(f"shard {self.shard}: unknown message {kind!r} from worker {w}")
        self._progress()

    def worker_died(self, w):
        self.live.discard(w)
        self.died.append(w)
        self.waiting.pop(w, None)
        self.readers.discard(w)
        self._progress()

    def _push(self, w, clock, weight):
        if clock != self.clocks[w]:
            raise ValueError(f"shard {self.shard}: worker {w} pushed clock {clock}, "
                             f"expected {self.clocks[w]}")
        self.clocks[w] += 1
        if applies_at_once(self.config["consistency"]):
            self.deferred.append((w, clock))
        else:
            self.pushers[w] = weight

    def _active(self):
        return self.live - self.finished

    def _step_ready(self):
        return bool(self.pushers) and self._active() <= set(self.pushers)

    def _progress(self):
        """Once nobody reads θ_j: apply the pushes that arrived (ASP, SSP) or the step every
        running worker has pushed to (BSP). Then answer the pulls now allowed."""
        if not self.readers:
            for w, clock in self.deferred:
                self.staleness.append((w, clock, self.version - self.pulled_version[w]))
                self.applied[w] += 1
                self._apply(self.memory.push[w])
                if w in self.live:
                    self.conns[w].send(("ack", self.version))
            self.deferred = []
            if self._step_ready():
                self._apply_bsp_step()
        if self.deferred or self._step_ready():
            return  # updates first: answer no pull until they are in
        active = self._active()
        c_min = min((int(self.clocks[k]) for k in active), default=None)
        for w, clock in list(self.waiting.items()):
            low = clock if c_min is None else c_min
            if may_serve_pull(self.config["consistency"], clock, self.version, low,
                              self.config["staleness"], self.config.get("ssp_rule")):
                self.readers.add(w)
                self.pulled_version[w] = self.version
                self.pulls.append((w, clock, low, self.version))
                del self.waiting[w]
                self.conns[w].send(("params", self.version, low))

    def _apply_bsp_step(self):
        ranks = sorted(self.pushers)
        np.copyto(self.sum, self.memory.push[ranks[0]])
        for k in ranks[1:]:
            self.sum += self.memory.push[k]
        if self.died:  # elastic: the mean over the gradients that arrived
            self.sum /= sum(self.pushers[k] for k in ranks)
        for k in ranks:
            self.staleness.append((k, self.version, self.version - self.pulled_version[k]))
            self.applied[k] += 1
        self._apply(self.sum)
        self.pushers = {}
        for k in ranks:
            if k in self.live:
                self.conns[k].send(("ack", self.version))

    def _apply(self, grad):
        self.opt.step(grad)
        self.version += 1
        every = self.config["checkpoint_every"]
        if every and self.version % every == 0:
            # the clocks of the pushes θ_j holds, not of those received and still deferred
            checkpoint.save(self.config["checkpoint_dir"], self.shard, self.version,
                            self.params, self.opt.state_dict(), self.applied)

    def memory_bytes(self):
        """{params, grads, optimizer, activations, peak} bytes this shard holds, all of it
        allocated when the server starts: θ_j (params); the W push slots and BSP's sum
        (grads: θ_j and the slots share one segment, so each row is counted by itself); the
        optimizer's state. No activations: a server runs no model."""
        ledger = Ledger()
        ledger.hold(params=self.memory.params.nbytes,
                    grads=self.memory.push.nbytes + array_bytes(self.sum),
                    optimizer=optimizer_bytes(self.opt))
        return ledger.as_dict()

    def records(self):
        return {"staleness": self.staleness, "pulls": self.pulls, "version": self.version,
                "applied": len(self.staleness),
                "updates": self.version - self.start_version, "clocks": self.clocks.copy(),
                "died": list(self.died)}


def serve(shard, lo, hi, params, workers, config_bytes, prefix, conns, control, threads):
    """The server process: answer messages until the caller says stop (or goes away)."""
    memory = server = None
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
        memory = ShardMemory(prefix, shard, hi - lo, workers, params.dtype)
        server = ShardServer(shard, params, conns, memory, cloudpickle.loads(config_bytes))
        readers, parent = {conn: w for w, conn in enumerate(conns)}, os.getppid()
        while os.getppid() == parent:
            for conn in wait([*readers, control], timeout=0.5):
                if conn is control:
                    try:
                        message = control.recv()
                    except (EOFError, OSError):
                        break  # the caller is gone
                    if message[0] == "stop":
                        control.send(("final", server.params, server.records()))
                        return
                    server.worker_died(message[1])
                    continue
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # that worker is gone; the caller will say so
                    del readers[conn]
                    continue
                server.handle(readers[conn], message)
        for path in glob.glob(f"/dev/shm/{prefix}_*"):  # the caller was killed: nobody
            with contextlib.suppress(FileNotFoundError):  # else will clean up
                os.unlink(path)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, then this process ends
        with contextlib.suppress(OSError):
            control.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        del server  # its views of θ_j must go before the segment can close
        if memory is not None:
            memory.close()
