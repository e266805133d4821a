"""Shared-memory plumbing for the process backend: byte rings between ranks, and their layout.

One control segment, created by the launcher before the ranks start, holds for p ranks:

    status board   p × 128 bytes      what each rank is doing (read by the launcher on a timeout)
    flags          p × 64 bytes       a counter per rank, for the barrier of the native paths
    publish        p × 64 bytes       where each rank's buffer lies, for the native paths
    small slots    p × 2 × SMALL      double-buffered slots for small native all-reduces
    rings          p(p−1) × (128 + C) one byte ring per ordered pair (src, dst)

A ring is a circular buffer of C bytes with two counters that only grow: `head` (bytes ever
written, advanced by the sender) and `tail` (bytes ever read, advanced by the receiver).
Bytes free = C − (head − tail). The sender copies the bytes in, then advances head; the
receiver copies them out, then advances tail: each counter has exactly one writer.
"""

import _posixshmem  # what multiprocessing.shared_memory opens segments with
import mmap
import os

import numpy as np

from minidist.comm.buffers import wire_dtype

STATUS_BYTES = 128
LINE = 64  # bytes per flag / publish record: one cache line, so ranks do not share lines
SMALL = 64 * 1024
RING_HEADER = 128  # head at byte 0, tail at byte 64
MESSAGE_HEADER = 128  # wire tag, ndim, nbytes, shape[9], then the dtype string (32 bytes)
MAX_NDIM = 9


def ring_capacity(world_size):
    """C: 4 MiB for 2 ranks, shrinking so the rings of a big world stay under ~64 MiB."""
    pairs = max(1, world_size * (world_size - 1))
    return int(np.clip(64 * 2**20 // pairs, 64 * 1024, 4 * 2**20)) // 4096 * 4096


class Layout:
    """Byte offsets of everything in the control segment."""

    def __init__(self, world_size, capacity):
        p = world_size
        self.world_size, self.capacity = p, capacity
        self.status = 0
        self.flags = self.status + p * STATUS_BYTES
        self.publish = self.flags + p * LINE
        self.small = self.publish + p * LINE
        self.rings = self.small + p * 2 * SMALL
        self.ring_bytes = RING_HEADER + capacity
        self.total = self.rings + p * (p - 1) * self.ring_bytes

    def ring_offset(self, src, dst):
        """Rings are numbered src·(p−1) + (dst with src skipped)."""
        index = src * (self.world_size - 1) + (dst if dst < src else dst - 1)
        return self.rings + index * self.ring_bytes


class Ring:
    """One direction src → dst of a byte ring living in shared memory `buf` at `offset`."""

    def __init__(self, buf, offset, capacity):
        self.capacity = capacity
        self.counters = np.ndarray((RING_HEADER // 8,), np.uint64, buffer=buf, offset=offset)
        self.data = np.ndarray((capacity,), np.uint8, buffer=buf, offset=offset + RING_HEADER)

    def free(self):
        return self.capacity - int(self.counters[0] - self.counters[8])

    def available(self):
        return int(self.counters[0] - self.counters[8])

    def put(self, chunk):
        """Copy `chunk` (uint8, at most free() bytes) in at head, then advance head."""
        head = int(self.counters[0])
        self._copy(head, chunk, into_ring=True)
        self.counters[0] = head + len(chunk)

    def get(self, out):
        """Copy len(out) bytes (at most available()) out at tail, then advance tail."""
        tail = int(self.counters[8])
        self._copy(tail, out, into_ring=False)
        self.counters[8] = tail + len(out)

    def _copy(self, position, buf, into_ring):
        start = position % self.capacity
        first = min(len(buf), self.capacity - start)  # up to the end of the ring, then wrap
        for ring_part, buf_part in ((self.data[start:start + first], buf[:first]),
                                    (self.data[:len(buf) - first], buf[first:])):
            if into_ring:
                ring_part[...] = buf_part
            else:
                buf_part[...] = ring_part


def encode_header(wire_tag, array):
    """128 bytes that tell the receiver the tag, shape and dtype of the payload that follows."""
    if array.ndim > MAX_NDIM:
        raise ValueError(f"send supports arrays of at most {MAX_NDIM} dimensions, "
                         f"got {array.ndim}")
    header = np.zeros(MESSAGE_HEADER, dtype=np.uint8)
    fields = header[:96].view(np.int64)
    fields[:3] = wire_tag, array.ndim, array.nbytes
    fields[3:3 + array.ndim] = array.shape
    dtype = wire_dtype(array.dtype).encode()
    header[96:96 + len(dtype)] = np.frombuffer(dtype, dtype=np.uint8)
    return header


def decode_header(header):
    """(wire tag, shape, dtype, nbytes) from encode_header's bytes."""
    fields = header[:96].view(np.int64)
    tag, ndim, nbytes = (int(v) for v in fields[:3])
    shape = tuple(int(v) for v in fields[3:3 + ndim])
    dtype = np.dtype(bytes(header[96:]).rstrip(b"\0").decode())
    return tag, shape, dtype, nbytes


def attach(name, create=False, size=0):
    """Open shared-memory segment `name` (create=True: make it, `size` bytes) and map it.

    Not through multiprocessing's SharedMemory: before Python 3.13 it registers every segment
    it opens with the resource tracker, which the ranks share and which keeps a *set* of names,
    so two ranks mapping one segment unbalance it (one unregister drops the name, a second one
    prints a KeyError), and turning registration off meant patching the module under every
    thread of the process. The launcher, which outlives every rank, unlinks a run's segments
    itself, even after a rank was killed.
    """
    if create and not size > 0:
        raise ValueError(f"a new shared-memory segment needs size > 0 bytes, got {size!r}")
    path = f"/{name}"
    fd = _posixshmem.shm_open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0),
                              mode=0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    except OSError:
        if create:
            _posixshmem.shm_unlink(path)
        raise
    finally:
        os.close(fd)  # the mapping keeps the memory
    return Segment(name, mapping)


class Segment:
    """A mapped shared-memory segment: `buf` (a memoryview of it), `size`, and close()."""

    def __init__(self, name, mapping):
        self.name, self.size, self._mapping = name, len(mapping), mapping
        self.buf = memoryview(mapping)

    def close(self):
        """Unmap (BufferError while an array still views `buf`); unlinking is the launcher's."""
        self.buf.release()
        self._mapping.close()
