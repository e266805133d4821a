"""`python -m minidist COMMAND`: demo (train on digits, print a table), doctor (what is here)."""

import argparse
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import time

import numpy as np

from minidist import data, nn
from minidist.train import train


def demo(steps=600, seed=0):
    """Train three models on the digits and print one table; returns the rows."""
    X, y = data.load_digits()
    X_train, X_test, y_train, y_test = data.train_test_split(X, y, test_fraction=0.25, seed=seed)
    runs = [
        ("logistic regression", functools.partial(nn.logistic_regression, 64, 10, seed=seed),
         "sgd", 0.5, {}),
        ("MLP 64-128-10", functools.partial(nn.mlp, [64, 128, 10], seed=seed),
         "sgd", 0.1, {"momentum": 0.9}),
        ("MLP 64-128-10", functools.partial(nn.mlp, [64, 128, 10], seed=seed),
         "adam", 0.003, {}),
    ]
    print(f"digits: {len(X_train)} training and {len(X_test)} test images, "
          f"{steps} steps of 64 samples, one process\n")
    rows = []
    for name, model_fn, opt, lr, options in runs:
        start = time.perf_counter()
        hist = train(model_fn, X_train, y_train, steps=steps, batch_size=64, lr=lr,
                     optimizer=opt, optimizer_options=options, seed=seed, progress=True)
        rows.append((name, f"{opt} lr={lr}", hist.loss[-20:].mean(),
                     hist.accuracy(X_train, y_train), hist.accuracy(X_test, y_test),
                     time.perf_counter() - start))
    header = f"{'model':<20} {'optimizer':<14} {'final loss':>10} {'train acc':>9} " \
             f"{'test acc':>8} {'seconds':>7}"
    print(header)
    print("-" * len(header))
    for name, opt, loss, acc_train, acc_test, secs in rows:
        print(f"{name:<20} {opt:<14} {loss:>10.4f} {acc_train:>9.1%} {acc_test:>8.1%} "
              f"{secs:>7.2f}")
    print("\n(final loss: the mean over the last 20 training batches)")
    return rows


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mpi_library():
    """The MPI library's version line, asked in a child process so a broken MPI cannot hang us."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
            capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "importing mpi4py.MPI did not finish in 30 s"
    if out.returncode:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1]
    return out.stdout.strip().splitlines()[0], None


def doctor():
    """Print what minidist can use on this machine, and what to do about each missing piece."""
    lines, todo = [], []
    lines.append(f"python        {platform.python_version()} ({sys.executable})")
    for pkg in ["minidist", "numpy", "numba", "numba-cuda", "matplotlib", "ipywidgets",
                "cloudpickle", "threadpoolctl", "tqdm", "jupyterlab", "mpi4py", "mpich", "torch"]:
        version = _version(pkg)
        lines.append(f"{pkg:<13} {version or 'not installed'}")
    if not _version("jupyterlab"):
        todo.append("lessons: pip install 'minidist[lessons]' (or run `make lab`)")
    lines.append(f"cpu cores     {os.cpu_count()}")

    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    gpu = False
    if not simulator:
        from numba import cuda

        gpu = cuda.is_available()
    lines.append(f"cuda gpu      {'yes' if gpu else 'no'}")
    lines.append(f"cuda sim      {'on (NUMBA_ENABLE_CUDASIM=1)' if simulator else 'off'}")
    if not gpu and not simulator:
        todo.append("no CUDA GPU: the CUDA kernels can still run in Numba's simulator; start "
                    "Python with NUMBA_ENABLE_CUDASIM=1 set (before numba is imported)")

    mpi, why = _mpi_library()
    lines.append(f"mpi           {mpi or 'not usable'}")
    if not mpi:
        todo.append(f"MPI backend: pip install 'minidist[mpi]' ({why})")
    print("\n".join(lines))
    print("\nto do:" if todo else "\neverything minidist can use is here.")
    for item in todo:
        print(f"  - {item}")
    return not todo


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minidist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="train on the digits and print a table")
    demo_cmd.add_argument("--steps", type=int, default=600)
    demo_cmd.add_argument("--seed", type=int, default=0)
    commands.add_parser("doctor", help="what is installed, and what to do about what is not")
    args = parser.parse_args(argv)
    np.seterr(all="raise")
    if args.command == "demo":
        demo(args.steps, args.seed)
    else:
        doctor()
    return 0
