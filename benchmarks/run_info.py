"""What every benchmark's results file begins with: the command, when, the machine, the load.

    report = {**run_info("zero.py", argv, load_before, started, torch), ...the figures...}

`load_before` is os.getloadavg() and `started` time.perf_counter(), both taken before the
measurements: the load averages before and after show how busy the shared machine was.
"""

import os
import platform
import sys
import time

import numpy as np


def run_info(script, argv, load_before, started, torch=None):
    """{command, when, machine, load_average_before, load_average_after, seconds}."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": torch.__version__ if torch else None, "numpy": np.__version__},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }


def add_quiet_options(parser, wait, busy, retries):
    """--quiet-wait, --busy, --retries: how a benchmark waits for, and repeats around, other
    processes on a shared machine (the defaults are each benchmark's own)."""
    parser.add_argument("--quiet-wait", type=float, default=wait, metavar="SECONDS",
                        help="before each run, wait up to this long for the other processes "
                             "to keep fewer than --busy cores busy; 0: no wait")
    parser.add_argument("--busy", type=float, default=busy, metavar="CORES",
                        help="a run during which other processes kept this many cores busy "
                             "is repeated (--retries times at most; the quietest is kept)")
    parser.add_argument("--retries", type=int, default=retries, help="repeats of a disturbed run")


def peer_options(parser, results, name, torch_peers="the PyTorch peers"):
    """--repeats, --no-torch, the quiet-wait options and --out, as the benchmarks that run
    peers side by side take them (results/name.json and .png go to --out)."""
    parser.add_argument("--repeats", type=int, help="runs per peer (default 3, quick 1)")
    parser.add_argument("--no-torch", action="store_true", help=f"leave {torch_peers} out")
    add_quiet_options(parser, wait=0.0, busy=0.5, retries=0)
    parser.add_argument("--out", type=type(results), default=results, metavar="DIR",
                        help=f"where {name}.json and .png go")


def parse_peer_options(parser, argv, torch_peers="the PyTorch peers"):
    """(args, repeats, torch or None): the parsed options, --repeats resolved (3, quick 1) and
    checked, and torch imported unless --no-torch or missing (then said on stderr)."""
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print(f"no torch: {torch_peers} left out", file=sys.stderr)
    return args, repeats, torch

