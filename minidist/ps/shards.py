"""Where parameter data lives: k contiguous shards of the flat buffer, each in shared memory.

Shard j holds parameters [lo_j, hi_j) (data.shard_bounds over n parameters and k servers).
Its segment `<prefix>_ps<j>` holds hi_j − lo_j numbers W + 1 times:

    params         θ_j itself: the server updates it in place; a worker whose pull the server
                   answered copies it out, then says "release"
    push slot w    worker w writes its gradient here, then tells the server to take it

Who may write is handed over by messages, so nothing is ever torn and no parameter or gradient
is pickled: messages carry only clocks and versions. The server never writes θ_j while a
worker is reading it (a readers-writer lock kept with messages), and the copy out is the
worker's work, not the server's: the server, the shared bottleneck, only applies updates.

A control segment `<prefix>_ctl` holds an abort word (set when a server dies, so waiting
workers stop with a clear error) and a status line per worker (what it is doing, for timeout
messages).
"""

import numpy as np

from minidist.comm.shm import attach
from minidist.data import shard_bounds

STATUS_BYTES = 128
ABORT_BYTES = 256


def bounds(n, num_servers):
    """[(lo, hi)] of each server's shard of n parameters."""
    return [shard_bounds(n, j, num_servers) for j in range(num_servers)]


class ShardMemory:
    """θ_j and the push slots of one shard, as numpy views (create=True: make the segment)."""

    def __init__(self, prefix, shard, length, workers, dtype, create=False):
        dtype = np.dtype(dtype)
        self.segment = attach(f"{prefix}_ps{shard}", create=create,
                              size=max(1, (workers + 1) * length * dtype.itemsize))
        slots = np.ndarray((workers + 1, length), dtype, buffer=self.segment.buf)
        self.params, self.push = slots[0], slots[1:]

    def close(self):
        self.params = self.push = None
        self.segment.close()


class Control:
    """The abort word and the worker status lines."""

    def __init__(self, prefix, workers, create=False):
        self.segment = attach(f"{prefix}_ctl", create=create,
                              size=ABORT_BYTES + workers * STATUS_BYTES)
        self.abort_line = np.ndarray((ABORT_BYTES,), np.uint8, self.segment.buf)
        self.status = np.ndarray((workers, STATUS_BYTES), np.uint8, self.segment.buf,
                                 ABORT_BYTES)

    def abort(self, message):
        data = message.encode()[:ABORT_BYTES - 1]
        self.abort_line[1:1 + len(data)] = np.frombuffer(data, np.uint8)
        self.abort_line[0] = 1

    def aborted(self):
        """The abort message, or None."""
        if not self.abort_line[0]:
            return None
        return bytes(self.abort_line[1:]).rstrip(b"\0").decode(errors="replace")

    def set_status(self, worker, text):
        self.status[worker] = np.frombuffer(
            text.encode()[:STATUS_BYTES - 1].ljust(STATUS_BYTES, b"\0"), np.uint8)

    def get_status(self, worker):
        return bytes(self.status[worker]).rstrip(b"\0").decode(errors="replace") or "starting"

    def close(self):
        self.abort_line = self.status = None
        self.segment.close()
