"""The device switch: which implementation of the ops `minidist.nn` and `minidist.optim` call.

    import minidist.kernels as K
    K.use("numpy")        # the readable reference (the default)
    K.ops().matmul(A, B)  # whatever device is selected

Devices: "numpy"; "cuda" (the Numba-CUDA kernels of `cuda.py`, on a real GPU, or in Numba's CUDA
simulator when NUMBA_ENABLE_CUDASIM=1 was set before numba was imported); "auto" (cuda on a real
GPU, else numpy).

Where the data lives decides too: `ops_for(*arrays)` gives the cuda ops as soon as one array is
a device array (a model built with device="cuda" keeps its buffers there), else the selected
device's. numba is imported only when "cuda" or "auto" is asked for, so a notebook can still turn
the simulator on after `import minidist`.
"""

import functools
import os
import subprocess
import sys
import threading

import numpy as np

from minidist.kernels import numpy_ops

_DEVICES = {"numpy": numpy_ops}
_current = "numpy"
_rank = threading.local()  # this thread's rank in a run, and whether its GPU was picked

SIMULATOR_HINT = (
    "To run the CUDA kernels without a GPU, turn on Numba's CUDA simulator before numba is first "
    "imported: start Python with NUMBA_ENABLE_CUDASIM=1 in the environment, or call "
    "minidist.kernels.setup_cuda() (or set os.environ['NUMBA_ENABLE_CUDASIM'] = '1') at the top "
    "of the notebook, before anything imports numba."
)


def available():
    """The names `use` accepts, besides "auto"."""
    return ("numpy", "cuda")


def _cuda_ops():
    """The cuda ops module, after checking that a GPU or the simulator can run it."""
    if "cuda" not in _DEVICES:
        from minidist.kernels import cuda as cuda_ops

        if cuda_ops.mode() is None:
            late = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
            why = (" NUMBA_ENABLE_CUDASIM=1 is set, but numba was imported before it was, so the "
                   "simulator is off: restart Python (or the notebook kernel) with it set first."
                   if late else "")
            raise RuntimeError(f"device 'cuda': no CUDA GPU here and Numba's CUDA simulator is "
                               f"off.{why} {SIMULATOR_HINT}")
        _DEVICES["cuda"] = cuda_ops
    return _DEVICES["cuda"]


def use(device):
    """Select the device for every following op; returns the previous one."""
    global _current
    if device is None:
        raise ValueError(f"use() needs a device name: {', '.join(available())} or 'auto'")
    previous, _current = _current, resolve(device)
    return previous


def device():
    """The selected device's name."""
    return _current


def resolve(device):
    """The device a model asking for `device` gets: None → the selected one; "auto" → cuda on a
    real GPU, else numpy; "cuda" only if a GPU or the simulator can run it (else an error)."""
    if device is None:
        return _current
    if device == "auto":
        return "cuda" if cuda_mode() == "gpu" else "numpy"
    if device not in available():
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(available())} or 'auto'")
    if device == "cuda":
        _cuda_ops()
        _pick_rank_device()
    return device


def bind_rank(rank):
    """This thread is rank `rank` of a run: its cuda models go on GPU rank mod (GPUs here).

    Called by a strategy's worker before it builds the model (Job.model), so rank k of a
    thread, process or MPI run uses GPU k mod count, and ranks share GPUs round-robin when
    there are fewer GPUs than ranks (the simulator has one)."""
    if getattr(_rank, "value", None) != int(rank):
        _rank.value, _rank.picked = int(rank), False


def _pick_rank_device():
    if getattr(_rank, "value", None) is not None and not _rank.picked:
        _rank.picked = True
        _DEVICES["cuda"].select_rank_device(_rank.value)


def ops(device=None):
    """The module of ops for `device` (default: the selected one)."""
    if device is None or device == _current:
        return _DEVICES[_current]
    if device == "cuda":
        return _cuda_ops()
    if device == "numpy":
        return numpy_ops
    raise ValueError(f"unknown device {device!r}; allowed: {', '.join(available())}")


def is_device_array(x):
    """True for a numba CUDA device array (or the simulator's stand-in for one)."""
    return type(x) is not np.ndarray and getattr(x, "__cuda_ndarray__", False)


def ops_for(*arrays):
    """The ops that can take these arrays: cuda if one lives on the device, else the selected."""
    for x in arrays:
        if type(x) is not np.ndarray and getattr(x, "__cuda_ndarray__", False):
            return _cuda_ops()
    return _DEVICES[_current]


def to_host(x):
    """A numpy copy of `x`, wherever it lives."""
    return x.copy_to_host() if is_device_array(x) else np.array(x, copy=True)


def assign(dst, src):
    """dst[...] = src, for host and device arrays of the same shape (device to device stays)."""
    if type(dst) is np.ndarray and type(src) is np.ndarray:  # the numpy path, kept as fast
        dst[...] = src
    elif is_device_array(dst):
        dst.copy_to_device(src if is_device_array(src) else np.ascontiguousarray(src, dst.dtype))
    else:
        dst[...] = to_host(src) if is_device_array(src) else src


def zeros_like(x):
    """An array of zeros with x's shape and dtype, on x's device."""
    if is_device_array(x):
        return _cuda_ops().zeros(x.shape, x.dtype)
    return np.zeros_like(x)


def cuda_mode():
    """"gpu", "simulator" or None: what the cuda device would run on in this process.

    If numba is not imported yet, a real GPU is looked for in a child process, so that the
    simulator can still be turned on here afterwards.
    """
    if "numba" in sys.modules:
        from minidist.kernels import cuda as cuda_ops

        return cuda_ops.mode()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "simulator"
    return "gpu" if _gpu_in_child_process() else None


@functools.cache
def _gpu_in_child_process(timeout=120):
    """Whether numba, imported in a fresh Python with the simulator off, sees a CUDA GPU."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    probe = "from numba import cuda; print(cuda.is_available())"
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.stdout.strip() == "True"


def setup_cuda():
    """Make the cuda device usable: keep a real GPU if there is one, else turn on the simulator.

    Call it before numba is imported (for example first thing in a notebook). Returns "gpu" or
    "simulator"; raises with the way out if numba was already imported without either.
    """
    if "numba" not in sys.modules and "NUMBA_ENABLE_CUDASIM" not in os.environ:
        if not _gpu_in_child_process():
            os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    _cuda_ops()
    return cuda_mode()
