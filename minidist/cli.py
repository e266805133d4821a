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

MODEL = [64, 128, 64, 128, 10]  # the digits MLP every command trains: 7 layers, so it splits
SETTINGS = {"batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
# (row label, strategy, options); "workers" in the options: how many of the tour's workers it
# uses, from layout() (a pipeline cannot have more stages than layers, and so on)
TOUR = [("single", "single", {}), ("distributed_gd", "distributed_gd", {}),
        ("data_parallel", "data_parallel", {}),
        ("ps bsp", "parameter_server", {"consistency": "bsp"}),
        ("ps asp", "parameter_server", {"consistency": "asp"}),
        ("ps ssp s=2", "parameter_server", {"consistency": "ssp", "staleness": 2}),
        ("tensor_parallel", "tensor_parallel", {}),
        ("pipeline gpipe", "pipeline", {"schedule": "gpipe"}),
        ("pipeline 1f1b", "pipeline", {"schedule": "1f1b"}),
        ("hybrid", "hybrid", {})]
PROCESS_ONLY = {"parameter_server"}  # servers and workers are always OS processes
SYNCHRONOUS = {"single", "distributed_gd", "data_parallel", "tensor_parallel", "pipeline",
               "hybrid"}  # and the parameter server under BSP: they must match single
# relative parameter gap called "the same": the tests hold 1e-10 after 20-50 steps; over the
# tour's 300 steps with momentum, rounding differences (~1e-16 a step) grow to ~1e-10
TOLERANCE = 1e-8


def layout(strategy, workers):
    """(workers used, extra options) for `strategy` on at most `workers` ranks of MODEL."""
    widths = MODEL[1:-1]
    if strategy == "single":
        return 1, {}
    if strategy == "tensor_parallel":  # t must divide every hidden width
        return max(t for t in range(1, workers + 1) if all(w % t == 0 for w in widths)), {}
    if strategy == "pipeline":  # at most one stage per Linear layer
        return min(workers, len(MODEL) - 1), {"micro_batches": 4}
    if strategy == "hybrid":  # data parallel over tensor-parallel pairs
        tp = 2 if workers >= 4 and workers % 2 == 0 else 1
        return workers, {"dp": workers // tp, "tp": tp}
    return workers, {}


def _digits(seed):
    X, y = data.load_digits()
    return data.train_test_split(X, y, test_fraction=0.25, seed=seed)


def _model_fn(seed):
    return functools.partial(nn.mlp, MODEL, seed=seed)


def train_one(strategy="data_parallel", workers=4, backend="process", steps=300, seed=0,
              label=None, **options):
    """Train the digits MLP with one strategy; return its History and its row of the table."""
    X_train, X_test, y_train, y_test = _digits(seed)
    workers, extra = layout(strategy, workers)
    if strategy in PROCESS_ONLY:
        backend = "process"
    start = time.perf_counter()
    hist = train(_model_fn(seed), X_train, y_train, strategy=strategy, workers=workers,
                 backend=backend, steps=steps, seed=seed, progress=True, **SETTINGS,
                 **extra, **options)
    return hist, {"strategy": label or strategy, "workers": hist.workers, "backend": hist.backend,
                  "final loss": float(hist.loss[-20:].mean()),
                  "test acc": hist.accuracy(X_test, y_test),
                  "seconds": time.perf_counter() - start,
                  "step ms (compute/comm)": f"{1e3 * np.median(hist.compute_time):.2f}/"
                                            f"{1e3 * np.median(hist.comm_time):.2f}",
                  "MB sent/worker": np.mean(hist.bytes_sent) / 1e6}


def tour(workers=4, backend="process", steps=300, seed=0, outdir="minidist-tour"):
    """Every strategy on the digits MLP: one table, and the figures saved as PNG.

    Inside an mpiexec job (`mpiexec -n 4 python -m minidist tour --backend mpi`) every rank
    runs the MPI strategies together; rank 0 alone runs "single" and the parameter server (OS
    processes) while the others wait, and rank 0 prints the table. Returns the rows (None on
    the other ranks of an MPI job).
    """
    import tqdm.auto  # noqa: F401 - imported before the clocks start (it is slow to import)

    job = _mpi_job() if backend == "mpi" else None
    if job and job[1] != workers:
        raise ValueError(f"--workers {workers} inside an mpiexec job of {job[1]} ranks: "
                         f"pass --workers {job[1]}")
    root = job is None or job[0] == 0
    say = print if root else (lambda *args: None)
    say(f"the tour: the digits MLP {MODEL}, {steps} steps of {SETTINGS['batch_size']} "
        f"samples, SGD with momentum; {workers} workers on the {backend} backend\n")
    histories, rows, kept = {}, [], []
    for label, strategy, options in TOUR:
        every_rank = job is not None and strategy not in PROCESS_ONLY and strategy != "single"
        fits = layout(strategy, workers)[0]
        if every_rank and fits != workers:
            say(f"skipped {label}: this model splits over {fits} ranks, the MPI job has "
                f"{workers}")
            continue
        if root or every_rank:
            hist, row = train_one(strategy, workers, backend, steps, seed, label, **options)
            histories[label], rows, kept = hist, rows + [row], kept + [(label, strategy, options)]
        if job and not every_rank:
            _wait_for_rank_0(label)
    if not root:
        return None
    reference = histories["single"].params
    scale = np.max(np.abs(reference))
    for (label, strategy, options), row in zip(kept, rows, strict=True):
        gap = np.max(np.abs(histories[label].params - reference)) / scale
        if strategy in SYNCHRONOUS or options.get("consistency") == "bsp":
            row["same as single"] = f"yes ({gap:.0e})" if gap <= TOLERANCE else f"NO ({gap:.0e})"
        else:  # asynchronous: a different algorithm, expected to differ
            row["same as single"] = f"differs ({gap:.0e}): async"
    print_table(rows)
    saved = save_figures(histories, rows, Path(outdir))
    print(f"\nfigures saved in {Path(outdir).resolve()}/: {', '.join(p.name for p in saved)}")
    return rows


def _mpi_job():
    """(rank, size) of this process when mpiexec started it, else None."""
    from minidist.comm.mpi import MPIEXEC_ENV

    if not any(name in os.environ for name in MPIEXEC_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size


def _wait_for_rank_0(label, timeout=600.0):
    """Every rank of the MPI job waits here (napping, not spinning) until rank 0 is done."""
    from mpi4py import MPI

    request, deadline = MPI.COMM_WORLD.Ibarrier(), time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {MPI.COMM_WORLD.rank} waited {timeout} s for rank 0 "
                               f"to finish {label!r}")
        time.sleep(1e-3)


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
    """loss_curves.png, timelines.png (steps 10-11 of every strategy that records events) and
    bytes_per_strategy.png in outdir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = 10  # each point: the mean loss of 10 consecutive batches, so the curves read
    for name, hist in histories.items():
        smooth = np.convolve(hist.loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(hist.loss)), smooth,
                label=f"{name} ({hist.workers} worker{'s' if hist.workers > 1 else ''})")
    ax.set(yscale="log", xlabel="step", ylabel=f"training loss (mean of {window} batches)",
           title="loss curves: the synchronous strategies overlap exactly")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(outdir / "loss_curves.png", dpi=100, bbox_inches="tight")
    traced = {name: h for name, h in histories.items() if any(h.events)}
    fig, axes = plt.subplots(len(traced), 1, squeeze=False,
                             figsize=(10, sum(0.8 + 0.4 * h.workers for h in traced.values())))
    for ax, (name, hist) in zip(axes[:, 0], traced.items(), strict=True):
        steps = [t for t in (10, 11) if t < len(hist.loss)] or None
        hist.timeline(ax=ax, steps=steps)
        ax.set_title(f"{name} ({hist.workers} workers): steps {steps or 'all'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(outdir / "timelines.png", dpi=90, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([r["strategy"] for r in rows], [r["MB sent/worker"] for r in rows])
    ax.set(ylabel="MB sent per worker (mean)", title="communication per strategy")
    ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(outdir / "bytes_per_strategy.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return [outdir / name for name in ("loss_curves.png", "timelines.png",
                                       "bytes_per_strategy.png")]


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
