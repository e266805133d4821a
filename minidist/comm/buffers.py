"""What a collective's buffers may be, and how a message header names their dtype.

Every call checks its arrays here, in the caller's thread, before it sends, queues or waits, so
bad input is a clear ValueError (TypeError) at once rather than a rank stuck or wrong bytes on
the wire. Separate from communicator.py because the transports (shm.py, mpi.py) need
`wire_dtype` too.
"""

import ml_dtypes
import numpy as np


def is_numeric(dtype):
    """bool, integer, float or complex, or bfloat16 (ml_dtypes; numpy sees it as kind "V")."""
    return dtype.kind in "biufc" or dtype == ml_dtypes.bfloat16


def wire_dtype(dtype):
    """What a message header says about `dtype`: numpy's code ("<f8"), or "bfloat16", whose
    code "<V2" would not say what the two bytes are; np.dtype reads either back (it knows
    "bfloat16" once ml_dtypes is imported, as it is here)."""
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.str


def check_buffer(array, what):
    """A collective's buffer must be a C-contiguous numeric numpy array."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} needs a numpy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} needs a C-contiguous array, got one with strides "
                         f"{array.strides}; pass np.ascontiguousarray(x)")
    if not is_numeric(array.dtype):
        raise ValueError(f"{what} needs a numeric dtype, got {array.dtype}")
    return array


def check_chunks(chunks, world_size):
    """all_to_all's chunks: a list (or tuple) of world_size buffers (check_buffer) with at least
    one axis, all of one dtype and one row shape (shape[1:]); only the rows may differ.
    Returns (the chunks as a new list, their dtype, their row shape)."""
    if not isinstance(chunks, (list, tuple)):
        raise TypeError(f"all_to_all needs a list of world_size={world_size} arrays (chunk j "
                        f"goes to rank j), got {type(chunks).__name__}")
    if len(chunks) != world_size:
        raise ValueError(f"all_to_all needs one chunk per rank, world_size={world_size}, got "
                         f"{len(chunks)} chunks")
    first = chunks[0]
    for j, chunk in enumerate(chunks):
        check_buffer(chunk, f"all_to_all chunk {j}")
        if chunk.ndim == 0:
            raise ValueError(f"all_to_all chunk {j} needs at least one axis (rows), got a 0-d "
                             f"array; pass x.reshape(1)")
        if chunk.dtype != first.dtype or chunk.shape[1:] != first.shape[1:]:
            raise ValueError(f"all_to_all chunks must share one dtype and row shape (only the "
                             f"first axis may differ): chunk 0 is {first.dtype} {first.shape}, "
                             f"chunk {j} is {chunk.dtype} {chunk.shape}")
    return list(chunks), first.dtype, first.shape[1:]
