import functools
import glob
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Few examples, no deadline: the machines are 2 shared cores.
settings.register_profile("minidist", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minidist"))


def pytest_ignore_collect(collection_path, config):
    """Leave tests/cuda/ to its own pytest call (`make test` makes it): the CUDA simulator must
    be switched on before numba is first imported, which one shared process cannot promise."""
    cuda_dir = Path(__file__).parent / "cuda"
    if collection_path != cuda_dir:
        return None
    asked = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    return not any(path == cuda_dir or cuda_dir in path.parents for path in asked)


@functools.cache
def _small_mlp_problem(batch_size, steps):
    from minidist import data, nn, train

    X, y = data.make_classification(200, 8, 4, seed=0)
    model_fn = functools.partial(nn.mlp, [8, 16, 12, 16, 4], seed=1)
    kwargs = {"steps": steps, "batch_size": batch_size, "lr": 0.2,
              "optimizer_options": {"momentum": 0.5}}
    return model_fn, X, y, kwargs, train(model_fn, X, y, **kwargs)


@pytest.fixture(scope="session")
def small_mlp_problem():
    """small_mlp_problem(batch_size, steps) -> (model_fn, X, y, train kwargs, the single-process
    History): the 8-16-12-16-4 MLP the model-parallel tests split, each reference trained once."""
    return _small_mlp_problem


@pytest.fixture(scope="session")
def digits_reference():
    """(model_fn, X, y, train kwargs, History) of 50 single-process steps of SGD with momentum
    on the digits: the reference every synchronous strategy must reproduce."""
    from minidist import data, nn, train

    X, y = data.load_digits()
    model_fn = functools.partial(nn.mlp, [64, 32, 10], seed=0)
    kwargs = {"steps": 50, "batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
    return model_fn, X, y, kwargs, train(model_fn, X, y, **kwargs)


FAULTS_JSON = Path(__file__).parent / "artifacts" / "faults.json"


class FaultMatrix:
    """Rows of the fault matrix (docs/faults.md, rendered by tests/fault_matrix.py): each fault
    test records what it injected, on which backend, the outcome it asserted and the seconds
    until the run failed."""

    def __init__(self):
        self.rows = []

    def record(self, fault, backend, outcome, seconds, test=""):
        self.rows.append({"fault": str(fault), "backend": str(backend), "outcome": str(outcome),
                          "seconds": round(float(seconds), 3), "test": str(test)})


_FAULTS = FaultMatrix()


@pytest.fixture
def fault_matrix(request):
    """fault_matrix.record(fault, backend, outcome, seconds): a row of docs/faults.md, written
    to tests/artifacts/faults.json when the session ends (call it after the test's asserts)."""

    class _Recorder:
        def record(self, fault, backend, outcome, seconds):
            _FAULTS.record(fault, backend, outcome, seconds, test=request.node.nodeid)

    return _Recorder()


def pytest_sessionfinish(session, exitstatus):
    if _FAULTS.rows:
        import json

        FAULTS_JSON.parent.mkdir(exist_ok=True)
        rows = sorted(_FAULTS.rows, key=lambda r: (r["fault"], r["backend"]))
        FAULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")


def our_segments():
    """This process's shared-memory segments (the process launcher names them md<pid>_...)."""
    return set(glob.glob(f"/dev/shm/md{os.getpid()}_*"))


@pytest.fixture
def leaves_nothing_behind():
    """Fails the test if it leaves a shared-memory segment or a child process."""
    before = our_segments()
    yield
    assert our_segments() - before == set()
    assert mp.active_children() == []


def _mpi_processes():
    """MPI ranks of minidist (and their watchers) alive on this machine."""
    found = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            text = Path(cmdline).read_bytes()
        except OSError:
            continue
        if b"minidist.comm.mpi" in text or b"mpi_watch.py" in text:
            found.add(cmdline)
    return found


def _orphan_shm():
    """MPICH shared-memory files that no live process maps."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            mapped |= {line.split()[-1] for line in open(maps) if "/dev/shm/" in line}
        except OSError:
            pass
    return set(glob.glob("/dev/shm/mpich_shm_*")) - mapped


@pytest.fixture
def leaves_no_mpi_job_behind():
    """Fails the test if it leaves an MPI rank, a temp dir or MPICH shared memory behind."""
    procs, dirs = _mpi_processes(), set(glob.glob(f"{tempfile.gettempdir()}/minidist-mpi-*"))
    shm = _orphan_shm()
    yield
    deadline = time.monotonic() + 5
    while _mpi_processes() - procs and time.monotonic() < deadline:
        time.sleep(0.05)  # killed ranks are reaped by init, a moment later
    assert _mpi_processes() - procs == set()
    assert set(glob.glob(f"{tempfile.gettempdir()}/minidist-mpi-*")) - dirs == set()
    assert _orphan_shm() - shm == set()
