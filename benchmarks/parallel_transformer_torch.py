"""The PyTorch peers of benchmarks/parallel_transformer.py: PyTorch's own tensor parallelism
(torch.distributed.tensor.parallel over gloo, CPU), plain and with sequence parallelism.

`run(config, reference)` forks 2 ranks (torch.multiprocessing, start method fork: they inherit
the parent's imports), joins one gloo group (a file:// store, a 120 s timeout), and runs
"PyTorch TP" then "PyTorch TP+SP", each fresh from minidist's initial weights
(benchmarks/transformer.torch_gpt and copy_weights), one thread per rank, float64. The plan
(`plan`) is Megatron's, as torchtitan writes it: ColwiseParallel on qkv, fc and the head,
RowwiseParallel on out and proj; with SP, SequenceParallel on every LayerNorm,
PrepareModuleInput (Shard(1) → Replicate: the all-gather) before the attention and the MLP,
RowwiseParallel(output_layouts=Shard(1)) (the reduce-scatter), and the embedding's output cut
along the sequence (PrepareModuleOutput, no communication). The embedding stays whole on each
rank (minidist splits its vocabulary) and the head's logits are gathered (Replicate) for
F.cross_entropy. A peer that raises is recorded with its error; the other still runs.
"""

import datetime
import pickle
import tempfile
import time
import types
from pathlib import Path

import numpy as np

P = 2
PEERS = {"PyTorch TP": False, "PyTorch TP+SP": True}  # label: sequence parallel


def regroup(p, t, H, back=False):
    """W_qkv (or b_qkv) rows (i, h, j) → (rank, i, h_local, j) (back: the reverse), so that
    ColwiseParallel's contiguous row blocks hold q, k and v of the rank's own heads."""
    split = (t, 3) if back else (3, t)
    return p.reshape(*split, H // t, -1, *p.shape[1:]).transpose(0, 1).reshape(p.shape)


def local_attention(self, x):
    """transformer.torch_gpt's attention over the heads this rank holds (qkv regrouped)."""
    N, T, _ = x.shape
    q, k, v = self.qkv(x).view(N, T, 3, -1, self.d_head).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / self.d_head ** 0.5
    o = scores.masked_fill(self.mask[:T, :T], float("-inf")).softmax(-1) @ v
    return self.out(o.transpose(1, 2).reshape(N, T, -1))


def plan(n_layers, sp):
    """parallelize_module's plan for torch_gpt's Sequential (embedding, blocks, ln_f, head)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    row = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    out = {f"{n_layers + 2}": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                               output_layouts=Replicate())}
    for i in range(1, n_layers + 1):
        out.update({f"{i}.attn.qkv": ColwiseParallel(), f"{i}.mlp.fc": ColwiseParallel(),
                    f"{i}.attn.out": row, f"{i}.mlp.proj": row})
        if sp:
            out.update({f"{i}.{name}": SequenceParallel() for name in ("ln1", "ln2")})
            out.update({f"{i}.{name}": PrepareModuleInput(input_layouts=Shard(1),
                                                          desired_input_layouts=Replicate())
                        for name in ("attn", "mlp")})
    if sp:
        out["0"] = PrepareModuleOutput(output_layouts=Replicate(),
                                       desired_output_layouts=Shard(1))
        out[f"{n_layers + 1}"] = SequenceParallel()
    return out


def train(config, sp, mesh, reference):
    """PyTorch TP (sp: + SP) from minidist's initial weights: rank 0's step times, the losses
    and max |Δ| of the final parameters to single's."""
    import torch
    import transformer
    from torch.distributed.tensor.parallel import parallelize_module

    X, Y, vocab = transformer.text_batch(config)
    model = transformer.minidist_gpt(config, vocab, np.float64)
    net = transformer.torch_gpt(model, sdpa=False)
    transformer.copy_weights(model, net)
    H, t = model.n_heads, mesh.size()
    for block in list(net)[1:-2]:
        with torch.no_grad():
            for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                p.copy_(regroup(p, t, H))
        block.attn.d_head = model.d_model // H
        block.attn.forward = types.MethodType(local_attention, block.attn)
    parallelize_module(net, mesh, plan(model.n_layers, sp))
    step, times, losses = transformer.torch_step(net, X, Y), [], []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    model.params = reference
    gaps = []
    for name, p in transformer.paired(model, net):
        full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        full = regroup(full, t, H, back=True) if name.endswith("_qkv") else full
        want = transformer.torch_layout(name, transformer.view(model, model.params, name))
        gaps.append(float(np.max(np.abs(full.numpy() - want))))
    return {"step_s": float(np.median(times[1:])), "loss": losses, "gap": max(gaps)}


def worker(rank, config, reference, store, out):
    """Rank `rank`: each PyTorch peer in turn; a peer's error is recorded, not raised."""
    import torch
    import torch.distributed as dist
    from threadpoolctl import threadpool_limits
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=120))
    mesh, results = init_device_mesh("cpu", (P,)), {}
    for name, sp in PEERS.items():
        dist.barrier()
        try:
            results[name] = train(config, sp, mesh, reference)
        except Exception as error:  # noqa: BLE001 (reported: "if it runs on CPU with gloo")
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def run(config, reference):
    """{peer: rank 0's result or {"error"}}; ranks forked (they inherit torch's imports)."""
    import torch.distributed.tensor.parallel  # noqa: F401
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory() as tmp:
        tmp_mp.start_processes(worker, nprocs=P, join=True, start_method="fork",
                               args=(config, reference, str(Path(tmp) / "store"), tmp))
        return pickle.loads((Path(tmp) / "rank0.pkl").read_bytes())
