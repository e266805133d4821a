"""Communication of device buffers: through a twin in host memory the backend can send.

The communicators move host (numpy) arrays. A buffer on the GPU goes down into its host twin,
the collective runs there, and the result comes back up:

    device ──copy_to_host──▶ host twin ──all_reduce──▶ host twin ──copy_to_device──▶ device

The twin is what the backend sends fastest: shared memory on the process backend (its native
collectives read it in place), page-locked (pinned) memory otherwise, which a GPU copies to and
from at full speed without a bounce buffer. A part (a bucket) is staged alone, so a bucket's
all-reduce can start while the backward still writes the next one. `copies` counts each copy
and its bytes, per rank: an all-reduce of a part costs one copy down and one up.
"""

from minidist import kernels


class HostStaging:
    """A device buffer (1-D or any shape) and its host twin on `comm`."""

    def __init__(self, comm, device_buffer):
        if not kernels.is_device_array(device_buffer):
            raise ValueError("HostStaging stages a device array (a model built with "
                             f"device='cuda'); got {type(device_buffer).__name__}")
        self.comm, self.device = comm, device_buffer
        self.host = _host_twin(comm, device_buffer.shape, device_buffer.dtype)
        self.copies = {"to_host": 0, "to_device": 0, "bytes": 0}

    def down(self, part=slice(None)):
        """host[part] ← device[part]; returns the host part."""
        self.device[part].copy_to_host(self.host[part])
        self._count("to_host", part)
        return self.host[part]

    def up(self, part=slice(None)):
        """device[part] ← host[part]."""
        self.device[part].copy_to_device(self.host[part])
        self._count("to_device", part)

    def all_reduce(self, part=slice(None), op="sum", algorithm="auto"):
        """device[part] ← op over the ranks' device[part]: down, all_reduce, up."""
        self.comm.all_reduce(self.down(part), op, algorithm)
        self.up(part)

    def broadcast(self, src=0):
        """Every rank's device buffer ← rank src's (src copies down, the others up)."""
        if self.comm.rank == src:
            self.down()
        self.comm.broadcast(self.host, src)
        if self.comm.rank != src:
            self.up()

    def _count(self, direction, part):
        self.copies[direction] += 1
        self.copies["bytes"] += self.host[part].nbytes


def _host_twin(comm, shape, dtype):
    if comm.backend == "process" or kernels.cuda_mode() != "gpu":
        return comm.alloc(shape, dtype)
    from numba import cuda

    twin = cuda.pinned_array(shape, dtype)
    twin[...] = 0
    return twin


def staged_copies(*stagings):
    """The copies of several stagings added up ({"to_host", "to_device", "bytes"})."""
    total = {"to_host": 0, "to_device": 0, "bytes": 0}
    for staging in stagings:
        for key, value in staging.copies.items():
            total[key] += value
    return total
