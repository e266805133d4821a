"""ZeRO-1/2/3 and DDP-style overlap: minidist vs PyTorch (gloo, CPU) in ONE run, on 2 ranks.

    python benchmarks/zero.py [--quick] [--repeats 3] [--peers dp zero3 ddp ...] [--out DIR]

One model for every peer: the wide MLP 64-1024-1024-1024-10 (Ψ = 2,176,010 parameters), float64,
on the bundled digits (data_parallel.make_data), a global batch of 256 rows (each rank taking
its data.shard_bounds rows of data.step_batches' batch), SGD with momentum 0.9, minidist's
seeded initial weights in every peer. Peers, each on 2 ranks:

- minidist, process backend: data_parallel without and with `overlap=True`; ZeRO stages 1, 2
  and 3 (`strategy="zero", stage=s`, default options);
- PyTorch on CPU over gloo (benchmarks/zero_torch.py), 2 ranks started once per repeat that
  run the peers one after the other, each fresh from the same weights: DDP (its defaults); DDP
  with torch.distributed.optim.ZeroRedundancyOptimizer (ZeRO-1's peer); FSDP2 `fully_shard` on
  every Linear and the root with reshard_after_forward=False (SHARD_GRAD_OP: ZeRO-2's peer) and
  with its default True (ZeRO-3's peer). A peer that fails is reported as such, with its error.

Step time: rank 0's seconds per step over 16 steps, the first 4 dropped, median over the steps
of a run, then median over `--repeats` runs (peers interleaved; the cores other processes kept
busy meanwhile are recorded, and with --quiet-wait/--busy/--retries a disturbed run is
repeated). A run whose ranks crash (gloo's SIGABRT at start-up) is retried once, then reported
(data_parallel.measured_run). Every run's final parameters are compared with minidist
data_parallel's (max |Δ| / max |θ|): all peers compute the same SGD.

Memory per rank. minidist: History.memory[r], measured by each rank's ledger from the arrays it
holds; the formula beside the peak is memory.zero_peak_bytes (data_parallel is stage 0): the
persistent memory.zero_state_bytes of the stage and its units (its "state ratio" column: the
measured params + grads + optimizer over it) plus the fullest moment of a step, the rank's
activations then (memory.mlp_unit_activations of its rows) and ZeRO's transient buffers
(gathered units, temporary and in-flight gradient units, prefetches, the step's working copy
of θ's chunks); "transient" is what the measured peak held beyond the state and the most
activations, "moment" the formula's fullest (memory.zero_moments). PyTorch: the tensors each
rank holds after a step (parameters, their .grad, the optimizer's state; DTensors by their
local shard), plus the bytes autograd saved for backward in a forward (zero_torch.py says how,
and what it cannot see).

Ratios: each minidist peer's step rate over its PyTorch peer's (target ≥ 1.5); measured peak
over the formula per rank (target within 10 %); the exposed communication with overlap over
without (History.exposed_comm_time: what a step waited after its backward; target ≤ 0.5).

Writes benchmarks/results/zero.json and zero.png and prints a table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKERS = 2
COMMON = {"lr": 0.01, "momentum": 0.9, "data": ["digits"]}  # SGD; seeds: data_parallel.SEED
FULL = {"sizes": [64, 1024, 1024, 1024, 10], "batch": 256, "steps": 16, "warmup": 4, **COMMON}
QUICK = {"sizes": [64, 32, 32, 10], "batch": 16, "steps": 3, "warmup": 1, **COMMON}
# key: (label, minidist's train options, or None for a PyTorch peer)
PEERS = {
    "dp": ("minidist data_parallel", {"strategy": "data_parallel"}),
    "dp_overlap": ("minidist data_parallel overlap", {"strategy": "data_parallel",
                                                      "overlap": True}),
    "zero1": ("minidist ZeRO-1", {"strategy": "zero", "stage": 1}),
    "zero2": ("minidist ZeRO-2", {"strategy": "zero", "stage": 2}),
    "zero3": ("minidist ZeRO-3", {"strategy": "zero", "stage": 3}),
    "ddp": ("PyTorch DDP", None),
    "zero_redundancy": ("PyTorch ZeroRedundancyOptimizer+DDP", None),
    "fsdp_grad_op": ("PyTorch FSDP2, no reshard (ZeRO-2)", None),
    "fsdp": ("PyTorch FSDP2 fully_shard (ZeRO-3)", None),
}
PAIRS = [("dp", "ddp"), ("dp_overlap", "ddp"), ("zero1", "zero_redundancy"),
         ("zero2", "fsdp_grad_op"), ("zero3", "fsdp")]
STAGE = {"dp": 0, "dp_overlap": 0, "zero1": 1, "zero2": 2, "zero3": 3}
SPEED_TARGET, MEMORY_TOLERANCE, OVERLAP_TARGET = 1.5, 0.10, 0.5


# ---- minidist ---------------------------------------------------------------------------------
def run_minidist(key, config, split):
    from data_parallel import SEED, model_fn

    import minidist

    X_train, _, y_train, _ = split
    hist = minidist.train(model_fn(config), X_train, y_train, workers=WORKERS,
                          backend="process", steps=config["steps"], batch_size=config["batch"],
                          lr=config["lr"], seed=SEED,
                          optimizer_options={"momentum": config["momentum"]},
                          **PEERS[key][1])
    return {"params": hist.params, "step_time": hist.step_time, "comm_time": hist.comm_time,
            "exposed_comm_time": hist.exposed_comm_time, "memory": hist.memory,
            "options": hist.options}


# ---- measuring --------------------------------------------------------------------------------
def measure(keys, config, split, repeats, quiet):
    """{key: [a run's result, or {"error": ...}] per repeat}, the peers interleaved (their order
    reversed every other repeat); the PyTorch peers share one start of ranks per repeat."""
    import zero_torch
    from data_parallel import measured_run

    theirs = tuple(k for k in keys if PEERS[k][1] is None)
    jobs = [(k,) for k in keys if PEERS[k][1] is not None] + ([theirs] if theirs else [])
    runs = {k: [] for k in keys}
    for r in range(repeats):
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            if job != theirs:
                got = measured_run(lambda k=job[0]: run_minidist(k, config, split), *quiet)
                by_peer = {job[0]: got}
            else:
                got = measured_run(lambda: {"peers": zero_torch.run(theirs, config, WORKERS)},
                                   *quiet)
                by_peer = {k: got["peers"][k] for k in theirs} if not got["crashed"] else {}
            for k in job:
                if got["crashed"]:
                    runs[k].append({"error": "; ".join(got["crashes"])})
                else:
                    runs[k].append({**by_peer[k], "others_busy_cores": got["others_busy_cores"],
                                    "crashes": got["crashes"]})
    return runs


def memory_records(key, run, config):
    """One record per rank of what it held; a minidist peer's beside the formula:
    memory.zero_peak_bytes of its stage, its units (as its bucket_bytes cuts them), its overlap
    and its rows' activations at each moment; "transient" is what the peak held beyond the
    measured state and activations."""
    from data_parallel import model_fn

    from minidist import data, memory
    from minidist.parallel.buckets import units

    records = [{"peer": key, "rank": rank, **held} for rank, held in enumerate(run["memory"])]
    if PEERS[key][1] is None:
        return records
    cut = units(model_fn(config)(), run["options"]["bucket_bytes"])
    unit_sizes, stage, overlap = [u.size for u in cut], STAGE[key], run["options"]["overlap"]
    persistent = sum(memory.zero_state_bytes(unit_sizes, stage, WORKERS).values())
    for m in records:
        start, stop = data.shard_bounds(config["batch"], m["rank"], WORKERS)
        kept = memory.mlp_unit_activations(stop - start, config["sizes"], cut)
        moments = memory.zero_moments(unit_sizes, stage, WORKERS, activations=kept,
                                      overlap=overlap)
        state = m["params"] + m["grads"] + m["optimizer"]
        m["state_over_formula"] = state / persistent
        m["transient"] = m["peak"] - state - m["activations"]
        m["formula_peak"] = memory.zero_peak_bytes(unit_sizes, stage, WORKERS,
                                                   activations=kept, overlap=overlap)
        m["peak_moment"] = max(moments, key=moments.get)
        m["peak_over_formula"] = m["peak"] / m["formula_peak"]
        m["within_10pct"] = abs(m["peak_over_formula"] - 1) <= MEMORY_TOLERANCE
    return records


def _median_ms(done, field, warmup):
    values = [float(np.median(r[field][warmup:])) for r in done if r.get(field) is not None]
    return 1e3 * float(np.median(values)) if values else None


def summarize(runs, config):
    """The rows (one per peer), the per-rank memory table and the ratios."""
    from data_parallel import _ratio, relative_gap

    warmup, rows, memory_rows = config["warmup"], [], []
    reference = next((r["params"] for r in runs.get("dp", []) if "params" in r), None)
    for key, peer_runs in runs.items():
        label, options = PEERS[key]
        done = [r for r in peer_runs if "error" not in r]
        step = _median_ms(done, "step_time", warmup)
        row = {"peer": key, "label": label, "library": "PyTorch" if options is None
               else "minidist", "failed": not done,
               "errors": sorted({r["error"] for r in peer_runs if "error" in r}),
               "retried_crashes": [c for r in done for c in r["crashes"]],
               "median_step_ms": step, "steps_per_s": step and 1e3 / step,
               "median_comm_ms": _median_ms(done, "comm_time", warmup),
               "median_exposed_comm_ms": _median_ms(done, "exposed_comm_time", warmup),
               "others_busy_cores": [r["others_busy_cores"] for r in done]}
        if done:
            last = done[-1]
            row["params_gap_vs_dp"] = None if reference is None else \
                relative_gap(last["params"], reference)
            row["peak_bytes_per_rank"] = [m["peak"] for m in last["memory"]]
            if options is not None:
                row["options"] = {k: v for k, v in last["options"].items()
                                  if isinstance(v, (bool, int, float, str))}
            memory_rows += memory_records(key, last, config)
        rows.append(row)
    rate = {r["peer"]: r["steps_per_s"] for r in rows}
    speed = [{"minidist": a, "peer": b, "ratio": _ratio(rate.get(a), rate.get(b)),
              "target": SPEED_TARGET} for a, b in PAIRS if a in rate and b in rate]
    for s in speed:
        s["met"] = None if s["ratio"] is None else s["ratio"] >= SPEED_TARGET
    exposed = {r["peer"]: r["median_exposed_comm_ms"] for r in rows}
    overlap = {"exposed_without_ms": exposed.get("dp"),
               "exposed_with_ms": exposed.get("dp_overlap")}
    overlap["ratio"] = _ratio(overlap["exposed_with_ms"], overlap["exposed_without_ms"])
    overlap.update(target=OVERLAP_TARGET, met=None if overlap["ratio"] is None
                   else overlap["ratio"] <= OVERLAP_TARGET)
    return rows, memory_rows, speed, overlap


# ---- report -----------------------------------------------------------------------------------
def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_info, run from anywhere
    from run_info import add_quiet_options, run_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, 3 steps, one repeat")
    parser.add_argument("--repeats", type=int, help="runs per peer (default 3, quick 1)")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    add_quiet_options(parser, wait=0.0, busy=0.5, retries=0)
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where zero.json and zero.png go (default benchmarks/results)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1 or args.retries < 0:
        parser.error("--repeats must be >= 1 and --retries >= 0")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # for `from data_parallel import ...`
    from data_parallel import make_data

    torch = None
    if any(PEERS[k][1] is None for k in args.peers):
        try:
            import torch
        except ImportError:
            sys.exit("the PyTorch peers need torch (pip install 'minidist[bench]'; CPU: "
                     "torch==2.13.0), or leave them out: --peers dp dp_overlap zero1 zero2 zero3")
    config = QUICK if args.quick else FULL
    load_before, started = os.getloadavg(), time.perf_counter()
    runs = measure(args.peers, config, make_data(config), repeats,
                   (args.quiet_wait, args.busy, args.retries))
    rows, memory_rows, speed, overlap = summarize(runs, config)
    from minidist import nn

    report = {
        **run_info("zero.py", argv, load_before, started, torch), "workers": WORKERS,
        "sizes": config["sizes"], "params": nn.mlp(config["sizes"]).num_params,
        "dtype": "float64", "batch": config["batch"], "steps": config["steps"],
        "warmup_steps_dropped": config["warmup"], "repeats": repeats, "lr": config["lr"],
        "momentum": config["momentum"],
        "torch_memory": "params, .grad and optimizer state of the tensors each rank holds after "
                        "a step (each storage once, DTensors by their local shard) + bytes "
                        "autograd saved for backward (parameters left out); DDP's gradient "
                        "buckets and FSDP's transient all-gathers not counted",
        "rows": rows, "memory": memory_rows, "speed_ratios": speed, "overlap": overlap,
    }
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "zero.png")
    print(f"\nwrote {args.out / 'zero.json'} and {args.out / 'zero.png'}")


def _fmt(value, spec, suffix=""):
    return "—" if value is None else format(value, spec) + suffix


def print_table(report):
    mib = 2.0 ** -20
    print(f"ZeRO and overlap on {report['workers']} ranks, float64 MLP "
          f"{'-'.join(map(str, report['sizes']))} (Ψ = {report['params']:,}), global batch "
          f"{report['batch']}, {report['steps']} steps (first {report['warmup_steps_dropped']} "
          f"dropped), {report['repeats']} repeats; {report['machine']['cpus']} cpus, load "
          f"average {report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after (shared machine: timings are noisy)")
    print(f"{'peer':<38}{'step ms':>9}{'steps/s':>9}{'comm ms':>9}{'exposed':>9}"
          f"{'peak MiB/rank':>15}{'gap vs dp':>11}")
    for r in report["rows"]:
        if r["failed"]:
            print(f"{r['label']:<38}  DID NOT RUN: {'; '.join(r['errors'])[:300]}")
            continue
        peaks = ", ".join(f"{p * mib:.1f}" for p in r["peak_bytes_per_rank"])
        print(f"{r['label']:<38}{r['median_step_ms']:>9.2f}{r['steps_per_s']:>9.2f}"
              f"{_fmt(r['median_comm_ms'], '.2f'):>9}{_fmt(r['median_exposed_comm_ms'], '.2f'):>9}"
              f"{peaks:>15}{_fmt(r['params_gap_vs_dp'], '.1e'):>11}")
    print(f"\nstep rate, minidist / its PyTorch peer (target ≥ {SPEED_TARGET}×):")
    for s in report["speed_ratios"]:
        print(f"  {PEERS[s['minidist']][0]:<38} / {PEERS[s['peer']][0]:<38}"
              f"{_fmt(s['ratio'], '.2f', '×'):>7}  {_verdict(s['met'])}")
    print(f"\nmeasured peak / formula per rank (zero_peak_bytes: the state plus the fullest "
          f"moment's activations and transient buffers, that moment shown; target within "
          f"{MEMORY_TOLERANCE:.0%}), MiB; state ratio: measured params + grads + optimizer / "
          "zero_state_bytes; transient: the measured peak beyond the state and the activations")
    print(f"  {'peer':<38}{'rank':>5}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}"
          f"{'transient':>10}{'peak':>8}{'formula':>9}{'ratio':>7}{'':>9}{'state ratio':>12}"
          f"  {'moment'}")
    for m in report["memory"]:
        mb = {k: m[k] * mib if k in m else None for k in ("params", "grads", "optimizer",
                                                          "activations", "transient", "peak",
                                                          "formula_peak")}
        print(f"  {PEERS[m['peer']][0]:<38}{m['rank']:>5}{mb['params']:>8.2f}{mb['grads']:>8.2f}"
              f"{mb['optimizer']:>8.2f}{mb['activations']:>8.2f}"
              f"{_fmt(mb['transient'], '.2f'):>10}{mb['peak']:>8.2f}"
              f"{_fmt(mb['formula_peak'], '.2f'):>9}"
              f"{_fmt(m.get('peak_over_formula'), '.3f'):>7}"
              f"{_verdict(m['within_10pct']) if 'within_10pct' in m else '':>9}"
              f"{_fmt(m.get('state_over_formula'), '.3f'):>12}  {m.get('peak_moment', '')}")
    o = report["overlap"]
    print(f"\nexposed communication per step: {_fmt(o['exposed_without_ms'], '.2f')} ms without "
          f"overlap, {_fmt(o['exposed_with_ms'], '.2f')} ms with; ratio "
          f"{_fmt(o['ratio'], '.2f')} (target ≤ {o['target']}): {_verdict(o['met'])}")


def _verdict(met):
    return {True: "met", False: "NOT met", None: "—"}[met]


def plot(report, path):
    """Each minidist peer beside its PyTorch peer: step rate, and rank 0's peak memory (with
    the formula's mark on minidist's bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["peer"]: r for r in report["rows"] if not r["failed"]}
    formula = {m["peer"]: m["formula_peak"] / 2**20 for m in report["memory"]
               if m["rank"] == 0 and "formula_peak" in m}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x, width = np.arange(len(PAIRS)), 0.38
    figures = (lambda r: r["steps_per_s"], lambda r: r["peak_bytes_per_rank"][0] / 2**20)
    for ax, figure, title in zip(axes, figures, ("steps / s (median, rank 0)",
                                                 "peak memory of rank 0 (MiB)"), strict=True):
        for side, (shift, colour, library) in enumerate(((-1, "tab:blue", "minidist"),
                                                         (1, "tab:orange", "PyTorch"))):
            keys = [pair[side] for pair in PAIRS]
            ax.bar(x + shift * width / 2, [figure(rows[k]) if k in rows else 0 for k in keys],
                   width, color=colour, label=library)
        ax.set_xticks(x, ["data_parallel\nvs DDP", "with overlap\nvs DDP",
                          "ZeRO-1 vs\nZeroRedundancy-\nOptimizer+DDP",
                          "ZeRO-2 vs\nFSDP2, no\nreshard", "ZeRO-3\nvs FSDP2"], fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[1].scatter(x - width / 2, [formula.get(a, np.nan) for a, _ in PAIRS], marker="_",
                    s=300, color="black", label="formula: zero_peak_bytes")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['workers']} ranks, float64 MLP {'-'.join(map(str, report['sizes']))}"
                 f", global batch {report['batch']} (a missing bar: the peer did not run)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
