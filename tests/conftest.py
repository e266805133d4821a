import os
from pathlib import Path

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
