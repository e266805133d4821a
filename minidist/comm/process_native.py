"""The process backend's native collectives: straight out of the other ranks' shared memory.

No messages: each rank publishes where its array lies (a buffer from `alloc`, or a copy in its
shared scratch) and the others read it there. All-reduce and reduce-scatter reduce chunk r of
every rank's buffer at rank r; all-gather, broadcast and all-to-all copy what they need. Arrays
up to SMALL bytes go through double-buffered slots in the control segment instead, with one
barrier. Each call starts with `_meet`, a barrier on shared counters that also checks that all
ranks made the same call. Separate from process.py, which holds the message transport (rings,
feeder threads); `SharedMemoryCollectives` is a mixin of ProcessCommunicator and works on the
views its __init__ makes of the control segment: `flags` (barrier counters), `published` (each
rank's segment, offset, bytes and call digests), `small_slots`, `digests` and `call_rows`.
"""

import os
import threading
import time

import numpy as np

from minidist.comm import shm
from minidist.comm.calls import CALL_BYTES, Call
from minidist.comm.collectives import UFUNCS, exchanged_bytes, reduce_chunk
from minidist.comm.communicator import closing_error, deadline_error
from minidist.comm.shm import attach
from minidist.data import shard_bounds
from minidist.errors import CollectiveMismatchError

SPIN_BARRIER = 10_000  # a barrier yields this many times before it naps (50 µs at a time)
SMALL = shm.SMALL - CALL_BYTES  # data bytes of a small slot; its last CALL_BYTES hold a call


class SharedMemoryCollectives:
    """alloc and the native paths of ProcessCommunicator, over its shared control segment."""

    # ---- shared buffers ----------------------------------------------------------------------
    def alloc(self, shape, dtype=np.float64):
        """A zeroed array in this rank's shared memory: native collectives on it skip the
        copy-in, since the other ranks can read it where it lies."""
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        with self.alloc_lock:  # the progress thread allocates scratch (_publish): one name each
            segment = attach(f"{self.prefix}_r{self.rank}_{len(self.segments)}", True, nbytes)
            self.segments.append(segment)
        return np.ndarray(shape, dtype, segment.buf)

    def _locate(self, array):
        """(segment index, byte offset) of an array inside one of this rank's segments."""
        address = array.__array_interface__["data"][0]
        for index, segment in enumerate(self.segments):
            start = np.frombuffer(segment.buf, np.uint8).__array_interface__["data"][0]
            if start <= address and address + array.nbytes <= start + segment.size:
                return index, address - start
        return None

    def _peer_buffer(self, src):
        """(rank src's segment holding its published buffer, the buffer's offset, its bytes)."""
        index, offset, nbytes = self.published[src * 8:src * 8 + 3]
        if (src, index) not in self.peer_segments:
            self.peer_segments[(src, index)] = attach(f"{self.prefix}_r{src}_{index}")
        return self.peer_segments[(src, index)].buf, offset, nbytes

    def _peer_view(self, src, like):
        """Rank src's published buffer, as an array shaped and typed like `like` (_meet has
        checked that src's call, so its dtype and shape, is ours)."""
        buf, offset, _ = self._peer_buffer(src)
        return np.ndarray(like.shape, like.dtype, buf, offset)

    def _scratch(self, nbytes):
        """The first `nbytes` of this rank's shared scratch buffer (grown when too small)."""
        if self.scratch is None or self.scratch.nbytes < nbytes:
            self.scratch = self.alloc(max(nbytes, 1), np.uint8)
        return self.scratch[:nbytes]

    def _publish(self, array, private=None):
        """Make `array` readable by the other ranks, copying it into shared scratch if needed
        (all but its rows private = (lo, hi), which only this rank reads)."""
        place = self._locate(array)
        if place is None:
            shared = self._scratch(array.nbytes).view(array.dtype).reshape(array.shape)
            if private is None:
                shared[...] = array
            else:
                lo, hi = private
                shared[:lo], shared[hi:] = array[:lo], array[hi:]
            place = self._locate(shared)
        else:
            shared = array
        self.published[self.rank * 8:self.rank * 8 + 3] = _int64s(*place, array.nbytes)
        return shared

    # ---- barriers, and the native paths ------------------------------------------------------
    def _wait_all(self):
        """Barrier on shared counters: publish my count, wait until every rank reaches it."""
        self.barriers += 1
        self.flags[self.rank] = self.barriers
        deadline, spins = time.monotonic() + self.timeout, 0
        # the progress thread naps from the start: a spin would take the core from the compute
        # its op is meant to overlap (on 2 cores, the backward of the same rank)
        patient = SPIN_BARRIER if threading.current_thread() is not self._queue.thread else 0
        for src in range(self.world_size):
            while self.flags[src] < self.barriers:
                spins += 1
                if spins % 64 == 0 and (self._interrupted() or time.monotonic() > deadline):
                    what = f"rank {self.rank}: {self._op} waiting for rank {src}"
                    raise closing_error(what) if self._interrupted() else \
                        deadline_error(what, self.timeout)
                os.sched_yield() if spins < patient else time.sleep(50e-6)

    def _meet(self):
        """The first barrier of a native collective, which also checks that every rank made the
        same call: each rank first posts its call's digest (publish word 4 or 5) and text (the
        end of its small slot 0 or 1). Posts alternate between the two, so a rank's next native
        call cannot overwrite a post that a slower rank still reads (it must pass a barrier)."""
        call, parity = self._call, self.native_calls & 1
        self.native_calls += 1
        digests = self.digests[parity]
        digests[self.rank] = call.digest
        if self.posted[parity] is not call:  # the text only when it changed
            self.call_rows[parity][self.rank][:] = call.wire
            self.posted[parity] = call
        self._wait_all()
        for s in range(self.world_size):
            if digests[s] != call.digest:
                rows = self.call_rows[parity]
                raise CollectiveMismatchError.between(
                    self.rank, {r: Call.text_of(rows[r].tobytes()) for r in range(self.world_size)})

    def _native_barrier(self):
        self._meet()

    def _native_all_reduce(self, array, op):
        if array.nbytes <= SMALL:
            self._small_all_reduce(array, UFUNCS[op])
        else:
            self._large_all_reduce(array, UFUNCS[op])
        if op == "mean":
            array /= self.world_size
        return array

    def _slots(self, nbytes, dtype):
        """Every rank's small slot of the next set, as `nbytes` of `dtype`. Sets alternate, so a
        call cannot overwrite a slot that a slower rank still reads from the call before (to
        reuse a set, every rank must have passed the next call's _meet)."""
        parity = self.small_calls & 1
        self.small_calls += 1
        key = (parity, nbytes, dtype)
        slots = self.slot_views.get(key)
        if slots is None:
            slots = [slot[:nbytes].view(dtype) for slot in self.small_slots[parity]]
            self.slot_views = {**self.slot_views, key: slots} if len(self.slot_views) < 64 \
                else {key: slots}
        return slots

    def _small_all_reduce(self, array, ufunc):
        """One barrier: write my slot, then every rank reduces all slots in rank order (so all
        get identical bits)."""
        p, r, nbytes = self.world_size, self.rank, array.nbytes
        slots = self._slots(nbytes, array.dtype)
        flat = array.reshape(-1)
        np.copyto(slots[r], flat)
        self._meet()
        if p > 1:
            ufunc(slots[0], slots[1], out=flat)
        for s in range(2, p):
            ufunc(flat, slots[s], out=flat)
        self._count_native(sent=(p - 1) * nbytes, received=(p - 1) * nbytes)

    def _large_all_reduce(self, array, ufunc):
        """Reduce-scatter, then all-gather, straight out of the other ranks' shared buffers:
        rank r sums chunk r of every buffer into its own, then copies the other chunks from
        their owners. Three barriers keep the phases apart."""
        p, r = self.world_size, self.rank
        flat = self._publish(array).reshape(-1)
        self._meet()
        peers = {s: self._peer_view(s, flat) for s in range(p) if s != r}
        lo, hi = shard_bounds(flat.size, r, p)
        for theirs in peers.values():
            ufunc(flat[lo:hi], theirs[lo:hi], out=flat[lo:hi])
        self._wait_all()
        out = array.reshape(-1)
        if not np.shares_memory(out, flat):
            out[lo:hi] = flat[lo:hi]
        for s, theirs in peers.items():
            a, b = shard_bounds(flat.size, s, p)
            out[a:b] = theirs[a:b]
        self._wait_all()  # nobody may overwrite its buffer while others still read it
        moved = ((p - 1) * (hi - lo) + flat.size - (hi - lo)) * array.itemsize
        self._count_native(sent=moved, received=moved)

    def _native_broadcast(self, array, src):
        """The root publishes its buffer; every other rank copies it out."""
        if self.rank == src:
            self._publish(array)
        self._meet()
        if self.rank != src:
            array[...] = self._peer_view(src, array)
        self._wait_all()
        root = self.rank == src
        self._count_native(sent=(self.world_size - 1) * array.nbytes if root else 0,
                    received=0 if root else array.nbytes)
        return array

    def _share(self, array, private=None):
        """Every rank's `array` (rank s's at [s]), readable by all once _meet has passed: in the
        small slots when it fits one, else in published buffers (all but the rows `private`);
        then True: the caller must _wait_all after reading, so that nobody overwrites a buffer
        another still reads."""
        p, r = self.world_size, self.rank
        if array.nbytes <= SMALL:
            slots = [slot.reshape(array.shape) for slot in self._slots(array.nbytes, array.dtype)]
            np.copyto(slots[r], array)
            self._meet()
            return slots, False
        self._publish(array, private)
        self._meet()
        return [array if s == r else self._peer_view(s, array) for s in range(p)], True

    def _native_reduce_scatter(self, array, op):
        """My chunk of rows, reduced straight out of every rank's shared buffer (my own rows
        are not shared: only I read them)."""
        buffers, wait = self._share(array, shard_bounds(len(array), self.rank, self.world_size))
        chunk = reduce_chunk(self, buffers, op)
        if wait:
            self._wait_all()
        return chunk

    def _native_all_gather(self, array):
        """Every rank's array, copied straight out of its shared buffer."""
        buffers, wait = self._share(array)
        out = np.stack(buffers)
        if wait:
            self._wait_all()
        moved = (self.world_size - 1) * array.nbytes
        self._count_native(sent=moved, received=moved)
        return out

    def _native_all_to_all(self, chunks):
        """Each rank packs its chunks for the others into its shared scratch, after a header of
        p int64 row counts (0 for its own), and publishes it; then every rank copies its chunk
        out of every other rank's pack (at 8p + the bytes of the chunks before it)."""
        p, r, like = self.world_size, self.rank, chunks[0]
        row = like.itemsize * int(np.prod(like.shape[1:]))
        counts = np.array([0 if j == r else len(c) for j, c in enumerate(chunks)], np.int64)
        pack = self._scratch(8 * p + int(counts.sum()) * row)
        pack[:8 * p] = counts.view(np.uint8)
        at = 8 * p
        for j, chunk in enumerate(chunks):
            if j != r:
                pack[at:at + chunk.nbytes] = chunk.reshape(-1).view(np.uint8)
                at += chunk.nbytes
        self._publish(pack)
        self._meet()
        out = []
        for s in range(p):
            if s == r:
                out.append(chunks[r].copy())
                continue
            buf, offset, nbytes = self._peer_buffer(s)
            theirs = np.ndarray(nbytes, np.uint8, buf, offset)
            rows = theirs[:8 * p].view(np.int64)
            start = 8 * p + int(rows[:r].sum()) * row
            piece = theirs[start:start + int(rows[r]) * row].view(like.dtype)
            out.append(piece.reshape(int(rows[r]), *like.shape[1:]).copy())
        self._wait_all()  # nobody may overwrite its pack while others still read it
        self._count_native(*exchanged_bytes(r, chunks, out))
        return out


def _int64s(*values):
    """Python ints as the bytes of int64s, for writing into a 'q' memoryview slice."""
    return memoryview(np.array(values, np.int64)).cast("B").cast("q")
