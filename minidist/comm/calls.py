"""What one rank passed to a collective, in a form every rank can compare cheaply.

All ranks of a collective must make the same call: the same collective, with the same arguments
(op, root, algorithm), on arrays of the same dtype and shape (for all_gather and gather: the same
contribution; for scatter only the root passes an array, so only the root and the call count).
So that no rank computes with bytes it misreads, each message inside a collective carries its
sender's call as CALL_BYTES of text, which the receiver compares with its own; native paths
compare 8-byte digests in shared memory or through MPI, and read the texts only to say who
called what. `CollectiveCall` is the context a Communicator runs each collective in; in debug
mode it first compares every rank's call through rank 0 (`check_fingerprint`).
"""

import functools
import hashlib
import time

import numpy as np

from minidist.errors import CollectiveMismatchError

CALL_BYTES = 128  # a call's description, as message headers carry it
# the tags a call's messages travel under (below a group's context, the wire tag's high bits)
TAG_LIMIT = 2**30  # user tags lie in [0, TAG_LIMIT)
COLLECTIVE_TAG = TAG_LIMIT  # + the collective's sequence number mod 2^16
FINGERPRINT_TAG = TAG_LIMIT + 2**20  # debug mode's round through rank 0 (check_fingerprint)


class Call:
    """One rank's collective call, as the ranks compare it: `text` ("all_reduce(op=sum,
    algorithm=ring) on a float64 array of shape (10,)"), `raw` (text in CALL_BYTES bytes, as
    message headers carry it), `wire` (raw as a uint8 array) and `digest` (a 64-bit hash of
    text, as an int64: what shared memory and MPI compare)."""

    __slots__ = ("text", "raw", "wire", "digest")

    def __init__(self, text):
        data = text.encode()
        digest = hashlib.blake2b(data, digest_size=8).digest()
        if len(data) > CALL_BYTES:  # cut, and end with the digest: still unique
            data = data[:CALL_BYTES - 17] + b"~" + digest.hex().encode()
        self.text, self.raw = text, data.ljust(CALL_BYTES, b"\0")
        self.wire = np.frombuffer(self.raw, np.uint8)
        self.digest = int.from_bytes(digest, "little", signed=True)

    @staticmethod
    def text_of(raw):
        """The text of a call that came as raw bytes."""
        return raw.rstrip(b"\0").decode(errors="replace")


NO_CALL = Call("")  # what a message sent outside any collective carries


@functools.lru_cache(maxsize=1024)
def describe(name, dtype, shape, details):
    """The Call of collective `name` with `details` ((argument, value) pairs) on an array of
    `dtype` and `shape` (None: no array)."""
    text = f"{name}({', '.join(f'{k}={v}' for k, v in details)})"
    if dtype is not None:
        text += f" on {'an' if dtype.name[0] == 'i' else 'a'} {dtype} array of shape {shape}"
    return Call(text)


class CollectiveCall:
    """`with CollectiveCall(comm, name, array, details)`: one collective call on `comm`: wait for
    its async ops, describe it (comm._call), check it (debug mode), count and time it. A
    collective built from others counts as one (a class: cheaper than @contextmanager)."""

    __slots__ = ("comm", "name", "array", "details", "start", "outer")

    def __init__(self, comm, name, array, details):
        self.comm, self.name, self.array, self.details = comm, name, array, details

    def __enter__(self):
        comm, array = self.comm, self.array
        if comm._queue.busy:
            comm._queue.settle(self.name, comm.timeout)
        self.outer = comm._op is None  # a collective built from others counts as one
        if self.outer:
            comm._seq += 1
            comm._call = describe(self.name, None, None, self.details) if array is None \
                else describe(self.name, array.dtype, array.shape, self.details)
            if comm.debug:
                check_fingerprint(comm)
            comm._op = self.name
            self.start = time.perf_counter()
            comm.stats[self.name].calls += 1
            comm._set_status(comm._call.text)

    def __exit__(self, *exc):
        if self.outer:
            comm = self.comm
            comm._op = None
            comm.stats[self.name].seconds += time.perf_counter() - self.start
            if exc[0] is None:  # on an error the status keeps saying where the rank was
                comm._returned(self.name)


def check_fingerprint(comm):
    """Debug mode: rank 0 compares every rank's (sequence number, call) first, so ranks
    that call different collectives, even ones that never message each other, are named."""
    mine = f"collective #{comm._seq} {comm._call.text}"
    wire = (comm.context << 32) | FINGERPRINT_TAG

    def send(text, dst):
        comm._transport_send(np.frombuffer(text.encode(), np.uint8), dst, wire, NO_CALL)

    def recv(src):
        return bytes(comm._transport_recv(src, wire, comm.timeout)[0]).decode()

    comm._set_status(f"debug fingerprint of {mine}")
    if comm.rank == 0:
        prints = [mine] + [recv(r) for r in range(1, comm.world_size)]
        verdict = "" if len(set(prints)) == 1 else "\n".join(
            f"  rank {r}: {p}" for r, p in enumerate(prints))
        for r in range(1, comm.world_size):
            send(verdict, r)
    else:
        send(mine, 0)
        verdict = recv(0)
    if verdict:
        raise CollectiveMismatchError(f"ranks disagree on a collective call:\n{verdict}")
