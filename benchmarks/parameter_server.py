"""Parameter server: minidist vs a textbook multiprocessing.Queue server vs PyTorch RPC, in ONE run.

    python benchmarks/parameter_server.py [--quick] [--repeats 3]

1. Round trips. 2 workers, float32 parameter vectors of 10^4, 10^6 and 10^7 numbers; each
   worker repeats push(gradient) then pull(parameters) as fast as it can, and the server
   applies θ ← θ − η·g on each push (asynchronous: nobody waits for anybody, so this measures
   the transport). Peers:
   - minidist.ps (consistency="asp", one server): parameter data through shared memory,
     clocks and acknowledgements through pipes; the server updates θ in place with a compiled
     one-pass loop (kernels/cpu_fused.py) and each worker copies θ out itself;
   - "Queue PS": the textbook design, one multiprocessing.Queue into the server and one back
     to each worker, every gradient and every parameter vector pickled into a pipe;
   - "torch RPC PS" (when torch is installed): PyTorch's RPC parameter-server design
     (torch.distributed.rpc, TensorPipe over 127.0.0.1), one rpc_sync per round trip that
     pushes the gradient and returns the new parameters (the tutorial's update_and_fetch),
     the update being torch's one-pass in-place sub_.
   Per worker: the median seconds of a round trip (after warm-up); round trips/s are summed
   over the 2 workers; MB/s counts the bytes pushed plus pulled. Median over --repeats runs.
2. Time to target loss. The digits MLP 64-256-256-10, 3 workers, batch 192, SGD lr 0.1, with
   worker 1 slowed 3× (slow_workers={1: 3}), under BSP, ASP and SSP(s=2): wall-clock seconds
   until the workers' reported loss, smoothed over one global batch (ps.training.time_to_loss),
   first reaches the target; the median over --repeats runs.

Writes benchmarks/results/parameter_server.json and prints the table and the ratios.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [10**4, 10**6, 10**7]
LR = 1e-3


def trips_for(n, quick):
    trips = {10**4: 400, 10**6: 60, 10**7: 10}[n]
    return max(5, trips // 4) if quick else trips


# ---- minidist --------------------------------------------------------------------------------

def _minidist_worker(client, trips, warmup):
    grad, params, times = np.full(client.n, 1e-3, np.float32), np.empty(client.n, np.float32), []
    for i in range(warmup + trips):
        start = time.perf_counter()
        client.push(grad)
        client.pull(out=params)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_minidist(n, trips, warmup):
    from minidist import ps

    result = ps.run(_minidist_worker, 2, np.zeros(n, np.float32), lr=LR, consistency="asp",
                    args=(trips, warmup), timeout=600)
    return result.results


# ---- the textbook multiprocessing.Queue server -------------------------------------------------

def _queue_server(n, requests, replies):
    params = np.zeros(n, np.float32)
    while True:
        kind, rank, grad = requests.get()
        if kind == "stop":
            return
        if kind == "push":
            params -= np.float32(LR) * grad
        else:
            replies[rank].put(params)


def _queue_worker(rank, n, trips, warmup, requests, reply, out):
    grad, times = np.full(n, 1e-3, np.float32), []
    for i in range(warmup + trips):
        start = time.perf_counter()
        requests.put(("push", rank, grad))
        requests.put(("pull", rank, None))
        reply.get()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out.put((rank, times))


def run_queue(n, trips, warmup):
    ctx = mp.get_context("fork")
    requests, replies, out = ctx.Queue(), [ctx.Queue() for _ in range(2)], ctx.Queue()
    server = ctx.Process(target=_queue_server, args=(n, requests, replies))
    workers = [ctx.Process(target=_queue_worker,
                           args=(r, n, trips, warmup, requests, replies[r], out))
               for r in range(2)]
    for proc in [server, *workers]:
        proc.start()
    results = dict(out.get(timeout=600) for _ in workers)
    for proc in workers:
        proc.join(60)
    requests.put(("stop", None, None))
    server.join(60)
    return [results[r] for r in range(2)]


# ---- PyTorch's RPC parameter-server design ----------------------------------------------------

_SERVER = {}


def _rpc_update_and_fetch(grad):
    """Runs on the server: θ ← θ − η·g under the lock, and return a copy of θ."""
    with _SERVER["lock"]:
        _SERVER["params"].sub_(grad, alpha=LR)
        return _SERVER["params"].clone()


def _rpc_main(rank, n, trips, warmup, port, out):
    import threading
    import warnings

    warnings.filterwarnings("ignore", message="You are using a Backend")  # torch's own

    import torch
    import torch.distributed.rpc as rpc

    torch.set_num_threads(1)
    if rank == 0:
        _SERVER.update(params=torch.zeros(n, dtype=torch.float32), lock=threading.Lock())
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                              num_worker_threads=4, rpc_timeout=600)
    rpc.init_rpc("ps" if rank == 0 else f"worker{rank}", rank=rank, world_size=3,
                 rpc_backend_options=options)
    if rank > 0:
        grad, times = torch.full((n,), 1e-3, dtype=torch.float32), []
        for i in range(warmup + trips):
            start = time.perf_counter()
            rpc.rpc_sync("ps", _rpc_update_and_fetch, args=(grad,))
            if i >= warmup:
                times.append(time.perf_counter() - start)
        out.put((rank - 1, times))
    rpc.shutdown()


def run_torch_rpc(n, trips, warmup):
    import warnings

    warnings.filterwarnings("ignore", message="You are using a Backend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rpc_main, args=(r, n, trips, warmup, port, out))
             for r in range(3)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=600) for _ in range(2))
    for proc in procs:
        proc.join(120)
    return [results[r] for r in range(2)]


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---- time to target loss ------------------------------------------------------------------------

def time_to_target(consistency, staleness, steps, target):
    import functools

    from minidist import data, nn, train
    from minidist.ps.training import time_to_loss

    X, y = data.load_digits()
    hist = train(functools.partial(nn.mlp, [64, 256, 256, 10], seed=0), X, y,
                 strategy="parameter_server", workers=3, steps=steps, batch_size=192, lr=0.1,
                 consistency=consistency, staleness=staleness, slow_workers={1: 3.0})
    end = max(log[-1, 4] for log in hist.ps["log"])
    return {"seconds_to_target": time_to_loss(hist, target), "total_seconds": float(end),
            "mean_staleness": float(hist.staleness.mean()),
            "max_staleness": int(hist.staleness.max()),
            "wait_seconds": [float(w) for w in hist.ps["wait_time"]],
            "final_loss": float(np.mean(hist.loss[-10:]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips and steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.3, help="target training loss")
    args = parser.parse_args()
    peers = {"minidist": run_minidist, "Queue PS": run_queue}
    if torch_available():
        peers["torch RPC PS"] = run_torch_rpc
    round_trips = []
    for n in SIZES:
        trips, warmup = trips_for(n, args.quick), 3
        per_peer = {name: [] for name in peers}
        for _ in range(args.repeats):
            for name, fn in peers.items():  # interleaved, so bursts of load hit all alike
                per_peer[name].append(sum(1.0 / np.median(t) for t in fn(n, trips, warmup)))
        for name, rates in per_peer.items():
            rate = float(np.median(rates))
            round_trips.append({"peer": name, "n": n, "round_trips_per_s": rate,
                                "MB_per_s": rate * 2 * 4 * n / 1e6, "trips": trips})
            print(f"n={n:>9,}  {name:<13} {rate:10.1f} round trips/s  "
                  f"{rate * 8 * n / 1e6:9.1f} MB/s", flush=True)
    rate = {(r["peer"], r["n"]): r["round_trips_per_s"] for r in round_trips}
    ratios = {f"minidist / {p} at n={n}": rate["minidist", n] / rate[p, n]
              for p in peers if p != "minidist" for n in SIZES}
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}×")
    steps = 100 if args.quick else 150
    straggler = {}
    for consistency, staleness in [("bsp", None), ("asp", None), ("ssp", 2)]:
        label = f"ssp(s={staleness})" if staleness is not None else consistency
        runs = [time_to_target(consistency, staleness, steps, args.target)
                for _ in range(args.repeats)]
        median = float(np.median([r["seconds_to_target"] for r in runs]))
        straggler[label] = {"median_seconds_to_target": median, "runs": runs}
        print(f"{label:<10} time to loss {args.target}: {median:.3f} s  (mean staleness "
              f"{np.mean([r['mean_staleness'] for r in runs]):.2f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                       "cpus": os.cpu_count()},
           "settings": vars(args), "round_trips": round_trips, "ratios": ratios,
           "time_to_target": {"target_loss": args.target, "steps": steps, "workers": 3,
                              "slow_workers": {"1": 3.0}, "results": straggler}}
    path = RESULTS / "parameter_server.json"
    path.write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / "parameter_server.png")
    print(f"wrote {path} and parameter_server.png")


def plot(out, path):
    """Round trips per second against the vector size; time to the target loss per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_time) = plt.subplots(1, 2, figsize=(11, 3.6))
    for peer in dict.fromkeys(r["peer"] for r in out["round_trips"]):
        rows = [r for r in out["round_trips"] if r["peer"] == peer]
        ax_rate.loglog([r["n"] for r in rows], [r["MB_per_s"] for r in rows], "o-", label=peer)
    ax_rate.set(xlabel="float32 parameters", ylabel="MB/s pushed + pulled (2 workers)",
                title="push + pull round trips")
    ax_rate.legend()
    target = out["time_to_target"]
    labels = list(target["results"])
    ax_time.bar(labels, [target["results"][k]["median_seconds_to_target"] for k in labels],
                color=["tab:blue", "tab:red", "tab:green"])
    ax_time.set(ylabel="seconds (median)", title=f"time to loss {target['target_loss']}, "
                f"{target['workers']} workers, worker 1 slowed 3×")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
