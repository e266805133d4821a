"""The PyTorch peers of benchmarks/zero.py: DDP, ZeroRedundancyOptimizer + DDP and FSDP2, gloo, CPU.

`run(kinds, config, workers)` starts `workers` ranks with torch.multiprocessing (start method
fork, from a process that has imported torch and minidist but computed nothing with torch and
runs no thread: the ranks inherit the imports instead of paying for them again), joins one
gloo group (a file:// store, a 120 s timeout) and runs the peers in `kinds` one after the
other, each fresh from minidist's initial weights, for config["steps"] steps of the same
global batches as minidist (data.step_batches, each rank its data.shard_bounds rows), with one
thread per rank and everything in float64. A peer that raises is recorded with its error and
the others still run; a rank that dies makes torch's ProcessExitedException, which
data_parallel.measured_run retries once.

Memory per rank, counted from the tensors the rank holds (`storage_bytes`: each storage once,
DTensors by their local shard): after the last step, the parameters, their .grad and the
optimizer's state (ZeroRedundancyOptimizer: its local optimizer's); `SavedBytes`: the bytes
autograd saved for backward during the first step's forward. Not counted: DDP's flat gradient
buckets (another copy of the gradients under its default gradient_as_bucket_view=False, not
reachable through its API) and FSDP's transient all-gathered parameters.
"""

import contextlib
import datetime
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("ddp", "zero_redundancy", "fsdp_grad_op", "fsdp")


def torch_mlp(reference):
    """torch.nn.Sequential of Linear and ReLU holding minidist's weights (W stored d_in × d_out)."""
    import torch

    from minidist import nn

    layers = []
    for layer in (m for m in reference.layers if isinstance(m, nn.Linear)):
        linear = torch.nn.Linear(layer.d_in, layer.d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer.params["W"].T.copy()))
            linear.bias.copy_(torch.from_numpy(layer.params["b"].copy()))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def wrap(kind, net, mesh, sgd):
    """(what the step calls, the module of Linears, the optimizer) of peer `kind`: DDP; DDP with
    ZeroRedundancyOptimizer; fully_shard on each Linear and the root, reshard_after_forward
    False (fsdp_grad_op: ZeRO-2's peer, SHARD_GRAD_OP) or True (fsdp: ZeRO-3's)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if kind in ("ddp", "zero_redundancy"):
        ddp = DistributedDataParallel(net)
        if kind == "ddp":
            return ddp, net, torch.optim.SGD(ddp.parameters(), **sgd)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ddp, net, ZeroRedundancyOptimizer(ddp.parameters(),
                                                 optimizer_class=torch.optim.SGD, **sgd)
    from torch.distributed.fsdp import fully_shard

    for module in [*(m for m in net if isinstance(m, torch.nn.Linear)), net]:
        fully_shard(module, mesh=mesh, reshard_after_forward=kind == "fsdp")
    return net, net, torch.optim.SGD(net.parameters(), **sgd)


def storage_bytes(tensors):
    """Bytes of the storages behind `tensors` (DTensors: their local shard), each once."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum({s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in local)}.values())


class SavedBytes:
    """Bytes autograd saves for backward while `watch(True)` is on, each storage once; the
    parameters and views of them (a leaf that requires grad: FSDP's gathered ones too) left
    out, as they are counted as parameters."""

    def __init__(self):
        self.storages = {}

    def pack(self, tensor):
        base = tensor if tensor._base is None else tensor._base
        if not (base.is_leaf and base.requires_grad):
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def watch(self, on):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t) if on else \
            contextlib.nullcontext()


def train_peer(kind, config, shards, X, y, mesh):
    """One peer's training on this rank: its step times, memory and final flat parameters
    (minidist's layout: per Linear, W as d_in × d_out, then b)."""
    import torch
    import torch.nn.functional as F
    from data_parallel import model_fn

    sgd = {"lr": config["lr"], "momentum": config["momentum"]}
    step, net, optimizer = wrap(kind, torch_mlp(model_fn(config)()), mesh, sgd)
    saved, times = SavedBytes(), []
    for t, rows in enumerate(shards):
        start = time.perf_counter()
        optimizer.zero_grad()
        with saved.watch(t == 0):
            loss = F.cross_entropy(step(X[rows]), y[rows])
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    params = list(net.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: its local one
    held = {"params": storage_bytes(params), "grads": storage_bytes(p.grad for p in params),
            "optimizer": storage_bytes(v for s in inner.state.values() for v in s.values()
                                       if torch.is_tensor(v)),
            "activations": sum(saved.storages.values())}
    full = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy()
            for m in net if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)]
    return {"step_time": np.array(times), "memory": {**held, "peak": sum(held.values())},
            "params": np.concatenate([a.T.ravel() for a in full])}


def worker(rank, kinds, config, workers, store, out):
    """Rank `rank`: every peer in `kinds` in turn; a peer's error is recorded, not raised."""
    import torch
    import torch.distributed as dist
    from data_parallel import SEED, make_data
    from threadpoolctl import threadpool_limits
    from torch.distributed.device_mesh import init_device_mesh

    from minidist import data

    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=workers, timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (workers,))
    X_train, _, y_train, _ = make_data(config)
    shards = []
    for batch in data.step_batches(len(X_train), config["batch"], config["steps"], SEED):
        lo, hi = data.shard_bounds(len(batch), rank, workers)
        shards.append(torch.from_numpy(batch[lo:hi]))
    X, y, results = torch.from_numpy(X_train), torch.from_numpy(y_train), {}
    for kind in kinds:
        dist.barrier()
        try:
            results[kind] = train_peer(kind, config, shards, X, y, mesh)
        except Exception as error:  # noqa: BLE001 (reported: "if it runs on CPU with gloo")
            results[kind] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def run(kinds, config, workers):
    """{kind: {"step_time": rank 0's, "memory": one dict per rank, "params"} or {"error"}}."""
    import torch.distributed.fsdp  # noqa: F401 (imported once here: the forked ranks have them)
    import torch.distributed.optim  # noqa: F401
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory() as tmp:
        tmp_mp.start_processes(worker, nprocs=workers, join=True, start_method="fork",
                               args=(kinds, config, workers, str(Path(tmp) / "store"), tmp))
        ranks = [pickle.loads((Path(tmp) / f"rank{r}.pkl").read_bytes()) for r in range(workers)]
    out = {}
    for kind in kinds:
        errors = [f"rank {r}: {got[kind]['error']}" for r, got in enumerate(ranks)
                  if "error" in got[kind]]
        out[kind] = {"error": "; ".join(errors)} if errors else \
            {**ranks[0][kind], "memory": [got[kind]["memory"] for got in ranks]}
    return out
