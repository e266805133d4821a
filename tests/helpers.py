"""Small helpers shared by test files (import them as `from helpers import ...`: pytest puts
tests/ on sys.path)."""

import importlib.util
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_file(relative, name):
    """The module in the file ROOT/relative (a script, not importable by name), as `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_threads_left(before, seconds=20.0):
    """Names of the thread backend's rank threads still alive `seconds` after the call (or
    none, as soon as they have all ended); `before`: threading.enumerate() before the run."""
    deadline = time.monotonic() + seconds
    while (ranks := [t.name for t in set(threading.enumerate()) - set(before)
                     if t.name.startswith("minidist-rank-")]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return ranks
