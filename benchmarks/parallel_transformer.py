"""Megatron tensor/sequence parallelism and interleaved pipelines on the GPT, in ONE run.

    python benchmarks/parallel_transformer.py [--quick] [--repeats 3] [--out DIR]

One model for every peer: minidist's GPT (nn.gpt, seeded) over the bundled text corpus's
96-token vocabulary, context 64, d_model 128, 8 heads, 4 blocks, d_ff 512, float64, trained
on the corpus's first 16 windows (benchmarks/transformer.text_batch: each step the same global
batch, its rows shuffled), plain SGD, lr 0.1, 8 steps. Peers, on 2 process ranks (this
machine has os.cpu_count() cores, 2 here: ranks share them with each other and with whatever
else runs):

- minidist strategy="single": the reference;
- tensor_parallel t=2 (Megatron: heads, MLP and vocabulary split), plain and
  sequence_parallel=True, algorithm="ring";
- pipeline p=2, schedule "1f1b" and "interleaved_1f1b" with chunks v=2, m = 2, 4, 8;
- PyTorch's own tensor parallelism, plain and with sequence parallelism: parallelize_module
  with ColwiseParallel / RowwiseParallel / SequenceParallel on benchmarks/transformer.torch_gpt
  holding minidist's weights, over gloo on CPU (benchmarks/parallel_transformer_torch.py: the
  plan, and what differs). It runs here (torch 2.13 CPU): gloo has every collective DTensor
  asks for (all-gather, reduce-scatter, all-reduce).

Checks (asserted): every run's final parameters against single (max |Δ| < 1e-10, the PyTorch
peers too); each minidist rank's bytes sent per step equal to cost.megatron_bytes_per_rank
(summed over its chunks when interleaved); its activation bytes (History.memory) equal to
memory.megatron_activation_bytes (pipeline: the schedule's stash of micro-batches per chunk).
Step time: rank 0's seconds per step, first step dropped, median over steps, then median over
`--repeats` runs (peers interleaved, the order reversed every other repeat); the speed vs
single is single's step time over the peer's. Bubble: trace.bubble_fraction (median over
steps but the first) against pipeline.bubble_formula(p, m, v) = (p−1)/(v·m + p−1), which
assumes equal chunks and free messages: here the first chunk also embeds and the last also
projects to the vocabulary, and every micro-batch brings its sends and Python overhead, so the
measured bubble sits above it, the more so the more micro-batches and for v = 2 (three times
the messages of 1F1B per rank).

Writes benchmarks/results/parallel_transformer.json and .png and prints a table.
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
RESULTS, P, MICRO, TOLERANCE = HERE / "results", 2, (2, 4, 8), 1e-10
FULL = {"context": 64, "d_model": 128, "n_heads": 8, "n_layers": 4, "batch": 16, "steps": 8}
QUICK = {"context": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "batch": 8, "steps": 3}
MINIDIST = [("single", {}), ("tensor_parallel", {}),
            ("tensor_parallel", {"sequence_parallel": True})] + [
    ("pipeline", {"schedule": s, "micro_batches": m, **({"chunks": 2} if v > 1 else {})})
    for s, v in (("1f1b", 1), ("interleaved_1f1b", 2)) for m in MICRO]


def label(strategy, options):
    if strategy == "tensor_parallel":
        return f"tp={P}" + (" SP" if options.get("sequence_parallel") else "")
    if strategy == "pipeline":
        v = options.get("chunks", 1)
        return f"pp={P} {options['schedule']}" + (f" v={v}" if v > 1 else "") + \
            f" m={options['micro_batches']}"
    return strategy


# ---- the formulas each minidist rank must meet, exactly ---------------------------------------
def formulas(model, config, strategy, options, details):
    """Per rank: (bytes sent per step, activation bytes held) by minidist.cost and .memory."""
    from minidist.cost import megatron_bytes_per_rank
    from minidist.memory import megatron_activation_bytes
    from minidist.parallel.pipeline import schedule_ops

    N, T = config["batch"], config["context"]
    if strategy == "single":
        return [(0, megatron_activation_bytes(N, T, model))]
    if strategy == "tensor_parallel":
        sp = options.get("sequence_parallel", False)
        return [(megatron_bytes_per_rank(model, N, T, P, sp, r)["total"],
                 megatron_activation_bytes(N, T, model, P, sp, r)) for r in range(P)]
    m, v = options["micro_batches"], options.get("chunks", 1)
    out = []
    for stage, d in enumerate(details):
        chunks = d["layers"] if v > 1 else [d["layers"]]
        sent = sum(megatron_bytes_per_rank(model, N, T, layers=c, micro_batches=m)["total"]
                   for c in chunks)
        held = peak = 0  # the stash: + a chunk's micro-batch at its F, − at its B
        for op, _, *c in schedule_ops(options["schedule"], stage, P, m, v):
            size = megatron_activation_bytes(N // m, T, model, layers=chunks[c[0] if c else 0])
            held += size if op == "F" else -size
            peak = max(peak, held)
        out.append((sent, peak))
    return out


def run_minidist(strategy, options, config, X, Y, model_fn, reference):
    """One run: its step time, bubble, the gap to single and each rank's measured figures,
    asserted equal to their formulas."""
    from minidist import train
    from minidist.trace import bubble_fraction

    kw = {"steps": config["steps"], "batch_size": config["batch"], "lr": 0.1}
    hist = train(model_fn, X, Y, **kw) if strategy == "single" else train(
        model_fn, X, Y, strategy=strategy, workers=P, backend="process", algorithm="ring",
        **kw, **options)
    gap = 0.0 if reference is None else float(np.max(np.abs(hist.params - reference)))
    assert gap < TOLERANCE, f"{label(strategy, options)} left single by {gap}"
    measured = list(zip(hist.bytes_sent or [0], [m["activations"] for m in hist.memory],
                        strict=True))
    expected = formulas(model_fn(), config, strategy, options, hist.details)
    assert measured == [(config["steps"] * b, a) for b, a in expected], \
        (label(strategy, options), measured, expected)
    return {"step_s": float(np.median(hist.step_time[1:])), "gap": gap, "params": hist.params,
            "loss": hist.loss.tolist(), "bytes": [b for b, _ in expected],
            "activations": [a for _, a in expected],
            "bubble": float(np.median(bubble_fraction(hist.events)[1:]))
            if strategy == "pipeline" else None}


# ---- measuring and the report -----------------------------------------------------------------
def measure(config, repeats, with_torch, quiet):
    """{peer label: {"runs": [result per repeat], ...}}, peers interleaved."""
    import parallel_transformer_torch as theirs
    from data_parallel import measured_run
    from transformer import SEED, text_batch

    from minidist import nn

    X, Y, vocab = text_batch(config)
    model_fn = functools.partial(nn.gpt, vocab, config["context"], config["d_model"],
                                 config["n_heads"], config["n_layers"], seed=SEED)
    single = run_minidist("single", {}, config, X, Y, model_fn, None)  # the reference

    def job(strategy, options):  # {peer: its result}: both PyTorch peers share one start
        if options is None:
            return theirs.run(config, single["params"])
        return {label(strategy, options): run_minidist(strategy, options, config, X, Y,
                                                       model_fn, single["params"])}

    jobs = [(s, o) for s, o in MINIDIST] + ([("torch", None)] if with_torch else [])
    runs = {}
    for strategy, options in jobs:
        for name in theirs.PEERS if options is None else [label(strategy, options)]:
            runs[name] = {"strategy": strategy, "options": options, "runs": []}
    for r in range(repeats):
        for strategy, options in jobs if r % 2 == 0 else jobs[::-1]:
            got = measured_run(functools.partial(job, strategy, options), *quiet)
            for name in theirs.PEERS if options is None else [label(strategy, options)]:
                runs[name]["runs"].append({"error": "; ".join(got["crashes"])} if got["crashed"]
                                          else {**got[name], "crashes": got["crashes"],
                                                "others_busy_cores": got["others_busy_cores"]})
    return runs, single, vocab


def summarize(runs, single):
    """One row per peer: medians over repeats, the checks against single (asserted)."""
    single_ms = float(np.median([1e3 * r["step_s"] for r in runs["single"]["runs"]]))
    rows = []
    for name, peer in runs.items():
        done = [r for r in peer["runs"] if "error" not in r]
        row = {"peer": name, "strategy": peer["strategy"], "options": peer["options"],
               "library": "PyTorch" if peer["options"] is None else "minidist",
               "ranks": 1 if name == "single" else P,
               "errors": sorted({r["error"] for r in peer["runs"] if "error" in r}),
               "step_ms_per_repeat": [1e3 * r["step_s"] for r in done],
               "others_busy_cores": [r["others_busy_cores"] for r in done]}
        row["step_ms"] = float(np.median(row["step_ms_per_repeat"])) if done else None
        row["speed_vs_single"] = single_ms / row["step_ms"] if done else None
        if done:
            last = done[-1]
            row["params_gap_vs_single"] = max(r["gap"] for r in done)
            assert row["params_gap_vs_single"] < TOLERANCE, (name, row["params_gap_vs_single"])
            assert np.allclose(last["loss"], single["loss"], rtol=TOLERANCE, atol=0), name
            for key in ("bytes", "activations", "crashes"):
                if key in last:
                    row[key if key == "crashes" else f"{key}_per_rank"] = last[key]
            if peer["strategy"] == "pipeline":
                from minidist.parallel.pipeline import bubble_formula

                opts = peer["options"]
                row["bubble"] = float(np.median([r["bubble"] for r in done]))
                row["bubble_formula"] = bubble_formula(P, opts["micro_batches"],
                                                       opts.get("chunks", 1))
        rows.append(row)
    return rows


def main(argv=None):
    sys.path.insert(0, str(HERE))  # run_info, transformer, data_parallel, run from anywhere
    from run_info import parse_peer_options, peer_options, run_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 3 steps, one repeat")
    peer_options(parser, RESULTS, "parallel_transformer", "the PyTorch peers")
    args, repeats, torch = parse_peer_options(parser, argv, "the PyTorch peers")
    config = QUICK if args.quick else FULL
    load_before, started = os.getloadavg(), time.perf_counter()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one core per rank, and for single too
        runs, single, vocab = measure(config, repeats, torch is not None,
                                      (args.quiet_wait, args.busy, args.retries))
    rows = summarize(runs, single)
    by = {r["peer"]: r["step_ms"] for r in rows}
    pairs = {"tp": ("PyTorch TP", f"tp={P}"), "sp": ("PyTorch TP+SP", f"tp={P} SP")}
    report = {**run_info("parallel_transformer.py", argv, load_before, started, torch),
              "config": {**config, "vocab": vocab, "d_ff": 4 * config["d_model"],
                         "dtype": "float64", "lr": 0.1}, "ranks": P, "repeats": repeats,
              "cores_note": f"{os.cpu_count()} cores: the {P} ranks of a run share them",
              "pytorch_over_minidist_step_time": {k: by[a] / by[b] for k, (a, b) in pairs.items()
                                                  if by.get(a) and by.get(b)}, "rows": rows}
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel_transformer.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "parallel_transformer.png")
    print(f"\nwrote {args.out / 'parallel_transformer.json'} and .png")


def print_table(report):
    c = report["config"]
    print(f"GPT vocab {c['vocab']}, context {c['context']}, d_model {c['d_model']}, "
          f"{c['n_heads']} heads, {c['n_layers']} blocks, batch {c['batch']}, float64, "
          f"{c['steps']} steps (first dropped), {report['repeats']} repeats; "
          f"{report['cores_note']}; load {report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after")
    print(f"{'peer':<28}{'ms/step':>9}{'speed vs single':>16}{'KiB sent/rank/step':>24}"
          f"{'activations KiB/rank':>24}{'bubble (formula)':>18}")
    for r in report["rows"]:
        if r["step_ms"] is None:
            print(f"{r['peer']:<28}  DID NOT RUN: {'; '.join(r['errors'])[:300]}")
            continue
        kib = [", ".join(f"{b / 1024:.0f}" for b in r.get(k, [])) for k in
               ("bytes_per_rank", "activations_per_rank")]
        bubble = f"{r['bubble']:.3f} ({r['bubble_formula']:.3f})" if "bubble" in r else ""
        print(f"{r['peer']:<28}{r['step_ms']:>9.1f}{r['speed_vs_single']:>16.2f}{kib[0]:>24}"
              f"{kib[1]:>24}{bubble:>18}")
    print("bytes and activations: measured, each equal to its formula (asserted); every run's "
          "parameters within 1e-10 of single's")
    ratios = report["pytorch_over_minidist_step_time"]
    print("PyTorch's step time over minidist's: " + (", ".join(
        f"{k} {v:.2f}" for k, v in ratios.items()) or "no PyTorch peers ran"))


def plot(report, path):
    """Left: the measured bubble over m against (p−1)/(v·m+p−1), v = 1 and 2; right: each
    peer's speed vs single."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidist.parallel.pipeline import bubble_formula

    rows = [r for r in report["rows"] if r["step_ms"] is not None]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.4), width_ratios=(1, 1.3))
    ms = np.linspace(1, max(MICRO), 100)
    for schedule, v, color in (("1f1b", 1, "tab:blue"), ("interleaved_1f1b", 2, "tab:red")):
        ax.plot(ms, bubble_formula(P, ms, v), color=color,
                label=f"(p−1)/({'v·' if v > 1 else ''}m+p−1), v = {v}")
        mine = [r for r in rows if r["options"] and r["options"].get("schedule") == schedule]
        ax.plot([r["options"]["micro_batches"] for r in mine], [r["bubble"] for r in mine], "o",
                color=color, label=f"measured {schedule}" + (f", v = {v}" if v > 1 else ""))
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xticks=[1, *MICRO], xticklabels=[str(m) for m in (1, *MICRO)], ylim=(0, 0.6),
           xlabel="micro-batches m", ylabel="bubble (idle share of a step)")
    ax.set_title(f"pipeline bubble, p = {P}: measured (points), formula (lines)", fontsize=10)
    ax.legend(fontsize=8)
    colors = ["tab:orange" if r["library"] == "PyTorch" else "tab:blue" for r in rows]
    bars.barh([r["peer"] for r in rows][::-1], [r["speed_vs_single"] for r in rows][::-1],
              color=colors[::-1])
    bars.axvline(1, color="black", lw=0.8)
    bars.set(xlabel="speed vs minidist single (single's step time / the peer's)",
             title="step time, median (blue: minidist, orange: PyTorch)")
    bars.tick_params(axis="y", labelsize=8)
    c = report["config"]
    fig.suptitle(f"GPT d_model {c['d_model']}, {c['n_layers']} blocks, context {c['context']}, "
                 f"batch {c['batch']}, float64; {report['cores_note']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
