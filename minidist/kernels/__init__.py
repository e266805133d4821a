"""The device switch: which implementation of the ops `minidist.nn` and `minidist.optim` call.

    import minidist.kernels as K
    K.use("numpy")        # the readable reference (the default without a GPU)
    K.ops().matmul(A, B)  # whatever device is selected

Devices: "numpy", and "auto" (the best available; today that is numpy). The Numba-CUDA kernels
(issue: GPU kernels) will register "cuda" here behind the same function names.
"""

from minidist.kernels import numpy_ops

_DEVICES = {"numpy": numpy_ops}
_current = "numpy"


def available():
    """The names `use` accepts, besides "auto"."""
    return tuple(_DEVICES)


def use(device):
    """Select the device for every following op; returns the previous one."""
    global _current
    if device == "auto":
        device = "numpy"
    if device not in _DEVICES:
        hint = (
            " The Numba-CUDA kernels are not in this version of minidist yet."
            if device == "cuda"
            else ""
        )
        raise ValueError(
            f"unknown device {device!r}; allowed: {', '.join(available())} or 'auto'.{hint}"
        )
    previous, _current = _current, device
    return previous


def device():
    """The selected device's name."""
    return _current


def ops():
    """The module of ops for the selected device."""
    return _DEVICES[_current]
