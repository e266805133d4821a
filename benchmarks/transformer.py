"""One training step of minidist's tiny GPT vs PyTorch eager on CPU, in ONE run.

    python benchmarks/transformer.py [--quick] [--repeats 3] [--dtypes float64 float32]
                                     [--threads 1 2] [--out DIR] [--no-profile]

The step is forward, backward and a plain SGD update (lr 0.1) on one batch of (N, T) windows of
the bundled text corpus (minidist.data.load_text, its CharTokenizer: 96 tokens). Peers, on each
configuration, dtype and thread count:

- minidist: `minidist.nn.transformer.gpt(...)`, model.loss_and_grad, then optim.SGD.step;
- PyTorch eager, explicit attention: the same GPT-2 block stack built of nn.Embedding,
  nn.LayerNorm, nn.Linear, nn.GELU(approximate="tanh") and a causal attention written as
  minidist writes it (Q Kᵀ/√d_h, masked_fill(−∞), softmax, P V): the like-for-like peer, the
  one the ratio is about; then F.cross_entropy, backward, torch.optim.SGD (its defaults);
- PyTorch eager, SDPA: the same with F.scaled_dot_product_attention(is_causal=True) (a fused
  CPU kernel numpy has no counterpart of), for reference;
- and beneath them, the BLAS each library calls: the MLP's first matmul (N·T × d)(d × 4d) in
  numpy (OpenBLAS here) and torch (MKL here), in GFLOP/s, timed the same way.

Both models get the same weights: each entry of minidist's flat buffer ("i.name", model.slices;
layout in docs/architecture.md, "The transformer's layout") is copied into the torch parameter
of the same name, and every torch parameter must be covered exactly once. Before timing, one
step on each checks that they compute the same thing: the loss (|Δ| < 1e-10 in float64), every
gradient and the parameters after the update.

Threads: torch.set_num_threads(t) and threadpoolctl's threadpool_limits(t) (numpy's BLAS, and
torch's OpenMP). Step time: the first `--warmup` steps of a run dropped, median over its steps,
then median over `--repeats` runs, peers interleaved (their order alternates between repeats).
The ratio is PyTorch's seconds / minidist's: > 1 means minidist is faster. The machine may be
shared: each run records the cores other processes kept busy meanwhile (/proc/stat). Last, a
cProfile of minidist's step at the lesson's configuration lists where its time goes.

Writes benchmarks/results/transformer.json and transformer.png and prints a table.
"""

import argparse
import cProfile
import functools
import hashlib
import json
import math
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LR, SEED = 0.1, 0
LESSON = {"name": "lesson", "context": 32, "d_model": 64, "n_heads": 4, "n_layers": 2, "batch": 32}
SWEEP = [{"name": f"d{d}", "context": 64, "d_model": d, "n_heads": max(4, d // 64),
          "n_layers": 2, "batch": 32} for d in (64, 128, 256, 512)]
QUICK = [{"name": "tiny", "context": 8, "d_model": 16, "n_heads": 2, "n_layers": 1, "batch": 4}]
PEERS = ("minidist", "torch", "torch_sdpa")
# the check before timing: |Δ loss|, then max |Δ| / max |torch's| for gradients and parameters
TOLERANCE = {"float64": (1e-10, 1e-8, 1e-12), "float32": (1e-5, 1e-3, 1e-5)}


def text_batch(config):
    """(X, Y) int64 (batch, context): the corpus's first windows, and the vocabulary size."""
    from minidist import data

    tokenizer = data.CharTokenizer(data.load_text())
    X, Y = data.text_windows(tokenizer.encode(data.load_text()), config["context"])
    return X[:config["batch"]], Y[:config["batch"]], tokenizer.vocab_size


def minidist_gpt(config, vocab, dtype):
    from minidist.nn import gpt

    return gpt(vocab, config["context"], config["d_model"], config["n_heads"],
               config["n_layers"], seed=SEED, dtype=dtype)


# ---- PyTorch: the same model, layer i of minidist = module layers[i] ---------------------------
def torch_gpt(model, sdpa):
    """A torch module with minidist's layer order; names map as in torch_name."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, H = model.d_model, model.n_heads

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(model.vocab_size, d), nn.Embedding(model.context, d)

        def forward(self, tokens):
            return self.wte(tokens) + self.wpe.weight[:tokens.shape[1]]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.register_buffer("mask", torch.ones(model.context, model.context,
                                                    dtype=torch.bool).triu(1))

        def forward(self, x):
            N, T, _ = x.shape
            q, k, v = self.qkv(x).view(N, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
            if sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
                o = scores.masked_fill(self.mask[:T, :T], float("-inf")).softmax(-1) @ v
            return self.out(o.transpose(1, 2).reshape(N, T, d))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(), nn.LayerNorm(d)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc", nn.Linear(d, model.d_ff))
            self.mlp.add_module("gelu", nn.GELU(approximate="tanh"))
            self.mlp.add_module("proj", nn.Linear(model.d_ff, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    layers = [Embedding()] + [Block() for _ in range(model.n_layers)]
    layers += [nn.LayerNorm(d), nn.Linear(d, model.vocab_size)]
    torch_model = nn.Sequential(*layers).to(getattr(torch, model.dtype.name))
    for ln in torch_model.modules():
        if isinstance(ln, nn.LayerNorm):
            ln.eps = model.layers[-2].eps
    return torch_model


RENAME = {"gamma": "weight", "beta": "bias", "W": "weight", "b": "bias", "wte": "wte.weight",
          "wpe": "wpe.weight", "W_qkv": "qkv.weight", "b_qkv": "qkv.bias", "W_o": "out.weight",
          "b_o": "out.bias"}


def torch_name(flat_name):
    """minidist's "i.part.name" → the torch parameter's name, "i.part.weight" and so on."""
    *path, last = flat_name.split(".")
    return ".".join(path + [RENAME[last]])


def torch_layout(flat_name, a):
    """An array of minidist's shape in torch's: weights (d_in, d_out) → (d_out, d_in); W_qkv
    (3, H, d, d_h) → rows (i, h, j) of Linear(d, 3d); W_o (H, d_h, d) → (d, H·d_h)."""
    last = flat_name.rsplit(".", 1)[-1]
    if last == "W_qkv":
        return a.transpose(2, 0, 1, 3).reshape(a.shape[2], -1).T
    if last in ("W", "W_o"):
        return a.reshape(-1, a.shape[-1]).T
    return a if last in ("wte", "wpe") else a.reshape(-1)


def paired(model, torch_model):
    """[(flat name, torch parameter)], every torch parameter exactly once."""
    params = dict(torch_model.named_parameters())
    pairs = [(name, params.pop(torch_name(name))) for name in model.slices]
    if params:
        raise AssertionError(f"torch parameters not fed from minidist's buffer: {list(params)}")
    return pairs


def view(model, buffer, name):
    """The entry `name` of a flat buffer (model.params or model.grads), in minidist's shape."""
    i, part = name.split(".", 1)
    return buffer[model.slices[name]].reshape(model.layers[int(i)].param_shapes()[part])


def copy_weights(model, torch_model):
    import torch

    with torch.no_grad():
        for name, p in paired(model, torch_model):
            layout = torch_layout(name, view(model, model.params, name))
            p.copy_(torch.from_numpy(np.ascontiguousarray(layout)))


def step_functions(model, torch_models, X, Y):
    """{peer: a function running one training step and returning its loss}."""
    from minidist.optim import SGD

    opt = SGD(model.params, lr=LR)

    def minidist_step():
        loss = model.loss_and_grad(X, Y)
        opt.step(model.grads)
        return loss

    return {"minidist": minidist_step,
            **{peer: torch_step(m, X, Y) for peer, m in torch_models.items()}}


def torch_step(torch_model, X, Y):
    import torch
    from torch.nn import functional as F

    tokens, targets = torch.from_numpy(X), torch.from_numpy(Y).view(-1)
    opt = torch.optim.SGD(torch_model.parameters(), lr=LR)

    def step():
        opt.zero_grad()
        logits = torch_model(tokens)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def check_same(model, torch_model, step_fns, peer):
    """One step of both from the same weights: (|Δ loss|, gradient gap, parameter gap), the
    gaps max |minidist − torch| / max |torch| over every entry."""
    before = model.params.copy()
    gap = abs(step_fns["minidist"]() - step_fns[peer]())
    pairs = paired(model, torch_model)
    gaps = [_gap([(torch_layout(n, view(model, buffer, n)), get(p)) for n, p in pairs])
            for buffer, get in ((model.grads, lambda p: p.grad), (model.params, lambda p: p))]
    model.params = before  # the next peer's check starts from the same weights
    return (gap, *gaps)


def _gap(pairs):
    diff = max(float(np.max(np.abs(a - t.detach().numpy()))) for a, t in pairs)
    return diff / max(float(t.detach().abs().max()) for _, t in pairs)


# ---- measuring --------------------------------------------------------------------------------
def prepare(config, dtype, with_torch, target_s):
    """A case: both models with the same weights, checked, and the steps to time per run."""
    from threadpoolctl import threadpool_limits

    X, Y, vocab = text_batch(config)
    model = minidist_gpt(config, vocab, dtype)
    torch_models = {}
    if with_torch:
        torch_models = {peer: torch_gpt(model, sdpa=peer == "torch_sdpa")
                        for peer in PEERS[1:]}
        for torch_model in torch_models.values():
            copy_weights(model, torch_model)
    fns = step_functions(model, torch_models, X, Y)
    fns.update(fc_matmuls(len(X) * X.shape[1], model.d_model, model.d_ff, dtype, with_torch))
    case = {"config": config, "dtype": dtype, "vocab": vocab, "params": model.num_params,
            "d_ff": model.d_ff, "fns": fns, "checks": {}, "times": {}}
    with threadpool_limits(1):
        for peer, torch_model in torch_models.items():
            case["checks"][peer] = check_same(model, torch_model, fns, peer)
            limits = TOLERANCE[dtype]
            if any(g > tol for g, tol in zip(case["checks"][peer], limits, strict=True)):
                raise SystemExit(f"{config['name']} {dtype}: minidist and {peer} differ "
                                 f"(|Δ loss|, gradient gap, parameter gap = "
                                 f"{case['checks'][peer]}; allowed {limits}): not timed")
        start = time.perf_counter()
        fns["minidist"]()
        case["steps"] = int(np.clip(math.ceil(target_s / (time.perf_counter() - start)), 3, 50))
    return case


def fc_matmuls(rows, d, d_ff, dtype, with_torch):
    """The BLAS beneath each library: the MLP's first matmul, (rows × d)(d × d_ff), in numpy
    (minidist's BLAS) and in torch (its own), on the same random arrays."""
    rng = np.random.default_rng(SEED)
    A, B = (rng.standard_normal(shape).astype(dtype) for shape in ((rows, d), (d, d_ff)))
    fns = {"numpy_fc": lambda: A @ B}
    if with_torch:
        import torch

        tA, tB = torch.from_numpy(A), torch.from_numpy(B)
        fns["torch_fc"] = lambda: tA @ tB
    return fns


def timed_run(step, steps, threads, warmup):
    """Seconds of each of `steps` steps after `warmup` untimed ones, with `threads` threads."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")  # None where it is not imported (or not importable)
    before = torch.get_num_threads() if torch else None
    with threadpool_limits(threads):
        if torch:
            torch.set_num_threads(threads)
        try:
            for _ in range(warmup):
                step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        finally:
            if torch:
                torch.set_num_threads(before)
    return times


def measure(cases, threads, repeats, warmup, quiet):
    """Every peer of every case `repeats` times, interleaved. quiet: (quiet_wait, threshold,
    retries): before the peers of a case run, wait (at most quiet_wait s) until the other
    processes keep < threshold cores busy; repeat a run they disturbed (data_parallel's)."""
    from data_parallel import measured_run, wait_for_quiet  # benchmarks/ is on sys.path

    quiet_wait, threshold, retries = quiet
    for r in range(repeats):  # peers interleaved: a burst of load hits them alike
        for case in cases:
            for t in threads:
                if quiet_wait > 0:
                    wait_for_quiet(quiet_wait, threshold)
                peers = list(case["fns"])
                for peer in peers if r % 2 == 0 else peers[::-1]:
                    run = functools.partial(timed_run, case["fns"][peer], case["steps"], t,
                                            warmup)
                    got = measured_run(lambda run=run: {"times": run()}, 0, threshold,
                                       retries, crash_tries=1)
                    case["times"].setdefault((peer, t), []).append(
                        (float(np.median(got["times"])), got["others_busy_cores"],
                         got["attempts"]))


def rows_of(cases, threads):
    rows = []
    for case in cases:
        c, checks = case["config"], case["checks"]
        for t in threads:
            median = {peer: [run[0] for run in case["times"][(peer, t)]]
                      for peer in case["fns"]}
            ms = {peer: 1e3 * float(np.median(v)) for peer, v in median.items()}
            row = {"config": c["name"], "d_model": c["d_model"], "n_heads": c["n_heads"],
                   "n_layers": c["n_layers"], "context": c["context"], "batch": c["batch"],
                   "vocab": case["vocab"], "params": case["params"], "dtype": case["dtype"],
                   "threads": t, "steps": case["steps"], "minidist_ms": ms["minidist"],
                   "torch_ms": ms.get("torch"), "torch_sdpa_ms": ms.get("torch_sdpa"),
                   "torch_over_minidist": None, "sdpa_over_minidist": None,
                   "ratio_per_repeat": None, "loss_gap": None, "grad_gap": None,
                   "param_gap": None, "sdpa_loss_gap": None}
            rows_fc, d, f = c["batch"] * c["context"], c["d_model"], case["d_ff"]
            gflops = {p: 2e-6 * rows_fc * d * f / ms[p] if p in ms else None
                      for p in ("numpy_fc", "torch_fc")}
            row.update({"fc_matmul": f"({rows_fc}×{d})({d}×{f})",
                        "numpy_fc_gflops": gflops["numpy_fc"],
                        "torch_fc_gflops": gflops["torch_fc"]})
            if "torch" in ms:
                row.update(torch_over_minidist=ms["torch"] / ms["minidist"],
                           sdpa_over_minidist=ms["torch_sdpa"] / ms["minidist"],
                           ratio_per_repeat=[a / b for a, b in zip(median["torch"],
                                                                    median["minidist"],
                                                                    strict=True)])
                row.update(zip(("loss_gap", "grad_gap", "param_gap"), checks["torch"],
                               strict=True))
                row["sdpa_loss_gap"] = checks["torch_sdpa"][0]
            runs = [run for peer in case["fns"] for run in case["times"][(peer, t)]]
            busy = [b for _, b, _ in runs if b == b]  # nan: no /proc/stat
            row["others_busy_cores_max"] = max(busy) if busy else None
            # the median run had fewer free cores than threads: read this row with care
            row["contended"] = bool(np.median(busy) + t > os.cpu_count()) if busy else None
            row["runs_repeated"] = sum(attempts - 1 for _, _, attempts in runs)
            rows.append(row)
    return rows


def profile(config, dtype, steps=20):
    """cProfile of minidist's step: the most expensive functions (their own time), per step."""
    from threadpoolctl import threadpool_limits

    X, Y, vocab = text_batch(config)
    step = step_functions(minidist_gpt(config, vocab, dtype), {}, X, Y)["minidist"]
    with threadpool_limits(1):
        step()
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.runcall(lambda: [step() for _ in range(steps)])
        seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    records = [{"function": f"{Path(file).name}:{line}({name})", "calls_per_step": nc / steps,
                "self_ms_per_step": 1e3 * tt / steps, "cumulative_ms_per_step": 1e3 * ct / steps}
               for (file, line, name), (_, nc, tt, ct, _) in top]
    return records, 1e3 * seconds / steps


# ---- report -----------------------------------------------------------------------------------
def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_info, run from anywhere
    from run_info import add_quiet_options, run_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, one repeat")
    parser.add_argument("--repeats", type=int, help="runs per peer (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each run")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="about how long one run lasts (5 to 50 steps)")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                        choices=list(TOLERANCE))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--configs", nargs="+", choices=[c["name"] for c in [LESSON] + SWEEP],
                        help="a subset of the configurations (default: all; --quick: a tiny one)")
    add_quiet_options(parser, wait=5.0, busy=0.5, retries=1)
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where transformer.json and .png go (default benchmarks/results)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1 or args.warmup < 0 or min(args.threads) < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # for `from data_parallel import others_busy`
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not importable (pip install 'minidist[bench]'; CPU: torch==2.13.0): "
              "minidist alone, no ratios", file=sys.stderr)
    configs = [c for c in [LESSON] + SWEEP if c["name"] in (args.configs or [c["name"]])]
    configs = QUICK if args.quick and not args.configs else configs
    load_before, started, code = os.getloadavg(), time.perf_counter(), code_hashes()
    cases = [prepare(c, dtype, torch is not None, 0.05 if args.quick else args.seconds)
             for c in configs for dtype in args.dtypes]
    measure(cases, args.threads, repeats, args.warmup, (args.quiet_wait, args.busy, args.retries))
    top, profiled_ms = ([], None) if args.no_profile else profile(configs[0], args.dtypes[0])
    report = {
        **run_info("transformer.py", argv, load_before, started, torch), "repeats": repeats,
        "warmup_steps_dropped": args.warmup, "lr": LR, "quiet_wait_s": args.quiet_wait,
        "busy_cores_repeated": args.busy, "retries": args.retries,
        "minidist_code": code, "minidist_code_changed_during_run": code != code_hashes(),
        "step": "forward, backward and SGD update of one (batch, context) batch",
        "ratio": "torch_over_minidist = PyTorch eager (explicit masked softmax) seconds / "
                 "minidist seconds: > 1 means minidist is faster; sdpa_over_minidist likewise "
                 "with F.scaled_dot_product_attention",
        "profile_of": None if args.no_profile else
        f"minidist's step, {configs[0]['name']} config, {args.dtypes[0]}, 1 thread: "
        f"{profiled_ms:.2f} ms/step under cProfile",
        "rows": rows_of(cases, args.threads), "profile": top,
    }
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer.json").write_text(json.dumps(report, indent=1))
    plot(report["rows"], args.out / "transformer.png")
    print(f"\nwrote {args.out / 'transformer.json'} and {args.out / 'transformer.png'}")


def code_hashes():
    """{file: sha1 prefix} of the minidist code timed (results are tied to that code)."""
    import minidist.nn

    folder = Path(minidist.nn.__file__).parent
    return {name: hashlib.sha1((folder / name).read_bytes()).hexdigest()[:12]
            for name in ("transformer.py", "attention.py", "layers.py")}


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def print_table(report):
    print(f"one training step of the GPT, {report['machine']['cpus']} cpus; load average "
          f"{report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after; {report['repeats']} repeats")
    print(f"{'config':>7} {'d':>4} {'H':>2} {'T':>3} {'params':>8} {'dtype':>8} {'thr':>3} "
          f"{'minidist ms':>11} {'torch ms':>9} {'sdpa ms':>8} {'torch/minidist':>14} "
          f"{'sdpa/minidist':>13} {'|Δ loss|':>9} {'fc GFLOP/s np, torch':>20} {'busy':>5}")
    for r in report["rows"]:
        print(f"{r['config']:>7} {r['d_model']:>4} {r['n_heads']:>2} {r['context']:>3} "
              f"{r['params']:>8} {r['dtype']:>8} {r['threads']:>3} {r['minidist_ms']:>11.2f} "
              f"{_fmt(r['torch_ms'], '.2f'):>9} {_fmt(r['torch_sdpa_ms'], '.2f'):>8} "
              f"{_fmt(r['torch_over_minidist'], '.2f'):>14} "
              f"{_fmt(r['sdpa_over_minidist'], '.2f'):>13} {_fmt(r['loss_gap'], '.1e'):>9} "
              f"{_fmt(r['numpy_fc_gflops'], '.1f'):>10} {_fmt(r['torch_fc_gflops'], '.1f'):>9} "
              f"{_fmt(r['others_busy_cores_max'], '.2f'):>5}")
    if report["profile"]:
        print(f"\n{report['profile_of']}; by own time:")
        for p in report["profile"]:
            print(f"  {p['self_ms_per_step']:7.3f} ms {p['calls_per_step']:7.1f} calls  "
                  f"{p['function']}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    labels = [next(f"{r['config']}\nd={r['d_model']}, T={r['context']}" for r in rows
                   if r["config"] == c) for c in configs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(configs))
    for (dtype, t), (line, marker) in zip(dict.fromkeys((r["dtype"], r["threads"]) for r in rows),
                                          (("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")),
                                          strict=False):
        mine = [next(r for r in rows if (r["config"], r["dtype"], r["threads"]) == (c, dtype, t))
                for c in configs]
        if t == min(r["threads"] for r in rows):
            for peer, colour in (("minidist_ms", "tab:blue"), ("torch_ms", "tab:orange")):
                if None not in (values := [r[peer] for r in mine]):
                    left.plot(x, values, line + marker, color=colour,
                              label=f"{peer[:-3]}, {dtype}, {t} thread{'s' * (t > 1)}")
        if None in (ratios := [r["torch_over_minidist"] for r in mine]):
            continue
        (drawn,) = right.plot(x, ratios, line, label=f"{dtype}, {t} thread{'s' * (t > 1)}")
        for xi, ratio, r in zip(x, ratios, mine, strict=True):
            right.plot(xi, ratio, marker, color=drawn.get_color(),
                       mfc="none" if r["contended"] else drawn.get_color())
    left.set(yscale="log", ylabel="ms per training step (median)", title="step time")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set(ylabel="PyTorch s / minidist s  (> 1: minidist faster)",
              title="minidist's speed relative to PyTorch eager (explicit attention)\n"
                    "hollow: contended (other processes left fewer free cores than threads)")
    for ax in (left, right):
        ax.set_xticks(range(len(configs)), labels, fontsize=7)
        ax.legend(fontsize=6)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
