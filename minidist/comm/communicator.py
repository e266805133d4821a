"""The Communicator: rank, world size, point-to-point messages and the collectives.

A backend (thread, process, mpi) supplies only the transport, `_transport_send` and
`_transport_recv`, and may add native fast paths (`_native_all_reduce`, ...). Every collective
is written once, over `send` and `recv`, in `collectives.py`; arrays are checked in buffers.py.

Message semantics: `send` never waits for the receiver (the message is buffered, and the array
may be reused at once), only, like every blocking call, for this rank's pending async ops;
`recv` waits at most `timeout` seconds. Messages between two ranks with the same tag arrive in
the order they were sent.

Every rank checks that all ranks make the same collective call (same collective, arguments,
dtype and shape), always, for a few bytes: each message sent inside a collective carries the
sender's call (calls.py: a short text in the header), and `recv` compares it with its own;
native paths compare the calls' digests through shared memory (or MPI) before touching any data.
Debug mode adds a round through rank 0 before each collective (calls.check_fingerprint).

Async ops (`async_op=True` on all_reduce, broadcast, all_gather, reduce_scatter, all_to_all)
run the same code on the rank's progress thread (work.py); every blocking call first waits for
them. Split groups are `SubCommunicator`s (subcommunicator.py).
"""

import functools
import time

import ml_dtypes
import numpy as np

from minidist.comm import collectives, custom
from minidist.comm.buffers import check_buffer, check_chunks
from minidist.comm.calls import COLLECTIVE_TAG, NO_CALL, TAG_LIMIT, Call, CollectiveCall
from minidist.comm.stats import Stats
from minidist.comm.work import AsyncOps, Progress
from minidist.errors import CollectiveMismatchError, CommTimeout, clock

REDUCE_OPS = ("sum", "mean", "max", "min")
ALGORITHMS = ("naive", "tree", "ring", "recursive_doubling", "native", "auto")


class Communicator(AsyncOps):
    """One rank's view of a group of `world_size` ranks."""

    backend = "base"

    def __init__(self, rank, world_size, timeout=60.0, debug=False, context=0):
        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank!r}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout, self.debug, self.context = timeout, debug, context
        self.stats = Stats()
        self._op = None  # the collective in progress, if any
        self._call = NO_CALL  # its Call
        self._seq = 0  # collectives called so far
        self._splits = 0
        self._tick, self._user_code = None, {}  # see _returned
        self._queue = Progress(self.rank)  # this rank's async ops (work.py)
        self._closing = False  # set by _interrupt: the progress thread must stop

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.world_size}>"

    # ---- what a backend supplies -------------------------------------------------------------
    def _transport_send(self, array, dst, tag, call):
        """Send `array` and `call` (a Call: the collective it is part of, or NO_CALL)."""
        raise NotImplementedError

    def _transport_recv(self, src, tag, timeout):
        """(array, raw bytes of the sender's call)."""
        raise NotImplementedError

    def _set_status(self, text):
        """Record what this rank is doing, so a timeout can say where each rank was stuck."""

    def _returned(self, after=None):
        """Back in user code, `after` a call returned (None: at the start): say so, and since
        when. Each text is made once per tenth of a second, so this costs a dict lookup."""
        tick = time.time_ns() // 100_000_000
        if tick != self._tick:
            self._tick, self._user_code = tick, {}
        text = self._user_code.get(after)
        if text is None:
            text = f"running user code since {clock(tick / 10)}" + (f", after {after}" if after
                                                                    else "")
            self._user_code[after] = text
        self._set_status(text)

    def _count_native(self, sent, received):
        """Native paths send no messages: count the bytes they copy between ranks."""
        op = self.stats[self._op]
        op.bytes_sent += sent
        op.bytes_received += received

    def alloc(self, shape, dtype=np.float64):
        """A zeroed array that this backend can communicate fastest (the process backend
        places it in shared memory, so native collectives read it where it lies)."""
        return np.zeros(shape, dtype)

    # ---- point to point ----------------------------------------------------------------------
    def send(self, array, dst, tag=0):
        """Send `array` to rank `dst`; returns without waiting for the receiver (but after this
        rank's pending async ops, like every blocking call)."""
        array = self._check_message(array, dst, tag, "dst")
        if self._queue.busy:
            self._queue.settle("send", self.timeout)
        wire = self._wire_tag(tag)
        op = self.stats[self._op or "send"]
        op.bytes_sent += array.nbytes
        op.messages += 1
        if self._op is None:
            self._set_status(f"send to rank {dst}")
            self._transport_send(array, dst, wire, NO_CALL)
            self._returned(f"send to rank {dst}")
        else:
            self._set_status(f"{self._op}: send to rank {dst}")
            self._transport_send(array, dst, wire, self._call)

    def recv(self, src, tag=0, timeout=None):
        """Receive the next array from rank `src` with `tag`, waiting at most `timeout` s.
        Inside a collective, the sender's call must be this rank's: else CollectiveMismatchError."""
        self._check_message(None, src, tag, "src")
        if self._queue.busy:
            self._queue.settle("recv", self.timeout)
        self._set_status(f"{self._op}: recv from rank {src}" if self._op
                         else f"recv from rank {src}")
        timeout = self.timeout if timeout is None else timeout
        array, call = self._transport_recv(src, self._wire_tag(tag), timeout)
        self.stats[self._op or "recv"].bytes_received += array.nbytes
        if self._op is None:
            self._returned(f"recv from rank {src}")
        elif call != self._call.raw:
            raise CollectiveMismatchError.between(
                self.rank, {self.rank: self._call.text, src: Call.text_of(call)})
        return array

    def _check_message(self, array, peer, tag, name):
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.world_size:
            raise ValueError(f"{name} must be a rank in [0, {self.world_size}), got {peer!r}")
        if peer == self.rank:
            raise ValueError(f"rank {self.rank} cannot send to or receive from itself")
        if not isinstance(tag, (int, np.integer)) or not 0 <= tag < TAG_LIMIT:
            raise ValueError(f"tag must be an integer in [0, 2**30), got {tag!r}")
        return None if array is None else check_buffer(array, "send")

    def _wire_tag(self, tag):
        """Inside a collective, every message carries the collective's own tag."""
        if self._op is not None:
            tag = COLLECTIVE_TAG + self._seq % 2**16
        return (self.context << 32) | tag

    # ---- collectives -------------------------------------------------------------------------
    def _collective(self, name, array=None, *details):
        """`with self._collective(...)`: describe, count, time and (in debug mode) fingerprint
        one call. `details`: (argument, value) pairs that all ranks must pass alike."""
        return CollectiveCall(self, name, array, details)

    def _algorithm(self, name, algorithm, allowed, default):
        """(the function that runs `name` with `algorithm`, the algorithm's name); "auto"
        prefers the native one."""
        if callable(algorithm):
            raise ValueError(f"{name}: algorithm must be one of {', '.join(allowed)}; only "
                             "all_reduce takes a function of yours")
        if algorithm not in allowed:
            raise ValueError(f"unknown algorithm {algorithm!r} for {name}; "
                             f"allowed: {', '.join(allowed)}")
        native = getattr(self, f"_native_{name}", None)
        if algorithm == "native" and native is None:
            raise ValueError(f"{self!r} ({self.backend} backend) has no native {name}")
        if algorithm in ("native", "auto") and native is not None:
            return native, "native"
        algorithm = default if algorithm == "auto" else algorithm
        return functools.partial(getattr(collectives, f"{name}_{algorithm}"), self), algorithm

    @staticmethod
    def _check_op(op, array):
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown op {op!r}; allowed: {', '.join(REDUCE_OPS)}")
        if op == "mean" and not (array.dtype.kind in "fc" or array.dtype == ml_dtypes.bfloat16):
            raise ValueError(f"op='mean' needs a float array, got {array.dtype}")

    def broadcast(self, array, src=0, algorithm="auto", async_op=False):
        """Copy rank src's array into every rank's `array` (in place); returns it (async_op:
        a Work whose wait() returns it)."""
        check_buffer(array, "broadcast")
        self._check_root(src, "src")
        run, how = self._algorithm("broadcast", algorithm, ("tree", "native", "auto"), "tree")

        def body():
            with self._collective("broadcast", array, ("src", src), ("algorithm", how)):
                run(array, src)
            return array
        return self._start("broadcast", body, async_op)

    def reduce(self, array, dst=0, op="sum"):
        """Rank dst's `array` becomes the elementwise op over all ranks' arrays (in place)."""
        check_buffer(array, "reduce")
        self._check_root(dst, "dst")
        self._check_op(op, array)
        with self._collective("reduce", array, ("dst", dst), ("op", op)):
            collectives.reduce_tree(self, array, dst, op)
        return array

    def all_reduce(self, array, op="sum", algorithm="auto", async_op=False):
        """Every rank's `array` becomes the elementwise op over all ranks' arrays (in place);
        returns it (async_op: a Work whose wait() returns it). algorithm: one of ALGORITHMS,
        or your own function fn(comm, array) that sums (custom.py)."""
        check_buffer(array, "all_reduce")
        self._check_op(op, array)
        run, how = (custom.all_reduce(self, algorithm, op) if callable(algorithm)
                    else self._algorithm("all_reduce", algorithm, ALGORITHMS, "ring"))

        def body():
            with self._collective("all_reduce", array, ("op", op), ("algorithm", how)):
                run(array, op)
            return array
        return self._start("all_reduce", body, async_op)

    def all_gather(self, array, algorithm="auto", async_op=False):
        """Returns every rank's array stacked by rank: shape (world_size, *array.shape)
        (async_op: a Work whose wait() returns it)."""
        check_buffer(array, "all_gather")
        run, how = self._algorithm("all_gather", algorithm, ("ring", "native", "auto"), "ring")

        def body():
            with self._collective("all_gather", array, ("algorithm", how)):
                return run(array)
        return self._start("all_gather", body, async_op)

    def reduce_scatter(self, array, op="sum", algorithm="auto", async_op=False):
        """Reduce over ranks, then return this rank's chunk of rows (axis 0 split as in
        data.shard: the first len(array) mod p ranks get one row more; `array` is left as it
        was; async_op: a Work whose wait() returns it). algorithm: "ring" (collectives.py) or
        "native" (the backend's own, which "auto" prefers)."""
        check_buffer(array, "reduce_scatter")
        self._check_op(op, array)
        if array.ndim == 0:
            raise ValueError("reduce_scatter needs an array with at least one axis to split")
        run, how = self._algorithm("reduce_scatter", algorithm, ("ring", "native", "auto"),
                                   "ring")

        def body():
            with self._collective("reduce_scatter", array, ("op", op), ("algorithm", how)):
                return run(array, op)
        return self._start("reduce_scatter", body, async_op)

    def all_to_all(self, chunks, algorithm="auto", async_op=False):
        """Send chunks[j] to rank j; returns the list of arrays received, item i from rank i
        (item `rank`: a copy of my own chunk; async_op: a Work whose wait() returns the list).
        Chunks may differ in rows (axis 0), per destination and per rank, but every chunk of
        every rank must have the same dtype and row shape. Rank r sends Σ_{j≠r} bytes of
        chunks[j]. algorithm: "pairwise" (collectives.py) or "native" ("auto" prefers it)."""
        chunks, dtype, row = check_chunks(chunks, self.world_size)
        run, how = self._algorithm("all_to_all", algorithm, ("pairwise", "native", "auto"),
                                   "pairwise")
        rows = f"{dtype} of shape ({', '.join(['*', *map(str, row)])})"  # what all ranks share

        def body():
            with self._collective("all_to_all", None, ("algorithm", how), ("chunks", rows)):
                return run(chunks)
        return self._start("all_to_all", body, async_op)

    def gather(self, array, dst=0):
        """Rank dst gets every rank's array stacked by rank; other ranks get None."""
        check_buffer(array, "gather")
        self._check_root(dst, "dst")
        with self._collective("gather", array, ("dst", dst)):
            return collectives.gather(self, array, dst)

    def scatter(self, array=None, src=0):
        """Rank src passes an array of shape (world_size, ...); every rank gets its row (of
        src's dtype; the other ranks' `array` is not used)."""
        self._check_root(src, "src")
        if self.rank == src:
            check_buffer(array, "scatter")
            if array.ndim == 0 or array.shape[0] != self.world_size:
                raise ValueError(f"scatter: rank {src} must pass an array with a leading axis of "
                                 f"world_size={self.world_size}, got shape {array.shape}")
        with self._collective("scatter", None, ("src", src)):
            return collectives.scatter(self, array, src)

    def barrier(self, algorithm="auto"):
        """Return only when every rank has called barrier ("dissemination": ⌈lg p⌉ rounds of
        empty messages; "native": the backend's own, e.g. counters in shared memory)."""
        run, how = self._algorithm("barrier", algorithm, ("dissemination", "native", "auto"),
                                   "dissemination")
        with self._collective("barrier", None, ("algorithm", how)):
            run()

    def split(self, color, key=None):
        """Ranks that pass the same color form a new communicator, ordered by (key, rank)."""
        if not isinstance(color, (int, np.integer)) or color < 0:
            raise ValueError(f"color must be an integer >= 0, got {color!r}")
        key = self.rank if key is None else key
        table = self.all_gather(np.array([color, key, self.rank], dtype=np.int64), "ring")
        members = [int(r) for c, k, r in sorted(table.tolist(), key=lambda t: (t[1], t[2]))
                   if c == color]
        self._splits += 1
        context = (self.context * 1_000_003 + self._splits) % 2**31
        from minidist.comm.subcommunicator import SubCommunicator  # (it imports this module)

        return SubCommunicator(self, members, context)

    def _check_root(self, root, name):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.world_size:
            raise ValueError(f"{name} must be a rank in [0, {self.world_size}), got {root!r}")


def deadline_error(what, timeout):
    """The CommTimeout a rank raises when one of its own receives waits too long."""
    return CommTimeout(f"{what}: nothing arrived within {timeout} s")


def closing_error(what):
    """What a wait on the progress thread raises when its rank ends the run (_interrupt)."""
    return RuntimeError(f"{what}: interrupted, since the rank is ending its run")
