"""Model parallelism on this machine: step time, bytes and the pipeline bubble, in ONE run.

    python benchmarks/model_parallel.py [--quick] [--repeats 3] [--backend process]

One model for every peer: the MLP 512-512-512-512-512-10 (four 512×512 layers, so pipeline
stages are equal) on data.make_classification(4096, 512, 10), float64, SGD with momentum 0.9,
a global batch of 1024, the same seeded initial weights. Peers, side by side:

- PyTorch, one process (torch.set_num_threads(1)): the same MLP and update, to show what one
  core does without minidist's Python layers;
- minidist strategy="single": the one-process reference (BLAS capped at one thread);
- minidist data_parallel ×2, tensor_parallel ×2 and ×4, pipeline ×2 and ×4 (1F1B and GPipe,
  m = 1, 2, 4, 8, 16), hybrid dp×tp = 2×2.

Step time: rank 0's seconds per step, first step dropped, median over steps, then median over
`--repeats` runs (peers interleaved). Pipeline bubble: minidist.trace.bubble_fraction on the
recorded events (median over steps), against (p−1)/(m+p−1). Bytes: History.bytes_sent[0] per
step. Every minidist run's parameters are checked against strategy="single" (< 1e-10).
With more ranks than cores, ranks share cores: read the ratios with os.cpu_count() in mind.

Writes benchmarks/results/model_parallel.json and model_parallel.png and prints a table.
"""

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES, BATCH, LR = [512] * 5 + [10], 1024, 0.01
MICRO = (1, 2, 4, 8, 16)


def peers(quick):
    runs = [("single", 1, {}), ("data_parallel", 2, {}), ("tensor_parallel", 2, {}),
            ("tensor_parallel", 4, {}), ("hybrid", 4, {"dp": 2, "tp": 2})]
    for p in (2,) if quick else (2, 4):
        for schedule in ("1f1b", "gpipe"):
            runs += [("pipeline", p, {"micro_batches": m, "schedule": schedule}) for m in MICRO]
    return runs


def torch_step_time(X, y, steps):
    """The same MLP and SGD step in PyTorch, one thread: median seconds per step."""
    import torch

    from minidist import data, nn

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    reference = nn.mlp(SIZES, seed=0)
    layers = []
    for i, layer in enumerate(reference.layers):
        if isinstance(layer, nn.Linear):
            linear = torch.nn.Linear(layer.d_in, layer.d_out)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.params["W"].T.copy()))
                linear.bias.copy_(torch.from_numpy(layer.params["b"].copy()))
            layers.append(linear)
        elif i < len(reference.layers) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    times = []
    for idx in data.step_batches(len(X), BATCH, steps, seed=0):
        start = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(X[idx])),
                                                 torch.from_numpy(y[idx]))
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and peers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="process", choices=("thread", "process"))
    args = parser.parse_args()

    from minidist import data, nn, train
    from minidist.parallel.pipeline import bubble_formula
    from minidist.trace import bubble_fraction

    steps = 4 if args.quick else 8
    X, y = data.make_classification(4096, SIZES[0], SIZES[-1], seed=0)
    model_fn = functools.partial(nn.mlp, SIZES, seed=0)
    options = {"steps": steps, "batch_size": BATCH, "lr": LR,
               "optimizer_options": {"momentum": 0.9}}
    reference = train(model_fn, X, y, **options)
    times, rows = {}, []
    for _ in range(args.repeats):  # peers interleaved: a burst of load hits them alike
        try:
            times.setdefault(("PyTorch single", 1, "{}"), []).append(torch_step_time(X, y, steps))
        except ImportError:
            pass
        for strategy, workers, extra in peers(args.quick):
            if strategy == "single":
                hist = train(model_fn, X, y, **options)
            else:
                hist = train(model_fn, X, y, strategy=strategy, workers=workers,
                             backend=args.backend, algorithm="ring", **options, **extra)
            gap = float(np.max(np.abs(hist.params - reference.params)))
            assert gap < 1e-10, f"{strategy} ×{workers} {extra} left single by {gap}"
            key = (strategy, workers, json.dumps(extra, sort_keys=True))
            times.setdefault(key, []).append(float(np.median(hist.step_time[1:])))
            if strategy == "pipeline":
                times.setdefault(key + ("bubble",), []).append(
                    float(np.median(bubble_fraction(hist.events)[1:])))
            times.setdefault(key + ("bytes",), [hist.bytes_sent[0] / steps])
    single = np.median(times[("single", 1, "{}")])
    for key, values in times.items():
        if len(key) != 3:
            continue
        strategy, workers, extra = key
        extra = json.loads(extra)
        row = {"peer": strategy, "workers": workers, **extra, "step_s": float(np.median(values)),
               "vs_minidist_single": float(single / np.median(values)),
               "bytes_per_step": times.get(key + ("bytes",), [0])[0]}
        if strategy == "pipeline":
            row["bubble"] = float(np.median(times[key + ("bubble",)]))
            row["bubble_formula"] = bubble_formula(workers, extra["micro_batches"])
        rows.append(row)
    print(f"{'peer':>16} {'ranks':>5} {'options':>34} {'ms/step':>8} {'speed vs single':>15} "
          f"{'KB/step':>8} {'bubble (formula)':>17}")
    for r in rows:
        extra = {k: v for k, v in r.items() if k in ("micro_batches", "schedule", "dp", "tp")}
        bubble = f"{r['bubble']:.2f} ({r['bubble_formula']:.2f})" if "bubble" in r else ""
        print(f"{r['peer']:>16} {r['workers']:>5} {json.dumps(extra):>34} "
              f"{1e3 * r['step_s']:>8.1f} {r['vs_minidist_single']:>15.2f} "
              f"{r['bytes_per_step'] / 1e3:>8.1f} {bubble:>17}")
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "backend": args.backend,
            "sizes": SIZES, "batch": BATCH, "steps": steps, "repeats": args.repeats,
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (RESULTS / "model_parallel.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=1))
    plot(rows, RESULTS / "model_parallel.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidist.parallel.pipeline import bubble_formula

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ms = np.arange(1, 17)
    for p, color in ((2, "tab:blue"), (4, "tab:red")):
        points = [r for r in rows if r["peer"] == "pipeline" and r["workers"] == p]
        if not points:
            continue
        ax.plot(ms, bubble_formula(p, ms), color=color, label=f"(p−1)/(m+p−1), p = {p}")
        for schedule, marker in (("1f1b", "^"), ("gpipe", "o")):
            mine = [r for r in points if r["schedule"] == schedule]
            ax.plot([r["micro_batches"] for r in mine], [r["bubble"] for r in mine], marker,
                    color=color, mfc="none" if schedule == "gpipe" else color,
                    label=f"measured {schedule}, p = {p}")
    ax.set(xscale="log", xlabel="micro-batches m", ylabel="bubble", ylim=(0, 1),
           title=f"pipeline bubble on {os.cpu_count()} cores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one core per rank, and for the in-process peers too
        main()
