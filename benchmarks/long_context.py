"""all_to_all, context parallelism and expert parallelism on 2 ranks, measured in ONE run.

    python benchmarks/long_context.py [--quick] [--repeats 3] [--no-torch] [--out DIR]

1. all_to_all, n = 4 KiB … 16 MiB of float32 per rank (benchmarks/long_context_all_to_all.py):
   minidist's process backend ("native" and "pairwise", call by call) vs MPICH (mpi4py
   Alltoallv under mpiexec) and PyTorch gloo (dist.all_to_all_single: gloo has it on CPU),
   the three runs interleaved (the order reversed every other round, the times pooled). Each
   point: the median call, the slowest rank's; busBW = (p−1)/p·n/t (cost.bus_bandwidth); the
   speed vs MPICH = t(MPICH)/t(peer). minidist's bytes per call = cost.all_to_all_bytes
   (asserted).
2. context_parallel c = 2, load_balance False and True, vs single on a GPT over the bundled
   corpus (96 tokens), T = 256, d_model 64, 4 heads, 2 blocks, batch 4 (attention's T² work
   dominates the MLP's). Asserted per rank: bytes sent = steps ·
   cost.context_parallel_bytes_per_rank; activations = memory.context_activation_bytes
   (single: memory.megatron_activation_bytes, which holds the H·N·T² softmax ring attention
   never keeps); final parameters within 1e-10 of single's.
3. expert_parallel e = 2 vs data_parallel × 2 (and single) on a mixture-of-experts GPT:
   E = 4 experts, top_k 2, capacity factor 1.25, T = 64, d_model 64, batch 8. Asserted per
   rank: EP's bytes = cost.expert_parallel_bytes_per_rank on the routing it reports (the
   all_to_alls and the dense all-reduce), DP's = steps · Σ_buckets (ring all-reduce of the
   bucket: cost.bytes_per_rank); parameters held: EP memory.expert_parallel_param_bytes, DP
   8Ψ; final parameters within 1e-10 of single's.

Training runs: process backend, ring all-reduce, SGD lr 0.1, float64, one BLAS thread per rank;
step time = rank 0's median over steps (first dropped), then the median over `--repeats` runs,
peers interleaved (the order reversed every other repeat). Both ranks share this machine's
os.cpu_count() cores (2 here) with whatever else runs: timings are noisy, bytes are exact.
Writes benchmarks/results/long_context.json and .png and prints a table.
"""

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS, P, TOLERANCE = HERE / "results", 2, 1e-10
CP = {"context": 256, "d_model": 64, "n_heads": 4, "n_layers": 2, "batch": 4, "steps": 6}
EP = {"context": 64, "d_model": 64, "n_heads": 4, "n_layers": 2, "batch": 8, "steps": 6,
      "n_experts": 4, "top_k": 2, "capacity_factor": 1.25}
QUICK = {"cp": {**CP, "context": 32, "d_model": 16, "n_heads": 2, "n_layers": 1, "steps": 3},
         "ep": {**EP, "context": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "batch": 4,
                "steps": 3}}
JOBS = [("cp", "single", {}), ("cp", "context_parallel", {"load_balance": False}),
        ("cp", "context_parallel", {"load_balance": True}), ("ep", "single", {}),
        ("ep", "data_parallel", {}), ("ep", "expert_parallel", {})]
RATIOS = [("cp=2", "single (cp)"), ("cp=2 load_balance", "single (cp)"), ("ep=2", "dp=2")]


def label(part, strategy, options):
    if strategy == "context_parallel":
        return f"cp={P}" + (" load_balance" if options["load_balance"] else "")
    return {"single": f"single ({part})", "data_parallel": f"dp={P}",
            "expert_parallel": f"ep={P}"}[strategy]


def model_fn(config, vocab):
    from transformer import SEED

    from minidist import nn

    moe = {k: config[k] for k in ("n_experts", "top_k", "capacity_factor") if k in config}
    return functools.partial(nn.gpt, vocab, config["context"], config["d_model"],
                             config["n_heads"], config["n_layers"], seed=SEED, **moe)


def formulas(part, strategy, options, config, model, hist):
    """Per rank: {bytes, activations (cp), params_held}, by minidist.cost and .memory."""
    from minidist import cost, memory
    from minidist.parallel.buckets import buckets

    N, T, steps, ranks = config["batch"], config["context"], config["steps"], len(hist.memory)
    out = [{"params_held": 8 * model.num_params, "bytes": 0} for _ in range(ranks)]
    for r, row in enumerate(out):
        if part == "cp":
            row["activations"] = memory.megatron_activation_bytes(N, T, model) \
                if strategy == "single" else memory.context_activation_bytes(
                    N, T, model, P, options["load_balance"])
        if strategy == "context_parallel":
            row["bytes"] = steps * cost.context_parallel_bytes_per_rank(
                model, N, T, P, r, "ring", options["load_balance"])["total"]
        elif strategy == "data_parallel":  # its stats keep the set-up broadcast of θ
            row["bytes"] = steps * sum(cost.bytes_per_rank(
                "all_reduce", "ring", b.stop - b.start, 8, P)[r][0]
                for b in buckets(model.num_params, 8, 1 << 20)) + cost.bytes_per_rank(
                "broadcast", "tree", model.num_params, 8, P)[r][0]
        elif strategy == "expert_parallel":
            sent = cost.expert_parallel_bytes_per_rank(
                model, [d["tokens_to"] for d in hist.details], r, algorithm="ring",
                by="collective")
            row.update(bytes=sent["total"], all_to_all_bytes=sent["all_to_all"],
                       params_held=memory.expert_parallel_param_bytes(model, P))
    return out


def run_training(part, strategy, options, config, data, reference):
    """One run: rank 0's step time; each rank's measured figures asserted equal to formulas."""
    from minidist import train

    X, Y, make = data
    kw = {"steps": config["steps"], "batch_size": config["batch"], "lr": 0.1}
    hist = train(make, X, Y, **kw) if strategy == "single" else train(
        make, X, Y, strategy=strategy, workers=P, backend="process", algorithm="ring",
        **kw, **options)
    name = label(part, strategy, options)
    gap = 0.0 if reference is None else float(np.max(np.abs(hist.params - reference)))
    assert gap < TOLERANCE, f"{name} left single by {gap}"
    model = make()
    expected = formulas(part, strategy, options, config, model, hist)
    measured = [{"params_held": m["params"], "bytes": b,
                 **({"activations": m["activations"]} if part == "cp" else {}),
                 **({"all_to_all_bytes": s["all_to_all"]["bytes_sent"]}
                    if strategy == "expert_parallel" else {})}
                for m, b, s in zip(hist.memory, hist.bytes_sent or [0], hist.stats or [{}],
                                   strict=True)]
    assert measured == expected, (name, measured, expected)
    setup = 8 * model.num_params if strategy == "data_parallel" else 0  # rank 0's broadcast
    for r, row in enumerate(expected):
        row["step_bytes"] = (row["bytes"] - (setup if r == 0 else 0)) // config["steps"]
    return {"step_s": float(np.median(hist.step_time[1:])), "gap": gap, "params": hist.params,
            "per_rank": expected}


def measure_training(configs, repeats, quiet):
    """{peer: {part, strategy, options, runs: [result per repeat]}}, peers interleaved."""
    from data_parallel import measured_run
    from transformer import text_batch

    data, reference = {}, {}
    for part, config in configs.items():
        X, Y, vocab = text_batch(config)
        data[part] = (X, Y, model_fn(config, vocab))
        reference[part] = run_training(part, "single", {}, config, data[part], None)["params"]
    peers = {label(*job): {"part": job[0], "strategy": job[1], "options": job[2], "runs": []}
             for job in JOBS}
    for r in range(repeats):
        for part, strategy, options in JOBS if r % 2 == 0 else JOBS[::-1]:
            got = measured_run(functools.partial(
                run_training, part, strategy, options, configs[part], data[part],
                reference[part]), *quiet)
            peers[label(part, strategy, options)]["runs"].append(
                {"error": "; ".join(got["crashes"])} if got["crashed"] else
                {k: v for k, v in got.items() if k != "params"})
    return peers


def training_rows(peers):
    rows, single = [], {}
    for name, peer in peers.items():
        done = [r for r in peer["runs"] if "error" not in r]
        ms = [1e3 * r["step_s"] for r in done]
        row = {"peer": name, "part": peer["part"], "options": peer["options"],
               "errors": sorted({r["error"] for r in peer["runs"] if "error" in r}),
               "step_ms_per_repeat": ms, "step_ms": float(np.median(ms)) if done else None,
               "params_gap_vs_single": max((r["gap"] for r in done), default=None)}
        if peer["strategy"] == "single":
            single[peer["part"]] = row["step_ms"]
        if done:
            for key in done[-1]["per_rank"][0]:
                row[f"{key}_per_rank"] = [x[key] for x in done[-1]["per_rank"]]
        rows.append(row)
    for row in rows:
        row["speed_vs_single"] = single[row["part"]] / row["step_ms"] \
            if row["step_ms"] and single.get(row["part"]) else None
    return rows


def main(argv=None):
    sys.path.insert(0, str(HERE))  # run_info, allreduce, transformer, data_parallel
    import long_context_all_to_all as a2a
    from allreduce import sizes_in_bytes
    from run_info import parse_peer_options, peer_options, run_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, 3 steps, all_to_all up to 1 MiB, one repeat")
    peer_options(parser, RESULTS, "long_context", "PyTorch gloo")
    args, repeats, torch = parse_peer_options(parser, argv, "PyTorch gloo")
    configs = QUICK if args.quick else {"cp": CP, "ep": EP}
    sizes = sizes_in_bytes(1 if args.quick else 16)
    load_before, started = os.getloadavg(), time.perf_counter()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one core per rank, and for single too
        times, notes = a2a.measure(P, sizes, args.quick, min(repeats, 2), torch is not None)
        peers = measure_training(configs, repeats, (args.quiet_wait, args.busy, args.retries))
    rows = training_rows(peers)
    by = {r["peer"]: r["step_ms"] for r in rows}
    report = {**run_info("long_context.py", argv, load_before, started, torch),
              "ranks": P, "repeats": repeats, "configs": configs, "all_to_all_peers": notes,
              "cores_note": f"{os.cpu_count()} cores: the {P} ranks of a run share them",
              "step_time_ratios": {f"{a} / {b}": by[a] / by[b] if by[a] and by[b] else None
                                   for a, b in RATIOS},
              "all_to_all": a2a.rows(times, sizes, P), "training": rows}
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_context.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "long_context.png")
    print(f"\nwrote {args.out / 'long_context.json'} and .png")


def print_table(report):
    print(f"all_to_all on {report['ranks']} ranks, float32; {report['cores_note']}; load "
          f"{report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after")
    print(f"{'peer':<20}{'size':>10}{'median µs':>12}{'busBW GB/s':>12}{'speed vs MPICH':>16}")
    for r in report["all_to_all"]:
        vs = f"{r['speed_vs_mpich']:.2f}" if r["speed_vs_mpich"] else "—"
        print(f"{r['peer']:<20}{r['bytes'] / 1024:>8.0f}Ki{r['median_us']:>12.1f}"
              f"{r['busbw_GBps']:>12.3f}{vs:>16}")
    for peer, note in report["all_to_all_peers"].items():
        print(f"  {peer}: {note}")
    print(f"\ntraining, process backend, float64, median of {report['repeats']} repeats")
    print(f"{'peer':<22}{'ms/step':>9}{'speed vs single':>16}{'KiB sent/rank/step':>22}"
          f"{'activations KiB/rank':>22}{'params KiB/rank':>17}")
    for r in report["training"]:
        if r["step_ms"] is None:
            print(f"{r['peer']:<22}  DID NOT RUN: {'; '.join(r['errors'])[:300]}")
            continue
        kib = [", ".join(f"{b / 1024:.0f}" for b in r.get(f"{k}_per_rank", []))
               for k in ("step_bytes", "activations", "params_held")]
        print(f"{r['peer']:<22}{r['step_ms']:>9.1f}{r['speed_vs_single']:>16.2f}{kib[0]:>22}"
              f"{kib[1]:>22}{kib[2]:>17}")
    print("bytes, activations and params held: measured, each equal to its formula (asserted); "
          "every run's parameters within 1e-10 of single's")
    print("step-time ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                           report["step_time_ratios"].items() if v))


def plot(report, path):
    """Left: all_to_all busBW vs size, one line per peer; right: speed vs single per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.4), width_ratios=(1.2, 1))
    styles = {"minidist native": ("tab:green", "D"), "minidist pairwise": ("tab:blue", "o"),
              "MPICH Alltoallv": ("tab:red", "^"), "PyTorch gloo": ("tab:orange", "v")}
    for peer, (color, marker) in styles.items():
        mine = [r for r in report["all_to_all"] if r["peer"] == peer]
        if mine:
            ax.loglog([r["bytes"] for r in mine], [r["busbw_GBps"] for r in mine], marker=marker,
                      color=color, ms=4, label=peer)
    sizes = sorted({r["bytes"] for r in report["all_to_all"]})
    ax.set_xticks(sizes, [f"{n // 1024} KiB" if n < 2**20 else f"{n // 2**20} MiB"
                          for n in sizes], fontsize=8)
    ax.minorticks_off()
    ax.set(xlabel="bytes per rank (n)", ylabel="busBW = (p−1)/p·n/t  (GB/s)",
           title=f"all_to_all, {report['ranks']} ranks: median call")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    rows = [r for r in report["training"] if r["step_ms"] is not None][::-1]
    bars.barh([r["peer"] for r in rows], [r["speed_vs_single"] for r in rows],
              color=["tab:purple" if r["part"] == "cp" else "tab:olive" for r in rows])
    bars.axvline(1, color="black", lw=0.8)
    bars.set(xlabel="speed vs its single (single's step time / the peer's)",
             title="step time, median (purple: context, olive: experts)")
    fig.suptitle(f"minidist long context and experts; {report['cores_note']}; load "
                 f"{report['load_average_before'][0]:.1f} before", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
