"""Data-parallel training: minidist vs PyTorch DistributedDataParallel (gloo, CPU) in ONE run.

    python benchmarks/data_parallel.py [--quick] [--repeats 3] [--configs digits wide]
                                       [--peers single minidist ddp] [--out DIR]

Peers, on each configuration, all with the same model, data, initial weights (minidist's
seeded initial parameters, copied into the torch model), global batch per step (minidist's
data.step_batches, each rank taking its shard_bounds rows), number of steps and optimizer
(SGD, momentum 0.9), everything in float64 (torch.set_default_dtype(torch.float64)):

- minidist strategy="single": the one-process reference (BLAS capped at one thread);
- minidist strategy="data_parallel", process backend, 1 and 2 workers (default options);
- PyTorch DDP over gloo, 1 and 2 workers: torch.multiprocessing.spawn, a file:// store,
  torch.set_num_threads(1) per rank, DDP's default options.

Configurations: "digits" (the 64-128-10 MLP on the 8×8 digits, batch 64: small, overhead-bound)
and "wide" (a 512-1024-10 MLP on data.make_classification(8192, 512, 10) plus N(0, 20²) noise,
batch 512: compute dominates). Step time: rank 0's seconds per step (forward, backward,
gradient all-reduce and optimizer step; process start-up excluded), the first `--warmup` steps
dropped, median over the steps of a run, then median over `--repeats` runs (peers interleaved,
so a burst of load from elsewhere hits them alike). The machine may be shared: before each run
the benchmark waits (up to `--quiet-wait` s) for other processes to go quiet, measures the cores
they kept busy during the run (/proc/stat minus this run's own CPU time), repeats a run they
disturbed (`--busy`, `--retries`) and keeps the least disturbed attempt.
samples/s = batch / step time; parallel efficiency at p workers = samples/s(p) / (p · samples/s(1))
of the same library.

A peer whose processes crash (PyTorch's gloo ranks can abort with SIGABRT at start-up on some
machines; a minidist rank killed by a signal alike) is retried once; a run that crashes twice is
reported as crashed, with its errors, in the table, the figure and the JSON ("crashed",
"crashes"), and the other peers' results are kept. A ratio that needs a crashed peer is null.
(`--inject-abort KIND:WORKERS[:TIMES]`, for tests only, makes a rank of that peer abort in its
first TIMES attempts, every attempt by default.)

Writes benchmarks/results/data_parallel.json and data_parallel.png and prints a table of ratios.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MOMENTUM = 0.9
SEED = 0
NOISE = 20.0  # buries the synthetic blobs in noise, so test accuracy (~0.87) tells runs apart
CONFIGS = {
    "digits": {"title": "digits MLP 64-128-10", "sizes": [64, 128, 10], "batch": 64,
               "lr": 0.05, "steps": 400, "quick_steps": 100, "data": ["digits"]},
    "wide": {"title": "synthetic MLP 512-1024-10", "sizes": [512, 1024, 10], "batch": 512,
             "lr": 0.01, "steps": 120, "quick_steps": 40, "data": ["synthetic", 8192, 512, 10]},
}
PEERS = [("minidist single", "single", 1), ("minidist data_parallel", "minidist", 1),
         ("minidist data_parallel", "minidist", 2), ("PyTorch DDP (gloo)", "ddp", 1),
         ("PyTorch DDP (gloo)", "ddp", 2)]
CRASH_TRIES = 2  # a crashed run is retried once


def abort_now():
    """Die of SIGABRT, as gloo does when it aborts (no core file)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()


class Injector:
    """--inject-abort KIND:WORKERS[:TIMES]: which attempts of which peer abort (tests only)."""

    def __init__(self, spec=None):
        self.left = {}
        for item in spec or []:
            kind, workers, *times = item.split(":")
            if kind not in ("minidist", "ddp") or not workers.isdigit() or len(times) > 1:
                raise SystemExit(f"--inject-abort {item!r}: expected minidist|ddp:WORKERS[:TIMES]")
            self.left[(kind, int(workers))] = int(times[0]) if times else -1

    def take(self, kind, workers):
        """True if this attempt of (kind, workers) must abort; counts it."""
        left = self.left.get((kind, workers), 0)
        if left:
            self.left[(kind, workers)] = left - 1
        return left != 0


class AbortInRanks:
    """A model factory that aborts when called in a rank process (not in the benchmark's own
    process, which also calls it): the injected crash of a minidist peer."""

    def __init__(self, factory):
        self.factory, self.parent = factory, os.getpid()

    def __call__(self):
        if os.getpid() != self.parent:
            abort_now()
        return self.factory()


def make_data(config):
    """(X_train, X_test, y_train, y_test), float64 features, int64 labels; deterministic."""
    from minidist import data

    kind, *args = config["data"]
    if kind == "digits":
        X, y = data.load_digits()
    else:
        X, y = data.make_classification(*args, seed=SEED)
        X = X + np.random.default_rng(SEED + 1).normal(scale=NOISE, size=X.shape)
        X = X / X.std()  # unit scale, so one learning rate suits every layer
    return data.train_test_split(X, y, test_fraction=0.25, seed=SEED)


def model_fn(config):
    from minidist import nn

    return functools.partial(nn.mlp, config["sizes"], seed=SEED)


# ---- minidist ---------------------------------------------------------------------------------
def run_minidist(config, split, workers, steps, strategy, abort=False):
    from threadpoolctl import threadpool_limits

    import minidist

    X_train, _, y_train, _ = split
    factory = AbortInRanks(model_fn(config)) if abort else model_fn(config)
    with threadpool_limits(limits=1):  # "single" runs here; data_parallel ranks cap themselves
        hist = minidist.train(factory, X_train, y_train, strategy=strategy,
                              workers=workers, backend="process", steps=steps,
                              batch_size=config["batch"], lr=config["lr"], seed=SEED,
                              optimizer_options={"momentum": MOMENTUM})
    return {"params": hist.params, "step_time": hist.step_time,
            "compute_time": hist.compute_time, "comm_time": hist.comm_time}


# ---- PyTorch DDP ------------------------------------------------------------------------------
def ddp_worker(rank, workers, config, steps, store_path, out_path, abort=False):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from threadpoolctl import threadpool_limits
    from torch.nn.parallel import DistributedDataParallel

    from minidist import data

    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=workers)
    if abort and rank == workers - 1:  # the injected crash: gloo's abort at start-up
        abort_now()
    X_train, _, y_train, _ = make_data(config)
    reference = model_fn(config)()  # minidist's initial weights, W stored (d_in, d_out)
    sizes, layers = config["sizes"], []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(reference.params[reference.slices[f"{2 * i}.W"]]
                                                 .reshape(d_in, d_out).T))
            linear.bias.copy_(torch.from_numpy(reference.params[reference.slices[f"{2 * i}.b"]]))
        layers += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config["lr"], momentum=MOMENTUM)
    X, y = torch.from_numpy(X_train), torch.from_numpy(y_train)
    shards = []
    for batch in data.step_batches(len(X_train), config["batch"], steps, SEED):
        lo, hi = data.shard_bounds(len(batch), rank, workers)
        shards.append(torch.from_numpy(batch[lo:hi]))
    step_time, loss_log = np.zeros(steps), np.zeros(steps)
    dist.barrier()
    for t, rows in enumerate(shards):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(X[rows]), y[rows])
        loss.backward()  # DDP all-reduces the gradient buckets during backward
        optimizer.step()
        step_time[t] = time.perf_counter() - start
        loss_log[t] = loss.item()
    if rank == 0:  # back to minidist's flat layout, for the same evaluation and comparison
        flat = np.concatenate([np.concatenate([m.weight.detach().numpy().T.ravel(),
                                               m.bias.detach().numpy()])
                               for m in model if isinstance(m, torch.nn.Linear)])
        np.savez(out_path, params=flat, step_time=step_time, loss=loss_log)
    dist.destroy_process_group()


def run_ddp(config, workers, steps, abort=False):
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.npz"
        tmp_mp.spawn(ddp_worker, nprocs=workers, join=True,
                     args=(workers, config, steps, str(Path(tmp) / "store"), str(out), abort))
        got = np.load(out)
        return {"params": got["params"], "step_time": got["step_time"]}


# ---- measuring --------------------------------------------------------------------------------
def busy_cpu_seconds():
    """CPU seconds every process on the machine has spent so far (/proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user … steal (guest is in user)
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


def own_cpu_seconds():
    """CPU seconds of this process and of its children that have ended (the ranks)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def others_busy(fn):
    """fn(), and the cores that OTHER processes kept busy meanwhile (on average)."""
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    result = fn()
    busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    if busy0 is None:
        return result, float("nan")
    return result, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0))


def wait_for_quiet(max_wait, threshold):
    """Sleep (at most max_wait seconds) until other processes keep < threshold cores busy."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        _, busy = others_busy(lambda: time.sleep(1.0))
        if not busy >= threshold:
            return


def crash_types():
    """The exceptions that mean a peer's processes died: minidist's WorkerError (a rank raised,
    exited or was killed; EOFError too, which minidist's process launcher can let through when
    a rank dies between its checks), torch.multiprocessing.spawn's (a rank exited, or raised:
    gloo's error when its partner died)."""
    from minidist.errors import WorkerError

    types = [WorkerError, EOFError]
    try:
        from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
    except ImportError:
        pass
    else:
        types += [ProcessExitedException, ProcessRaisedException]
    return tuple(types)


def describe_crash(error):
    """One line for the table and the JSON: the exception's class and its first line."""
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, EOFError) and not first:
        first = "a rank's result pipe closed with no result (the rank died)"
    return f"{type(error).__name__}: {first[:200]}"


def measured_run(run, quiet_wait, threshold, retries, crash_tries=CRASH_TRIES):
    """run() after a quiet moment; again (at most `retries` times) while other processes kept
    >= threshold cores busy during it. The least disturbed attempt is kept. An attempt whose
    processes crash is retried; after `crash_tries` crashes the run is {"crashed": True, ...}
    (no traceback: the other peers' results must survive it)."""
    attempts, crashes, crashed_by = [], [], crash_types()
    while len(attempts) <= retries and len(crashes) < crash_tries:
        if quiet_wait > 0:
            wait_for_quiet(quiet_wait, threshold)
        try:
            got, busy = others_busy(run)
        except crashed_by as error:
            crashes.append(describe_crash(error))
            print(f"  crashed ({len(crashes)} of {crash_tries} tries): {crashes[-1]}",
                  file=sys.stderr)
            continue
        attempts.append({**got, "others_busy_cores": busy,
                         "attempts": len(attempts) + len(crashes) + 1})
        if not busy >= threshold:
            break
    if not attempts:
        return {"crashed": True, "crashes": crashes, "attempts": len(crashes)}
    best = min(attempts, key=lambda a: a["others_busy_cores"])
    return {**best, "crashed": False, "crashes": crashes}


def relative_gap(a, b):
    """max |a − b| / max |b| (the measure tests/test_train.py uses)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _ratio(a, b):
    return None if a is None or b is None else a / b


def measure(name, config, split, steps, warmup, repeats, quiet, peers=PEERS, inject=None):
    """Every peer `repeats` times, interleaved; per-peer medians and the final-model checks.
    quiet: (quiet_wait, threshold, retries) for measured_run; inject: an Injector or None.
    A peer with no completed run is a row with "crashed": True and null figures."""
    from minidist import nn

    inject = inject or Injector()
    runs = {(label, w): [] for label, _, w in peers}
    finals = {}
    for _ in range(repeats):
        for label, kind, workers in peers:
            if kind == "ddp":
                def run(w=workers):
                    return run_ddp(config, w, steps, abort=inject.take("ddp", w))
            else:
                strategy = "single" if kind == "single" else "data_parallel"

                def run(w=workers, k=kind, strategy=strategy):
                    return run_minidist(config, split, w, steps, strategy,
                                        abort=k == "minidist" and inject.take("minidist", w))
            got = measured_run(run, *quiet)
            runs[(label, workers)].append(got)
            if not got["crashed"]:
                finals[(label, workers)] = got["params"]
    X_train, X_test, y_train, y_test = split
    reference = finals.get(("minidist single", 1))
    rows = []
    for label, kind, workers in peers:
        done = [r for r in runs[(label, workers)] if not r["crashed"]]
        row = {"peer": label, "library": "PyTorch" if kind == "ddp" else "minidist",
               "workers": workers, "dtype": "float64", "crashed": not done,
               "crashes": [c for r in runs[(label, workers)] for c in r["crashes"]],
               "attempts": [r["attempts"] for r in runs[(label, workers)]],
               "median_step_s": None, "samples_per_s": None}
        if done:
            per_run = [float(np.median(r["step_time"][warmup:])) for r in done]
            step = float(np.median(per_run))
            model = nn.mlp(config["sizes"], seed=SEED)
            model.params = finals[(label, workers)]
            row.update(median_step_s=step, samples_per_s=config["batch"] / step,
                       run_medians_s=per_run,
                       others_busy_cores=[r["others_busy_cores"] for r in done],
                       test_accuracy=model.accuracy(X_test, y_test),
                       final_train_loss=float(model.loss(X_train, y_train)),
                       params_gap_vs_single=None if reference is None else
                       relative_gap(finals[(label, workers)], reference))
            if kind == "minidist":
                row["median_compute_s"] = float(np.median([np.median(r["compute_time"][warmup:])
                                                           for r in done]))
                row["median_comm_s"] = float(np.median([np.median(r["comm_time"][warmup:])
                                                        for r in done]))
        rows.append(row)
    by = {(r["peer"], r["workers"]): r["samples_per_s"] for r in rows}
    md1, md2 = by.get(("minidist data_parallel", 1)), by.get(("minidist data_parallel", 2))
    pt1, pt2 = by.get(("PyTorch DDP (gloo)", 1)), by.get(("PyTorch DDP (gloo)", 2))
    single = by.get(("minidist single", 1))
    gaps = [r.get("params_gap_vs_single") for r in rows if r["peer"] == "minidist data_parallel"]
    summary = {
        "minidist_over_ddp_1w": _ratio(md1, pt1),
        "minidist_over_ddp_2w": _ratio(md2, pt2),
        "efficiency_2w_minidist": _ratio(md2, None if md1 is None else 2 * md1),
        "efficiency_2w_minidist_vs_single": _ratio(md2, None if single is None else 2 * single),
        "efficiency_2w_ddp": _ratio(pt2, None if pt1 is None else 2 * pt1),
        "data_parallel_matches_single": None if not gaps or None in gaps
        else all(g < 1e-10 for g in gaps),
        "crashed_peers": [f"{r['peer']} {r['workers']}w" for r in rows if r["crashed"]],
    }
    n_params = nn.mlp(config["sizes"], seed=SEED).num_params
    return {"name": name, "title": config["title"], "sizes": config["sizes"],
            "batch": config["batch"], "lr": config["lr"], "momentum": MOMENTUM, "steps": steps,
            "warmup_steps_dropped": warmup, "repeats": repeats, "train_rows": len(X_train),
            "params": n_params, "gradient_bytes": 8 * n_params, "rows": rows,
            "summary": summary}


# ---- report -----------------------------------------------------------------------------------
def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_info, run from anywhere
    from run_info import add_quiet_options, run_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    parser.add_argument("--repeats", type=int, help="runs per peer (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--peers", nargs="+", choices=["single", "minidist", "ddp"],
                        default=["single", "minidist", "ddp"],
                        help="which peers to run (ddp needs torch)")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where data_parallel.json and .png go (default benchmarks/results)")
    add_quiet_options(parser, wait=60.0, busy=0.25, retries=2)
    parser.add_argument("--inject-abort", action="append", metavar="KIND:WORKERS[:TIMES]",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    inject = Injector(args.inject_abort)
    peers = [peer for peer in PEERS if peer[1] in args.peers]
    try:
        import torch
    except ImportError:
        torch = None
        if "ddp" in args.peers:
            sys.exit("the DDP peer needs torch (pip install 'minidist[bench]'; CPU: "
                     "torch==2.13.0), or leave it out: --peers single minidist")

    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    for name in args.configs:
        config = CONFIGS[name]
        steps = config["quick_steps" if args.quick else "steps"]
        results.append(measure(name, config, make_data(config), steps, args.warmup, repeats,
                               (args.quiet_wait, args.busy, args.retries), peers, inject))

    report = {
        **run_info("data_parallel.py", argv, load_before, started, torch),
        "dtype": "float64 for every peer (torch.set_default_dtype(torch.float64))",
        "crash_policy": f"a crashed run is retried once ({CRASH_TRIES} tries); a peer with no "
                        "completed run is reported crashed, with null figures",
        "configs": results,
    }
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_parallel.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "data_parallel.png")
    print(f"\nwrote {args.out / 'data_parallel.json'} and {args.out / 'data_parallel.png'}")


def _fmt(value, spec, missing="—", times=False):
    """value formatted with spec; `missing` when it is None (a crashed or absent peer)."""
    return missing if value is None else format(value, spec) + ("×" if times else "")


def print_table(report):
    print(f"data-parallel training, float64, {report['machine']['cpus']} cpus; load average "
          f"{report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} "
          "after (other jobs share this machine: timings are noisy)")
    for cfg in report["configs"]:
        print(f"\n{cfg['title']}: batch {cfg['batch']}, {cfg['steps']} steps "
              f"(first {cfg['warmup_steps_dropped']} dropped), {cfg['repeats']} repeats, "
              f"{cfg['params']} parameters ({cfg['gradient_bytes'] / 2**20:.2f} MiB of gradient)")
        busy = [b for r in cfg["rows"] for b in r.get("others_busy_cores", [])]
        if busy:
            print(f"cores other processes kept busy during the kept runs: median "
                  f"{np.median(busy):.2f}, max {max(busy):.2f}; runs repeated for it or for a "
                  f"crash: {sum(a - 1 for r in cfg['rows'] for a in r['attempts'])}")
        print(f"{'peer':<24}{'workers':>8}{'step ms':>9}{'compute':>9}{'comm':>7}"
              f"{'samples/s':>11}{'test acc':>9}{'train loss':>11}{'gap vs single':>15}")
        for r in cfg["rows"]:
            if r["crashed"]:
                print(f"{r['peer']:<24}{r['workers']:>8}  CRASHED in all {len(r['crashes'])} "
                      f"tries: {r['crashes'][-1]}")
                continue
            compute = _fmt(r.get("median_compute_s") and r["median_compute_s"] * 1e3, ".2f")
            comm = _fmt(r.get("median_comm_s") and r["median_comm_s"] * 1e3, ".2f")
            print(f"{r['peer']:<24}{r['workers']:>8}{r['median_step_s'] * 1e3:>9.2f}"
                  f"{compute:>9}{comm:>7}{r['samples_per_s']:>11.0f}{r['test_accuracy']:>9.4f}"
                  f"{r['final_train_loss']:>11.5f}"
                  f"{_fmt(r['params_gap_vs_single'], '.1e'):>15}")
            if r["crashes"]:
                print(f"{'':<24}{'':>8}  (crashed {len(r['crashes'])}× and was retried: "
                      f"{r['crashes'][0]})")
        s = cfg["summary"]
        print("minidist / DDP samples/s: "
              f"{_fmt(s['minidist_over_ddp_1w'], '.2f', times=True)} at 1 worker, "
              f"{_fmt(s['minidist_over_ddp_2w'], '.2f', times=True)} at 2 workers")
        print("parallel efficiency at 2 workers: minidist "
              f"{_fmt(s['efficiency_2w_minidist'], '.0%')} "
              f"(vs single {_fmt(s['efficiency_2w_minidist_vs_single'], '.0%')}), "
              f"DDP {_fmt(s['efficiency_2w_ddp'], '.0%')}")
        match = s["data_parallel_matches_single"]
        verdict = {True: "yes", False: "NO", None: "— (a data_parallel peer crashed or left out)"}
        print(f"data_parallel reproduces single to 1e-10: {verdict[match]}")
        if s["crashed_peers"]:
            print(f"CRASHED (no completed run): {', '.join(s['crashed_peers'])}")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False)
    colours = {"minidist": "tab:blue", "PyTorch": "tab:orange"}
    for ax, cfg in zip(axes[0], configs, strict=True):
        rows = cfg["rows"]
        labels = [f"{r['peer'].replace(' (gloo)', '').replace(' data_parallel', ' DP')}\n"
                  f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in rows]
        values = [r["samples_per_s"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[
            "tab:gray" if r["peer"].endswith("single") else colours[r["library"]] for r in rows])
        top = max(values) or 1.0
        for bar, value, r in zip(bars, values, rows, strict=True):
            text = "crashed" if r["crashed"] else f"{value:.0f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center",
                        va="bottom", fontsize=8, color="tab:red" if r["crashed"] else "black",
                        fontweight="bold" if r["crashed"] else "normal")
        s = cfg["summary"]
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylim(0, top * 1.15)
        ax.set(ylabel="samples / s (median)",
               title=f"{cfg['title']}, batch {cfg['batch']}\nminidist/DDP "
                     f"{_fmt(s['minidist_over_ddp_1w'], '.2f', times=True)} (1 worker), "
                     f"{_fmt(s['minidist_over_ddp_2w'], '.2f', times=True)} (2 workers)\n"
                     f"efficiency at 2 workers: minidist "
                     f"{_fmt(s['efficiency_2w_minidist'], '.0%')}, "
                     f"DDP {_fmt(s['efficiency_2w_ddp'], '.0%')}")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
