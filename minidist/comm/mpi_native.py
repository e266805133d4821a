"""The MPI backend's native collectives: MPI's own, non-blocking and polled, so they time out.

Iallreduce, Ibcast, Iallgather, Ireduce_scatter(_block) and Ialltoallv, each started, then
waited for by polling its request (`_wait`, over MPICommunicator._poll), so that a waiting rank
gives its core away and every wait ends at the timeout. MPI answers mismatched sizes with wrong
numbers rather than an error, so each call first all-gathers the 8-byte digests of every rank's
call (`_agree`). Where MPI has no reduction for a dtype and op, the ring of collectives.py runs.
Separate from mpi.py, which holds the messages, the failure reports and the run under mpiexec;
`MPICollectives` is a mixin of MPICommunicator (it uses its `mpi`, `_poll` and `_call`).
mpi4py is imported inside the functions: importing it starts MPI, which MPICommunicator does.
"""

import itertools
import time

import numpy as np

from minidist.comm import collectives
from minidist.comm.calls import CALL_BYTES, Call
from minidist.data import shard_bounds
from minidist.errors import CollectiveMismatchError


def _as_bytes(array):
    """A byte view of a contiguous array: MPI moves any dtype's bytes for bcast and gather."""
    return array.reshape(-1).view(np.uint8)


def _starts(sizes):
    """Where each of `sizes` starts when they lie one after another: 0, s0, s0 + s1, …"""
    return [0, *itertools.accumulate(sizes)][:-1]


def _mpi_op(dtype, op):
    """MPI's reduction for (dtype, op), or None where MPI has none (then the ring runs)."""
    from mpi4py import MPI
    from mpi4py.util.dtlib import from_numpy_dtype
    try:
        from_numpy_dtype(dtype)
    except (KeyError, ValueError, TypeError):
        return None
    if dtype.kind == "b":  # numpy's add and maximum on booleans are a logical or
        return {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND}[op]
    if dtype.kind == "c" and op in ("max", "min"):
        return None
    return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


class MPICollectives:
    """The native paths of MPICommunicator, and the digest check that each one starts with."""

    def _wait(self, request):
        self._poll(request.Test, time.monotonic() + self.timeout, self.timeout,
                   f"{self._op}: MPI did not complete it")

    def _agree(self):
        """MPI gives wrong numbers, not an error, when ranks pass different sizes or call
        different collectives; so each native call first all-gathers the digests of every
        rank's call (8 bytes each) and, only if they differ, the calls, to name them."""
        call, p = self._call, self.world_size
        digests = np.empty(p, np.int64)
        self._wait(self.mpi.Iallgather(np.array([call.digest], np.int64), digests))
        if (digests != call.digest).any():
            rows = np.empty((p, CALL_BYTES), np.uint8)
            self._wait(self.mpi.Iallgather(call.wire.copy(), rows))
            raise CollectiveMismatchError.between(
                self.rank, {r: Call.text_of(rows[r].tobytes()) for r in range(p)})

    # ---- native collectives: MPI's own, non-blocking and polled, so they time out too ---------
    # MPI does not report the bytes it moves; stats get the ring model's count for this rank
    # (the bytes algorithm="ring" would move here), or, for broadcast, n bytes out of the root
    # and n bytes into every other rank.
    def _count(self, name, sent, received, messages):
        op = self.stats[name]
        op.bytes_sent, op.bytes_received = op.bytes_sent + sent, op.bytes_received + received
        op.messages += messages

    def _native_all_reduce(self, array, op):
        from mpi4py import MPI

        self._agree()
        mpi_op = _mpi_op(array.dtype, op)
        if mpi_op is None:  # complex max/min, non-native byte order: the ring does it
            return collectives.all_reduce_ring(self, array, op)
        self._set_status(f"all_reduce: MPI Iallreduce over {self.world_size} ranks")
        self._wait(self.mpi.Iallreduce(MPI.IN_PLACE, array, mpi_op))
        if op == "mean":
            array /= self.world_size
        # the ring sends every chunk but r, then every chunk but r+1; it receives every chunk
        # but r-1, then every chunk but r (chunk c has n // p elements, + 1 if c < n mod p)
        p, r, n = self.world_size, self.rank, array.size
        before, mine, after = (n // p + ((r + k) % p < n % p) for k in (-1, 0, 1))
        self._count("all_reduce", (2 * n - mine - after) * array.itemsize,
                    (2 * n - before - mine) * array.itemsize, 2 * (p - 1))
        return array

    def _native_broadcast(self, array, src):
        self._agree()
        self._set_status(f"broadcast: MPI Ibcast from rank {src}")
        self._wait(self.mpi.Ibcast(_as_bytes(array), root=src))
        if self.world_size > 1:
            root = self.rank == src
            self._count("broadcast", array.nbytes * root, array.nbytes * (not root), int(root))
        return array

    def _native_all_gather(self, array):
        out = np.empty((self.world_size, *array.shape), dtype=array.dtype)
        self._agree()
        self._set_status(f"all_gather: MPI Iallgather over {self.world_size} ranks")
        self._wait(self.mpi.Iallgather(_as_bytes(array), _as_bytes(out)))
        n = (self.world_size - 1) * array.nbytes
        self._count("all_gather", n, n, self.world_size - 1)
        return out

    def _native_reduce_scatter(self, array, op):
        """MPI's Ireduce_scatter_block when the rows split evenly, else Ireduce_scatter with
        each rank's count of elements (rows as data.shard_bounds splits them)."""
        self._agree()
        mpi_op = _mpi_op(array.dtype, op)
        if mpi_op is None:
            return collectives.reduce_scatter_ring(self, array, op)
        p, rows = self.world_size, len(array)
        bounds = [shard_bounds(rows, c, p) for c in range(p)]
        lo, hi = bounds[self.rank]
        chunk = np.empty((hi - lo, *array.shape[1:]), array.dtype)
        self._set_status(f"reduce_scatter: MPI Ireduce_scatter over {p} ranks")
        if rows % p == 0:
            self._wait(self.mpi.Ireduce_scatter_block(array, chunk, mpi_op))
        else:
            row = array.size // rows
            counts = [(b - a) * row for a, b in bounds]
            self._wait(self.mpi.Ireduce_scatter(array, chunk, counts, mpi_op))
        if op == "mean":
            chunk /= p
        self._count("reduce_scatter", *collectives.reduce_scatter_traffic(self, array), p - 1)
        return chunk

    def _native_all_to_all(self, chunks):
        """MPI's Ialltoall of the row counts first (a receiver must know what comes), then
        Ialltoallv of the chunks' bytes, packed by destination; counted as pairwise counts."""
        from mpi4py import MPI

        self._agree()
        p, like = self.world_size, chunks[0]
        row = like.itemsize * int(np.prod(like.shape[1:]))
        sent_rows, got_rows = np.array([len(c) for c in chunks], np.int64), np.empty(p, np.int64)
        self._set_status(f"all_to_all: MPI Ialltoall, Ialltoallv over {p} ranks")
        self._wait(self.mpi.Ialltoall(sent_rows, got_rows))
        send, sizes = ([n * row for n in rows.tolist()] for rows in (sent_rows, got_rows))
        pack, got = np.concatenate([_as_bytes(c) for c in chunks]), np.empty(sum(sizes), np.uint8)
        self._wait(self.mpi.Ialltoallv([pack, (send, _starts(send)), MPI.BYTE],
                                       [got, (sizes, _starts(sizes)), MPI.BYTE]))
        out = [got[d:d + n].view(like.dtype).reshape(rows, *like.shape[1:])
               for d, n, rows in zip(_starts(sizes), sizes, got_rows.tolist(), strict=True)]
        self._count("all_to_all", *collectives.exchanged_bytes(self.rank, chunks, out), p - 1)
        return out
