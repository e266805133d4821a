"""Data-parallel training: minidist vs PyTorch DistributedDataParallel (gloo, CPU) in ONE run.

    python benchmarks/data_parallel.py [--quick] [--repeats 3] [--configs digits wide]

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

Writes benchmarks/results/data_parallel.json and data_parallel.png and prints a table of ratios.
"""

import argparse
import functools
import json
import os
import platform
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
def run_minidist(config, split, workers, steps, strategy):
    from threadpoolctl import threadpool_limits

    import minidist

    X_train, _, y_train, _ = split
    with threadpool_limits(limits=1):  # "single" runs here; data_parallel ranks cap themselves
        hist = minidist.train(model_fn(config), X_train, y_train, strategy=strategy,
                              workers=workers, backend="process", steps=steps,
                              batch_size=config["batch"], lr=config["lr"], seed=SEED,
                              optimizer_options={"momentum": MOMENTUM})
    return {"params": hist.params, "step_time": hist.step_time,
            "compute_time": hist.compute_time, "comm_time": hist.comm_time}


# ---- PyTorch DDP ------------------------------------------------------------------------------
def ddp_worker(rank, workers, config, steps, store_path, out_path):
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


def run_ddp(config, workers, steps):
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.npz"
        tmp_mp.spawn(ddp_worker, args=(workers, config, steps, str(Path(tmp) / "store"), str(out)),
                     nprocs=workers, join=True)
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


def measured_run(run, quiet_wait, threshold, retries):
    """run() after a quiet moment; again (at most `retries` times) while other processes kept
    >= threshold cores busy during it. The least disturbed attempt is kept."""
    attempts = []
    for _ in range(retries + 1):
        if quiet_wait > 0:
            wait_for_quiet(quiet_wait, threshold)
        got, busy = others_busy(run)
        attempts.append({**got, "others_busy_cores": busy, "attempts": len(attempts) + 1})
        if not busy >= threshold:
            break
    return min(attempts, key=lambda a: a["others_busy_cores"])


def relative_gap(a, b):
    """max |a − b| / max |b| (the measure tests/test_train.py uses)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def measure(name, config, split, steps, warmup, repeats, quiet):
    """Every peer `repeats` times, interleaved; per-peer medians and the final-model checks.
    quiet: (quiet_wait, threshold, retries) for measured_run."""
    from minidist import nn

    runs = {(label, w): [] for label, _, w in PEERS}
    finals = {}
    for _ in range(repeats):
        for label, kind, workers in PEERS:
            if kind == "ddp":
                run = functools.partial(run_ddp, config, workers, steps)
            else:
                strategy = "single" if label.endswith("single") else "data_parallel"
                run = functools.partial(run_minidist, config, split, workers, steps, strategy)
            got = measured_run(run, *quiet)
            runs[(label, workers)].append(got)
            finals[(label, workers)] = got["params"]
    X_train, X_test, y_train, y_test = split
    reference = finals[("minidist single", 1)]
    rows = []
    for label, kind, workers in PEERS:
        per_run = [float(np.median(r["step_time"][warmup:])) for r in runs[(label, workers)]]
        step = float(np.median(per_run))
        model = nn.mlp(config["sizes"], seed=SEED)
        model.params = finals[(label, workers)]
        row = {"peer": label, "library": "PyTorch" if kind == "ddp" else "minidist",
               "workers": workers, "dtype": "float64",
               "median_step_s": step, "samples_per_s": config["batch"] / step,
               "run_medians_s": per_run,
               "others_busy_cores": [r["others_busy_cores"] for r in runs[(label, workers)]],
               "attempts": [r["attempts"] for r in runs[(label, workers)]],
               "test_accuracy": model.accuracy(X_test, y_test),
               "final_train_loss": float(model.loss(X_train, y_train)),
               "params_gap_vs_single": relative_gap(finals[(label, workers)], reference)}
        if kind == "minidist":
            last = runs[(label, workers)]
            row["median_compute_s"] = float(np.median([np.median(r["compute_time"][warmup:])
                                                       for r in last]))
            row["median_comm_s"] = float(np.median([np.median(r["comm_time"][warmup:])
                                                    for r in last]))
        rows.append(row)
    by = {(r["peer"], r["workers"]): r for r in rows}
    md1, md2 = by[("minidist data_parallel", 1)], by[("minidist data_parallel", 2)]
    pt1, pt2 = by[("PyTorch DDP (gloo)", 1)], by[("PyTorch DDP (gloo)", 2)]
    summary = {
        "minidist_over_ddp_1w": md1["samples_per_s"] / pt1["samples_per_s"],
        "minidist_over_ddp_2w": md2["samples_per_s"] / pt2["samples_per_s"],
        "efficiency_2w_minidist": md2["samples_per_s"] / (2 * md1["samples_per_s"]),
        "efficiency_2w_minidist_vs_single": md2["samples_per_s"] / (
            2 * by[("minidist single", 1)]["samples_per_s"]),
        "efficiency_2w_ddp": pt2["samples_per_s"] / (2 * pt1["samples_per_s"]),
        "data_parallel_matches_single": all(by[("minidist data_parallel", w)]
                                            ["params_gap_vs_single"] < 1e-10 for w in (1, 2)),
    }
    n_params = model.num_params
    return {"name": name, "title": config["title"], "sizes": config["sizes"],
            "batch": config["batch"], "lr": config["lr"], "momentum": MOMENTUM, "steps": steps,
            "warmup_steps_dropped": warmup, "repeats": repeats, "train_rows": len(X_train),
            "params": n_params, "gradient_bytes": 8 * n_params, "rows": rows,
            "summary": summary}


# ---- report -----------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    parser.add_argument("--repeats", type=int, help="runs per peer (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="before each run, wait up to this long for the other processes "
                             "on the machine to keep fewer than --busy cores busy; 0: no wait")
    parser.add_argument("--busy", type=float, default=0.25, metavar="CORES",
                        help="a run during which other processes kept this many cores busy "
                             "(on average) is repeated")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark needs torch (pip install 'minidist[bench]'; CPU: torch==2.13.0)")

    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    for name in args.configs:
        config = CONFIGS[name]
        steps = config["quick_steps" if args.quick else "steps"]
        results.append(measure(name, config, make_data(config), steps, args.warmup, repeats,
                               (args.quiet_wait, args.busy, args.retries)))
    report = {
        "command": "python benchmarks/data_parallel.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "dtype": "float64 for every peer (torch.set_default_dtype(torch.float64))",
        "configs": results,
    }
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_parallel.json").write_text(json.dumps(report, indent=1))
    plot(report)
    print(f"\nwrote {RESULTS / 'data_parallel.json'} and {RESULTS / 'data_parallel.png'}")


def print_table(report):
    print(f"data-parallel training, float64, {report['machine']['cpus']} cpus; load average "
          f"{report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} "
          "after (other jobs share this machine: timings are noisy)")
    for cfg in report["configs"]:
        print(f"\n{cfg['title']}: batch {cfg['batch']}, {cfg['steps']} steps "
              f"(first {cfg['warmup_steps_dropped']} dropped), {cfg['repeats']} repeats, "
              f"{cfg['params']} parameters ({cfg['gradient_bytes'] / 2**20:.2f} MiB of gradient)")
        busy = [b for r in cfg["rows"] for b in r["others_busy_cores"]]
        print(f"cores other processes kept busy during the kept runs: median "
              f"{np.median(busy):.2f}, max {max(busy):.2f}; runs repeated for it: "
              f"{sum(a - 1 for r in cfg['rows'] for a in r['attempts'])}")
        print(f"{'peer':<24}{'workers':>8}{'step ms':>9}{'compute':>9}{'comm':>7}"
              f"{'samples/s':>11}{'test acc':>9}{'train loss':>11}{'gap vs single':>15}")
        for r in cfg["rows"]:
            compute = f"{r['median_compute_s'] * 1e3:.2f}" if "median_compute_s" in r else "—"
            comm = f"{r['median_comm_s'] * 1e3:.2f}" if "median_comm_s" in r else "—"
            print(f"{r['peer']:<24}{r['workers']:>8}{r['median_step_s'] * 1e3:>9.2f}"
                  f"{compute:>9}{comm:>7}{r['samples_per_s']:>11.0f}{r['test_accuracy']:>9.4f}"
                  f"{r['final_train_loss']:>11.5f}{r['params_gap_vs_single']:>15.1e}")
        s = cfg["summary"]
        print(f"minidist / DDP samples/s: {s['minidist_over_ddp_1w']:.2f}× at 1 worker, "
              f"{s['minidist_over_ddp_2w']:.2f}× at 2 workers")
        print(f"parallel efficiency at 2 workers: minidist {s['efficiency_2w_minidist']:.0%} "
              f"(vs single {s['efficiency_2w_minidist_vs_single']:.0%}), "
              f"DDP {s['efficiency_2w_ddp']:.0%}")
        print("data_parallel reproduces single to 1e-10: "
              f"{'yes' if s['data_parallel_matches_single'] else 'NO'}")


def plot(report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4), squeeze=False)
    colours = {"minidist": "tab:blue", "PyTorch": "tab:orange"}
    for ax, cfg in zip(axes[0], configs, strict=True):
        rows = cfg["rows"]
        labels = [f"{r['peer'].replace(' (gloo)', '').replace(' data_parallel', ' DP')}\n"
                  f"{r['workers']}w" for r in rows]
        values = [r["samples_per_s"] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[
            "tab:gray" if r["peer"].endswith("single") else colours[r["library"]] for r in rows])
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=8)
        s = cfg["summary"]
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set(ylabel="samples / s (median)",
               title=f"{cfg['title']}, batch {cfg['batch']}\nminidist/DDP "
                     f"{s['minidist_over_ddp_1w']:.2f}× (1w), {s['minidist_over_ddp_2w']:.2f}× "
                     f"(2w); eff. {s['efficiency_2w_minidist']:.0%} vs "
                     f"{s['efficiency_2w_ddp']:.0%}")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(RESULTS / "data_parallel.png", dpi=110)


if __name__ == "__main__":
    main()
