"""Make the simulator's device arrays as strict as a real GPU's, and stricter about copies.

Numba's simulated device array wraps a numpy array and forwards every attribute, arithmetic
operator and numpy conversion to it, so code that does numpy maths on a device buffer, or
copies it without saying so, passes in the simulator. A real `DeviceNDArray` has no operators,
and `np.asarray`, an element read or an assignment from a host array each make a hidden copy
(which `kernels.cuda.transfers` would not count). Under `strict_device_arrays()` each of those
raises, so a strategy tested in the simulator does on a GPU what it did here.
"""

import contextlib
import threading

from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
from numba.cuda.simulator.kernel import BlockThread

# what numba's DeviceNDArray answers besides its methods FakeCUDAArray defines itself
REAL_ATTRIBUTES = {"dtype", "strides", "ndim", "size", "flags", "stream", "alloc_size",
                   "squeeze", "_ary", "__cuda_array_interface__"}
OPERATORS = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__sub__",
             "__mul__", "__floordiv__", "__truediv__", "__mod__", "__pow__")


class HiddenTransfer(AssertionError):
    """A host-device copy or host maths on a device array that a real GPU would not do freely."""


_inside = threading.local()  # depth of the explicit copies running on this thread
EXPLICIT_COPIES = ("copy_to_host", "copy_to_device")


def _in_kernel():
    """A simulated CUDA thread reads and writes the arrays it was given, and an explicit copy
    (counted by kernels.cuda) may convert what it copies: neither is a hidden transfer."""
    return (isinstance(threading.current_thread(), BlockThread)
            or getattr(_inside, "depth", 0) > 0)


def _explicit(original):
    def copy(self, *args, **kwargs):
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _inside.depth -= 1
    return copy


def _strict_getattr(self, name):
    if name not in REAL_ATTRIBUTES and not _in_kernel():
        raise HiddenTransfer(f"device arrays have no attribute {name!r} (a numpy method on a "
                             "device array: copy it to the host with kernels.to_host first)")
    return getattr(object.__getattribute__(self, "_ary"), name)


def _refuse(what, original=None):
    def method(self, *args, **kwargs):
        if original is not None and _in_kernel():
            return original(self, *args, **kwargs)
        raise HiddenTransfer(f"{what} on a device array: a real GPU array has no such "
                             "operation, or it would copy without being counted")
    return method


def _strict_getitem(original):
    def getitem(self, index):
        out = original(self, index)
        if not isinstance(out, FakeCUDAArray) and not _in_kernel():
            raise HiddenTransfer(f"reading element {index!r} of a device array copies it to "
                                 "the host uncounted")
        return out
    return getitem


def _strict_setitem(original):
    def setitem(self, index, value):
        if _in_kernel():
            return original(self, index, value)
        if not isinstance(value, FakeCUDAArray):
            raise HiddenTransfer("assigning a host value into a device array copies it over "
                                 "uncounted: use copy_to_device (kernels.assign)")
        return original(self, index, value._ary)
    return setitem


@contextlib.contextmanager
def strict_device_arrays():
    """Within: the simulator's device arrays refuse what a real one cannot do uncounted."""
    saved = {name: FakeCUDAArray.__dict__[name] for name in
             ("__getattr__", "__getitem__", "__setitem__", *OPERATORS, *EXPLICIT_COPIES)}
    for name in EXPLICIT_COPIES:
        setattr(FakeCUDAArray, name, _explicit(saved[name]))
    FakeCUDAArray.__getattr__ = _strict_getattr
    FakeCUDAArray.__getitem__ = _strict_getitem(saved["__getitem__"])
    FakeCUDAArray.__setitem__ = _strict_setitem(saved["__setitem__"])
    FakeCUDAArray.__array__ = _refuse("np.asarray (an uncounted copy to the host)",
                                      lambda self, *a, **k: self._ary.__array__(*a, **k))
    for name in OPERATORS:
        setattr(FakeCUDAArray, name, _refuse(f"the operator {name}", saved[name]))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(FakeCUDAArray, name, method)
        del FakeCUDAArray.__array__
