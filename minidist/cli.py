"""`python -m minidist COMMAND`: tour (every strategy), train (one), doctor (what is here),
exercises (the coursework) and check (grade a lesson's exercises)."""

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from minidist.tour import MODEL, STEPS, TOUR, layout, print_table, tour, train_one

# the tour lives in minidist/tour.py; its names still import from here
__all__ = ["MODEL", "TOUR", "doctor", "layout", "main", "print_table", "tour", "train_one"]


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
    for name, text in [("tour", "every strategy on one model (--model): one table and figures"),
                       ("demo", "the same as tour"),
                       ("train", "one strategy on one model (--model)")]:
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--model", default="mlp", choices=["mlp", "gpt"],
                         help="mlp: the digits MLP; gpt: a tiny character GPT on the "
                              "standard library's docstrings (default: mlp)")
        cmd.add_argument("--workers", type=int, default=4)
        cmd.add_argument("--backend", default="process", choices=["thread", "process", "mpi"])
        cmd.add_argument("--steps", type=int, default=None,
                         help=f"default: {STEPS['mlp']} (mlp), {STEPS['gpt']} (gpt)")
        cmd.add_argument("--seed", type=int, default=0)
        if name == "train":
            cmd.add_argument("--strategy", default="data_parallel")
        else:
            cmd.add_argument("--outdir", default="minidist-tour")
    commands.add_parser("doctor", help="what is installed, and what to do about what is not")
    commands.add_parser("exercises", help="every lesson's exercises: what each asks you to build")
    grade = commands.add_parser(
        "check", help="grade a lesson's exercises in your .py file(s), notebooks or folders "
                      "(without a path: the reference solutions); exit code 1 if any fails")
    grade.add_argument("lesson", help="the lesson: its number (3 or 03) or name (collectives)")
    grade.add_argument("paths", nargs="*", help="submissions: .py or .ipynb files, or folders "
                                                "of them, defining the exercises' names")
    grade.add_argument("--json", metavar="FILE", help="write the gradebook to FILE")
    grade.add_argument("--timeout", type=float, default=600.0,
                       help="seconds a submission may take before it is stopped (default 600)")
    args = parser.parse_args(argv)
    if args.command in ("exercises", "check"):
        from minidist.exercises import catalog, grading

        if args.command == "exercises":
            print(grading.listing())
            return 0
        try:
            catalog.lesson_number(args.lesson)
            grading.submissions(args.paths)
            if not args.timeout > 0:
                raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
            if args.json and not Path(args.json).resolve().parent.is_dir():
                raise ValueError(f"--json: no folder {Path(args.json).resolve().parent} to "
                                 "write the gradebook in")
        except (ValueError, FileNotFoundError) as exc:
            parser.error(str(exc))
        return grading.check(args.lesson, args.paths, args.json, args.timeout)
    if args.command in ("tour", "demo"):
        tour(args.workers, args.backend, args.steps, args.seed, args.outdir, args.model)
    elif args.command == "train":
        print_table([train_one(args.strategy, args.workers, args.backend, args.steps,
                               args.seed, model=args.model)[1]])
    else:
        doctor()
    return 0
