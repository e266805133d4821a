"""`python -m minidist COMMAND`: tour (every strategy), train (one), doctor (what is here)."""

import argparse
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minidist import data, nn
from minidist.train import train

MODEL = [64, 128, 10]  # the digits MLP every command trains
SETTINGS = {"batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
TOUR = [("single", {}), ("distributed_gd", {}), ("data_parallel", {}),
        ("parameter_server", {"consistency": "bsp"})]
PROCESS_ONLY = {"parameter_server"}  # servers and workers are always OS processes


def _digits(seed):
    X, y = data.load_digits()
    return data.train_test_split(X, y, test_fraction=0.25, seed=seed)


def _model_fn(seed):
    return functools.partial(nn.mlp, MODEL, seed=seed)


def train_one(strategy="data_parallel", workers=4, backend="process", steps=300, seed=0,
              **options):
    """Train the digits MLP with one strategy; print and return its row of the table."""
    X_train, X_test, y_train, y_test = _digits(seed)
    start = time.perf_counter()
    hist = train(_model_fn(seed), X_train, y_train, strategy=strategy,
                 workers=1 if strategy == "single" else workers, backend=backend, steps=steps,
                 seed=seed, progress=True, **SETTINGS, **options)
    return hist, {"strategy": strategy, "workers": hist.workers, "backend": backend,
                  "final loss": float(hist.loss[-20:].mean()),
                  "test acc": hist.accuracy(X_test, y_test),
                  "seconds": time.perf_counter() - start,
                  "step ms (compute/comm)": f"{1e3 * np.median(hist.compute_time):.2f}/"
                                            f"{1e3 * np.median(hist.comm_time):.2f}",
                  "MB sent/worker": np.mean(hist.bytes_sent) / 1e6}


def tour(workers=4, backend="process", steps=300, seed=0, outdir="minidist-tour"):
    """Every strategy on the digits MLP: one table, and the figures saved as PNG."""
    import tqdm.auto  # noqa: F401 - imported before the clocks start (it is slow to import)

    print(f"the tour: the digits MLP {MODEL}, {steps} steps of {SETTINGS['batch_size']} "
          f"samples, SGD with momentum; {workers} workers on the {backend} backend\n")
    histories, rows = {}, []
    for strategy, options in TOUR:
        hist, row = train_one(strategy, workers,
                              "process" if strategy in PROCESS_ONLY else backend, steps, seed,
                              **options)
        histories[strategy], rows = hist, rows + [row]
    reference = histories["single"].params
    for row in rows:
        gap = np.max(np.abs(histories[row["strategy"]].params - reference))
        row["same as single"] = f"yes ({gap / np.max(np.abs(reference)):.0e})" \
            if gap <= 1e-10 * np.max(np.abs(reference)) else "no"
    print_table(rows)
    saved = save_figures(histories, rows, Path(outdir))
    print(f"\nfigures saved in {outdir}/: {', '.join(p.name for p in saved)}")
    return rows


def print_table(rows):
    columns = list(rows[0])
    formats = {"final loss": "{:.4f}", "test acc": "{:.1%}", "seconds": "{:.2f}",
               "MB sent/worker": "{:.2f}"}
    cells = [[formats.get(c, "{}").format(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def save_figures(histories, rows, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in histories.items():
        hist.plot(ax=ax, label=f"{name} ({hist.workers} workers)")
    ax.set(yscale="log", title="loss curves: the synchronous strategies overlap exactly")
    fig.savefig(outdir / "loss_curves.png", dpi=100, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["strategy"] for r in rows], [r["MB sent/worker"] for r in rows])
    ax.set(ylabel="MB sent per worker (mean)", title="communication per strategy")
    fig.savefig(outdir / "bytes_per_strategy.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return [outdir / "loss_curves.png", outdir / "bytes_per_strategy.png"]


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
    for name, text in [("tour", "every strategy on the digits MLP, one table and figures"),
                       ("demo", "the same as tour"),
                       ("train", "one strategy on the digits MLP")]:
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--workers", type=int, default=4)
        cmd.add_argument("--backend", default="process", choices=["thread", "process", "mpi"])
        cmd.add_argument("--steps", type=int, default=300)
        cmd.add_argument("--seed", type=int, default=0)
        if name == "train":
            cmd.add_argument("--strategy", default="data_parallel")
        else:
            cmd.add_argument("--outdir", default="minidist-tour")
    commands.add_parser("doctor", help="what is installed, and what to do about what is not")
    args = parser.parse_args(argv)
    if args.command in ("tour", "demo"):
        tour(args.workers, args.backend, args.steps, args.seed, args.outdir)
    elif args.command == "train":
        print_table([train_one(args.strategy, args.workers, args.backend, args.steps,
                               args.seed)[1]])
    else:
        doctor()
    return 0
