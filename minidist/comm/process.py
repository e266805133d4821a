"""The process backend: one OS process per rank, messages through shared-memory rings.

`send` copies the message (a header, the collective call it is part of, the data) into the ring
to the destination when it fits, and otherwise hands a private copy to a feeder thread that
streams it in as the receiver makes room; either way it returns at once. `recv` copies bytes out
of the ring from the source, sleeping on a semaphore while the ring is empty. The native
collectives skip messages altogether: every rank reduces its chunk (all-reduce, reduce-scatter)
or copies what it needs (all-gather, broadcast, all-to-all) straight out of the other ranks'
shared buffers (process_native.py).
"""

import os
import threading
import time
from collections import defaultdict, deque

import numpy as np

from minidist.comm import shm
from minidist.comm.calls import CALL_BYTES
from minidist.comm.communicator import Communicator, closing_error, deadline_error
from minidist.comm.process_native import SMALL, SharedMemoryCollectives
from minidist.comm.shm import attach

SPINS = 200  # recv polls this many times (yielding the core) before it sleeps on the doorbell
HEADER = shm.MESSAGE_HEADER + CALL_BYTES  # a message's header, then the call it is part of


class Outbox:
    """This rank's sending end of one ring, with a feeder thread for messages that do not fit."""

    def __init__(self, ring, doorbell, space, timeout):
        self.ring, self.doorbell, self.space, self.timeout = ring, doorbell, space, timeout
        self.queue, self.busy, self.error = deque(), False, None
        self.cond = threading.Condition()
        self.thread = None

    def send(self, header, payload):
        with self.cond:
            if self.error:
                raise self.error
            if not self.queue and not self.busy and \
                    self.ring.free() >= len(header) + len(payload):
                self.ring.put(header)
                self.ring.put(payload)
                self.doorbell.release()
                return
            self.queue.append((header, payload.copy()))
            if self.thread is None:
                self.thread = threading.Thread(target=self._feed, daemon=True)
                self.thread.start()
            self.cond.notify()

    def _feed(self):
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                header, payload = self.queue[0]
                self.busy = True
            try:
                for part in (header, payload):
                    self._stream(part)
            except Exception as exc:  # noqa: BLE001 - reported by the next send or by flush
                with self.cond:
                    self.error, self.busy = exc, False
                    self.cond.notify_all()
                return
            with self.cond:
                self.queue.popleft()
                self.busy = False
                self.cond.notify_all()

    def _stream(self, part):
        position, deadline = 0, time.monotonic() + self.timeout
        while position < len(part):
            free = self.ring.free()
            if free == 0:
                if not self.space.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise deadline_error("send: the receiver made no room", self.timeout)
                continue
            step = min(free, len(part) - position)
            self.ring.put(part[position:position + step])
            self.doorbell.release()
            position += step

    def flush(self):
        """Wait until everything queued is in the ring (the receiver may read it later)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.error or (not self.queue and not self.busy),
                                      self.timeout):
                raise deadline_error("flush: queued messages were not taken", self.timeout)
            if self.error:
                raise self.error


class ProcessCommunicator(SharedMemoryCollectives, Communicator):
    backend = "process"

    def __init__(self, rank, world_size, prefix, capacity, timeout, debug, doorbells, spaces):
        super().__init__(rank, world_size, timeout, debug)
        self.prefix, p = prefix, world_size
        self.layout = layout = shm.Layout(p, capacity)
        self.control = attach(f"{prefix}_ctl")
        buf = self.control.buf
        # int64 cells read and written through memoryviews: cheaper than numpy scalars
        words = shm.LINE // 8
        self.flags = buf[layout.flags:layout.publish].cast("q")[::words]  # one per rank
        self.published = buf[layout.publish:layout.small].cast("q")  # rank s: s·8 … s·8+7
        self.small_slots = [[np.ndarray(shm.SMALL, np.uint8, buf,
                                        layout.small + (2 * s + parity) * shm.SMALL)
                             for s in range(p)] for parity in (0, 1)]
        self.doorbell = doorbells[rank]
        self.outboxes = {d: Outbox(shm.Ring(buf, layout.ring_offset(rank, d), capacity),
                                   doorbells[d], spaces[rank][d], timeout)
                         for d in range(p) if d != rank}
        self.inboxes = {s: (shm.Ring(buf, layout.ring_offset(s, rank), capacity), spaces[s][rank])
                        for s in range(p) if s != rank}
        self.stash = defaultdict(deque)  # (src, tag) -> arrays that arrived before they were asked
        self.segments, self.peer_segments = [], {}  # this rank's buffers; peers' ones, mapped
        self.alloc_lock = threading.Lock()
        self.scratch = None
        self.barriers = self.small_calls = 0
        start = layout.status + rank * shm.STATUS_BYTES
        self.status_row, self.status_bytes = buf[start:start + shm.STATUS_BYTES], {}
        self.slot_views = {}  # (parity, nbytes, dtype) -> every rank's slot as that array
        self.native_calls, self.posted = 0, [None, None]  # see _meet
        self.digests = [self.published[4::8], self.published[5::8]]  # [parity][rank]
        self.call_rows = [[slot[SMALL:] for slot in slots] for slots in self.small_slots]
        self._returned()

    def _set_status(self, text):
        data = self.status_bytes.get(text)
        if data is None:  # statuses repeat ("all_reduce", "idle", ...): encode each once
            data = text.encode()[: shm.STATUS_BYTES - 1].ljust(shm.STATUS_BYTES, b"\0")
            if len(self.status_bytes) >= 1024:  # "running user code since <time>" changes
                self.status_bytes.clear()
            self.status_bytes[text] = data
        self.status_row[:] = data

    # ---- messages --------------------------------------------------------------------------
    def _transport_send(self, array, dst, tag, call):
        header = np.concatenate((shm.encode_header(tag, array), call.wire))
        self.outboxes[dst].send(header, array.reshape(-1).view(np.uint8))

    def _transport_recv(self, src, tag, timeout):
        deadline = time.monotonic() + timeout
        while not self.stash[(src, tag)]:
            header = np.empty(HEADER, np.uint8)
            self._read(src, header, deadline, timeout)
            got_tag, shape, dtype, nbytes = shm.decode_header(header[:shm.MESSAGE_HEADER])
            array = np.empty(shape, dtype)
            self._read(src, array.reshape(-1).view(np.uint8), deadline, timeout)
            self.stash[(src, got_tag)].append((array, header[shm.MESSAGE_HEADER:].tobytes()))
        return self.stash[(src, tag)].popleft()

    def _read(self, src, out, deadline, timeout):
        ring, space = self.inboxes[src]
        position, spins = 0, 0
        while position < len(out):
            available = ring.available()
            if available == 0:
                if spins < SPINS:  # a reply often comes within microseconds: yield, re-check
                    spins += 1
                    os.sched_yield()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise deadline_error(f"rank {self.rank}: recv from rank {src}", timeout)
                if self._interrupted():
                    raise closing_error(f"rank {self.rank}: recv from rank {src}")
                self.doorbell.acquire(timeout=left)  # any sender's write wakes us; re-check
                continue
            step = min(available, len(out) - position)
            ring.get(out[position:position + step])
            space.release()
            position += step

    def flush(self):
        for outbox in self.outboxes.values():
            outbox.flush()

    def _interrupt(self):
        super()._interrupt()
        self.doorbell.release()  # wake a recv asleep on it: it sees _interrupted()

    def close(self):
        """Stop the progress thread; let go of every view into shared memory, then unmap it (the
        launcher unlinks)."""
        self._end_async(wait=False)
        self.outboxes = self.inboxes = self.small_slots = self.call_rows = self.scratch = None
        self.slot_views, self.status_row = {}, None
        for view in [*self.digests, self.flags, self.published]:
            view.release()
        for segment in [self.control, *self.segments, *self.peer_segments.values()]:
            try:
                segment.close()
            except BufferError:  # an array from alloc() is still referenced: unmapped at exit
                pass
