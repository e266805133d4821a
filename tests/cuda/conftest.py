"""The CUDA kernels' tests: `pytest tests/cuda`, a pytest call of its own (`make test` runs it).

Numba reads NUMBA_ENABLE_CUDASIM once, when it is first imported, so this conftest decides
before anything imports numba: a real GPU is used if there is one, otherwise the simulator is
switched on. Tests marked `gpu` (larger sizes) run only on a real GPU.
"""

import sys

import pytest

from minidist import kernels

if "numba" in sys.modules and kernels.cuda_mode() is None:
    raise pytest.UsageError("numba was imported before tests/cuda/conftest.py could turn on the "
                            "CUDA simulator: run `pytest tests/cuda` on its own")
MODE = kernels.setup_cuda()  # "gpu" or "simulator"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (sizes too big to simulate)")


def pytest_report_header(config):
    return f"minidist cuda tests: running on the {MODE}"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a real CUDA GPU; this run uses Numba's simulator")
    for item in items:
        if "gpu" in item.keywords and MODE != "gpu":
            item.add_marker(skip)
