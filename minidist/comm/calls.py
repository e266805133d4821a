"""What one rank passed to a collective, in a form every rank can compare cheaply.

All ranks of a collective must make the same call: the same collective, with the same arguments
(op, root, algorithm), on arrays of the same dtype and shape (for all_gather and gather: the same
contribution; for scatter only the root passes an array, so only the root and the call count).
So that no rank computes with bytes it misreads, each message inside a collective carries its
sender's call as CALL_BYTES of text, which the receiver compares with its own; native paths
compare 8-byte digests in shared memory or through MPI, and read the texts only to say who
called what.
"""

import functools
import hashlib

import numpy as np

CALL_BYTES = 128  # a call's description, as message headers carry it


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
