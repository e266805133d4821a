"""Choose a parallel layout automatically: memory per device and step time of every dp × tp × pp.

The article ends by asking for the strategy to be chosen automatically. `plan` does what one does
by hand: for every grid dp · tp · pp = devices (the `Topology` of minidist.parallel.hybrid) it
estimates, for the busiest device (the first pipeline stage),

    model states  (b_p + b_g + b_o) · Ψ_s,  Ψ_s = Ψ · ⌈L/pp⌉ / (L · tp)       ZeRO (Rajbhandari et
                  al. 2020): b_p + b_g + b_o = 2 + 2 + 12 = 16 bytes for mixed-precision Adam;
                  ZeRO-1 divides b_o·Ψ_s by dp, ZeRO-2 also b_g·Ψ_s, ZeRO-3 all three
                  (memory.zero_shard)
    activations   k · ⌈L/pp⌉ · (w + s/tp) · h · b_a · T/(dp·m)                 Korthikanti et al.
                  2022: a transformer layer keeps T·h·(10 + 24/t) bytes in 16-bit (w = 5, s = 12)
                  k micro-batches held: min(pp, m) for 1F1B, m for GPipe (Narayanan et al. 2021)
    compute       6 Ψ T / (devices · F) · (1 + (pp−1)/m)                       6 FLOPs per parameter
                  per token (Kaplan et al. 2020), bubble / ideal = (p−1)/m (formulas.md)
    tensor comm   per micro-batch and layer, r ring all-reduces of T/(dp·m) · h · b_a bytes
                  over tp: 2(tp−1)α + 2(tp−1)/tp · n β each (Megatron-LM: r = 4 per layer)
    pipeline comm per micro-batch, α + nβ to the next stage (activations) and to the previous
                  one (gradients), n = T/(dp·m) · h · b_a
    data comm     one ring all-reduce of the device's gradient, n = b_g · Ψ_s, over dp; ZeRO-1
                  and 2: a reduce-scatter of it and an all-gather of θ, the same bytes; ZeRO-3
                  gathers θ twice, 1.5× (cost.zero_bytes_per_rank). With m micro-batches
                  ZeRO-2 reduce-scatters, and ZeRO-3 also gathers, once per micro-batch

T = batch · seq_len tokens per step, F the device's FLOP/s, β = 1 / bandwidth (Thakur et al.
2005, minidist.cost.time). Communication does not overlap compute here: the times are upper
bounds. Bytes are counted exactly as minidist.cost.bytes_per_rank (and comm.stats) count them.
"""

import math
from dataclasses import dataclass, field

from minidist.cost import bytes_per_rank, time, zero_bytes_per_rank
from minidist.memory import ZERO_SHARDED, check_stage, zero_shard


@dataclass(frozen=True)
class Layer:
    """Per token of one layer of width h: activations kept whole and split over tp (in units of
    h elements), tensor-parallel all-reduces of T × h (forward + backward), and whether the first
    layer's input needs a gradient (a transformer's embedding does, the training data does not)."""

    kept_whole: float
    kept_split: float
    all_reduces: int
    input_grad: bool


LAYERS = {  # transformer: Korthikanti et al. 2022, sbh(10 + 24/t) bytes at 2 bytes per number,
    # attention scores left out (FlashAttention); Megatron-LM: f and g twice per layer.
    "transformer": Layer(kept_whole=5, kept_split=12, all_reduces=4, input_grad=True),
    # minidist's Linear(h→h), ReLU, Linear(h→h), ReLU: Linear input and the last ReLU's input
    # whole, the split ReLU and row-parallel inputs split; g forward, f backward
    "mlp": Layer(kept_whole=2, kept_split=2, all_reduces=2, input_grad=False),
}


@dataclass(frozen=True)
class Recipe:
    """Bytes per parameter (value, gradient, optimizer state) and per activation."""

    param: int
    grad: int
    optimizer: int
    activation: int


RECIPES = {
    "mixed_adam": Recipe(2, 2, 12, 2),  # ZeRO: fp16 θ and ∇, fp32 θ, m, v (K = 12)
    "fp32_adam": Recipe(4, 4, 8, 4),
    "fp64_sgd": Recipe(8, 8, 0, 8),  # minidist's default: float64, plain SGD
    "fp64_momentum": Recipe(8, 8, 8, 8),
}
SCHEDULES = ("1f1b", "gpipe")
ZERO_STAGES = tuple(ZERO_SHARDED)  # plan's default: every stage, 0 (plain data parallel) to 3


@dataclass
class Layout:
    """One dp × tp × pp grid with ZeRO-`zero_stage` over dp: bytes per device (memory), seconds
    per step (time), bytes sent per device per step (sent), each by part with a "total"."""

    dp: int
    tp: int
    pp: int
    micro_batches: int
    memory: dict
    time: dict
    sent: dict
    fits: bool
    zero_stage: int = 0

    @property
    def kind(self):
        axes = [a for a in ("dp", "tp", "pp") if getattr(self, a) > 1]
        if len(axes) > 1:
            return "hybrid"
        return {"dp": "data", "tp": "tensor", "pp": "pipeline"}[axes[0]] if axes else "single"

    @property
    def name(self):
        return f"{self.dp}×{self.tp}×{self.pp}"

    @property
    def label(self):
        """The grid and, when it shards over dp, the ZeRO stage: "8×1×1 ZeRO-3"."""
        return self.name + (f" ZeRO-{self.zero_stage}" if self.zero_stage else "")


@dataclass
class Plan:
    """Every layout, the fastest that fits first; `best` (None if nothing fits) and why."""

    layouts: list
    best: Layout
    reasons: list = field(default_factory=list)
    device_memory: float = 0.0

    def table(self, rows=12):
        head = (f"{'':1} {'dp×tp×pp':>10} {'kind':>8} {'ZeRO':>4} {'m':>3} {'states':>9} "
                f"{'activ.':>9} {'total':>9} {'fits':>4} {'compute':>9} {'comm':>9} "
                f"{'step':>9}")
        lines = [head]
        for lay in self.layouts[:rows]:
            comm = lay.time["tensor"] + lay.time["pipeline"] + lay.time["data"]
            compute = lay.time["compute"] + lay.time["bubble"]
            lines.append(
                f"{'★' if lay is self.best else '':1} {lay.name:>10} {lay.kind:>8} "
                f"{lay.zero_stage:>4} {lay.micro_batches:>3} {_bytes(lay.memory['states']):>9} "
                f"{_bytes(lay.memory['activations']):>9} {_bytes(lay.memory['total']):>9} "
                f"{'yes' if lay.fits else 'no':>4} {_seconds(compute):>9} "
                f"{_seconds(comm):>9} {_seconds(lay.time['total']):>9}")
        if len(self.layouts) > rows:
            lines.append(f"  … {len(self.layouts) - rows} more layouts")
        return "\n".join(lines + ["", "recommendation:"] + [f"  - {r}" for r in self.reasons])

    def __str__(self):
        return self.table()

    def find(self, dp, tp, pp, zero_stage=0):
        """The layout with this grid and ZeRO stage (ValueError if it was not a candidate)."""
        for lay in self.layouts:
            if (lay.dp, lay.tp, lay.pp, lay.zero_stage) == (dp, tp, pp, zero_stage):
                return lay
        raise ValueError(f"no layout dp×tp×pp = {dp}×{tp}×{pp} with ZeRO stage {zero_stage} "
                         "among the candidates")


def _bytes(n):
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(s):
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def _positive(name, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check(n_params, n_layers, hidden, batch, devices, device_memory, bandwidth, flops,
           seq_len, layer, recipe, schedule, latency, devices_per_node, node_bandwidth):
    for name, value in (("n_layers", n_layers), ("hidden", hidden), ("batch", batch),
                        ("devices", devices), ("seq_len", seq_len),
                        ("devices_per_node", devices_per_node)):
        _positive(name, value, integer=True)
    for name, value in (("n_params", n_params), ("device_memory", device_memory),
                        ("bandwidth", bandwidth), ("flops", flops)):
        _positive(name, value)
    if node_bandwidth is not None:
        _positive("node_bandwidth", node_bandwidth)
    if not isinstance(latency, (int, float)) or latency < 0:
        raise ValueError(f"latency must be a number >= 0 (seconds), got {latency!r}")
    if isinstance(layer, str) and layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; allowed: {', '.join(LAYERS)} or a Layer")
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)} or a Recipe")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def estimate(n_params, n_layers, hidden, batch, devices, device_memory, bandwidth, flops, dp=1,
             tp=1, pp=1, *, seq_len=1, layer="transformer", recipe="mixed_adam",
             micro_batches=None, schedule="1f1b", recompute=False, latency=5e-6,
             devices_per_node=1, node_bandwidth=None, node_latency=None, zero_stage=0):
    """The Layout of one grid dp × tp × pp (see the module's formulas); a ValueError names what
    makes the grid impossible. micro_batches: None means min(4·pp, batch/dp) with a pipeline
    (GPipe's m ≥ 4p), else 1. recompute: keep only each layer's input (2·s·b·h·L bytes,
    Korthikanti et al. 2022) and one layer's activations, at the price of a second forward
    (8 Ψ T FLOPs). Groups of ranks inside one node of `devices_per_node` (tp first, as in
    Topology's rank order) use node_bandwidth / node_latency. zero_stage: 0 (plain data
    parallelism) or the ZeRO stage 1, 2 or 3 that shards the model states over dp."""
    _check(n_params, n_layers, hidden, batch, devices, device_memory, bandwidth, flops, seq_len,
           layer, recipe, schedule, latency, devices_per_node, node_bandwidth)
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp)):
        _positive(name, value, integer=True)
    stage = check_stage(zero_stage, "zero_stage")
    if dp * tp * pp != devices:
        raise ValueError(f"dp×tp×pp = {dp}×{tp}×{pp} = {dp * tp * pp} ranks, but devices="
                         f"{devices}: the grid must use every device exactly once")
    if hidden % tp:
        raise ValueError(f"tp={tp} does not divide hidden={hidden}: tensor parallelism splits "
                         "every weight matrix into equal parts")
    if pp > n_layers:
        raise ValueError(f"pp={pp} pipeline stages for n_layers={n_layers}: a stage needs a layer")
    if batch < dp:
        raise ValueError(f"batch={batch} is smaller than dp={dp}: every replica needs a sample")
    m = micro_batches if micro_batches is not None else (min(4 * pp, batch // dp) if pp > 1
                                                         else 1)
    _positive("micro_batches", m, integer=True)
    if batch < dp * m:
        raise ValueError(f"batch={batch} cannot give dp={dp} replicas {m} micro-batches of at "
                         "least one sample each")
    layer = LAYERS[layer] if isinstance(layer, str) else layer
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    node_bandwidth = node_bandwidth or bandwidth
    node_latency = latency if node_latency is None else node_latency

    stage_layers = math.ceil(n_layers / pp)
    local = n_params * stage_layers / (n_layers * tp)  # Ψ_s: parameters on the busiest device
    tokens = batch * seq_len / (dp * m)  # per micro-batch and replica
    per_layer = (layer.kept_whole + layer.kept_split / tp) * hidden * recipe.activation * tokens
    held = (min(pp, m) if schedule == "1f1b" else m) if pp > 1 else 1
    if recompute:
        activations = held * stage_layers * hidden * recipe.activation * tokens + per_layer
    else:
        activations = held * stage_layers * per_layer
    memory = zero_shard({"params": recipe.param * local, "grads": recipe.grad * local,
                         "optimizer": recipe.optimizer * local}, stage, dp)
    memory["activations"] = activations
    memory["states"] = memory["params"] + memory["grads"] + memory["optimizer"]
    memory["total"] = memory["states"] + activations

    def link(group_span):  # (α, β) of a group whose ranks span `group_span` consecutive ranks
        inside = group_span <= devices_per_node and devices_per_node % group_span == 0
        return (node_latency, 1 / node_bandwidth) if inside else (latency, 1 / bandwidth)

    sent, seconds = {}, {}
    elements = round(tokens * hidden)  # one micro-batch's T × h
    reduces = m * (stage_layers * layer.all_reduces - (pp == 1 and not layer.input_grad))
    sent["tensor"] = reduces * bytes_per_rank("all_reduce", "ring", elements,
                                              recipe.activation, tp)[0][0] if tp > 1 else 0
    seconds["tensor"] = reduces * time("all_reduce", "ring", elements * recipe.activation, tp,
                                       *link(tp)) if tp > 1 else 0.0
    messages = m * (2 if pp > 2 else 1) if pp > 1 else 0
    alpha, beta = link(tp * pp)
    sent["pipeline"] = messages * elements * recipe.activation
    seconds["pipeline"] = messages * (alpha + elements * recipe.activation * beta)
    grads, link_dp = round(local), link(devices)
    if stage == 0:
        sent["data"] = bytes_per_rank("all_reduce", "ring", grads, recipe.grad, dp)[0][0]
        seconds["data"] = time("all_reduce", "ring", grads * recipe.grad, dp, *link_dp)
    else:  # reduce-scatter ∇ (ZeRO-2, 3: per micro-batch), all-gather θ (once after the step;
        # ZeRO-3: for each micro-batch's forward and backward; zero_bytes_per_rank counts both)
        rs, ag = (zero_bytes_per_rank(stage, [grads], b, dp) for b in (recipe.grad, recipe.param))
        scatters, gathers = (1 if stage == 1 else m), (m if stage == 3 else 1)
        sent["data"] = scatters * rs["reduce_scatter"] + gathers * ag["all_gather"]
        scatter = time("reduce_scatter", "ring", grads * recipe.grad, dp, *link_dp)
        gather = time("all_gather", "ring", grads * recipe.param, dp, *link_dp)
        seconds["data"] = scatters * scatter + gathers * (2 if stage == 3 else 1) * gather
    sent["total"] = sum(sent.values())
    work = (8 if recompute else 6) * n_params * batch * seq_len / (devices * flops)
    seconds["compute"], seconds["bubble"] = work, work * (pp - 1) / m
    seconds["total"] = sum(seconds.values())
    return Layout(dp, tp, pp, m, memory, seconds, sent, memory["total"] <= device_memory,
                  stage)


def plan(n_params, n_layers, hidden, batch, devices, device_memory, bandwidth, flops,
         zero_stages=ZERO_STAGES, **options):
    """Every possible dp × tp × pp = devices, with each ZeRO stage in `zero_stages` over dp
    (`estimate` for each; options as there; a grid with dp = 1 has nothing to shard and comes
    once, as stage 0), the fastest that fits in `device_memory` bytes recommended with its
    reasons; at equal time the lower stage. n_params: Ψ; hidden: the width h; batch: samples
    per step (of seq_len tokens); bandwidth: bytes/s between devices; flops: FLOP/s of one
    device. Returns a Plan; print it for a table."""
    _check(n_params, n_layers, hidden, batch, devices, device_memory, bandwidth, flops,
           options.get("seq_len", 1), options.get("layer", "transformer"),
           options.get("recipe", "mixed_adam"), options.get("schedule", "1f1b"),
           options.get("latency", 5e-6), options.get("devices_per_node", 1),
           options.get("node_bandwidth"))
    if "zero_stage" in options:
        raise ValueError("plan takes zero_stages, the ZeRO stages to consider (e.g. (0, 3)), "
                         "not zero_stage")
    stages = _check_stages(zero_stages)
    layouts, refused = [], []
    for dp in _divisors(devices):
        for tp in _divisors(devices // dp):
            for stage in stages if dp > 1 else (0,):
                try:
                    layouts.append(estimate(n_params, n_layers, hidden, batch, devices,
                                            device_memory, bandwidth, flops, dp, tp,
                                            devices // (dp * tp), zero_stage=stage, **options))
                except ValueError as error:
                    refused.append(str(error))
    if not layouts:
        raise ValueError(f"no dp×tp×pp grid of devices={devices} is possible: "
                         + "; ".join(refused[:3]))
    layouts.sort(key=lambda lay: (not lay.fits, lay.time["total"], lay.zero_stage,
                                  lay.memory["total"]))
    best = layouts[0] if layouts[0].fits else None
    return Plan(layouts, best, _reasons(layouts, best, device_memory, stages), device_memory)


def _check_stages(zero_stages):
    """zero_stages: a non-empty tuple, list or set of ZeRO stages (0–3); sorted, once each."""
    if not isinstance(zero_stages, (tuple, list, set, frozenset, range)) or not zero_stages:
        raise ValueError(f"zero_stages must be a non-empty tuple of ZeRO stages from 0, 1, 2, "
                         f"3, got {zero_stages!r}")
    return sorted({check_stage(stage, "zero_stages") for stage in zero_stages})


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _reasons(layouts, best, device_memory, stages):
    limit = _bytes(device_memory)
    fitting = [lay for lay in layouts if lay.fits]
    if best is None:
        small = min(layouts, key=lambda lay: lay.memory["total"])
        shard = "" if 3 in stages else ", shard the model states (ZeRO: zero_stages=(0, 1, 2, 3))"
        return [f"no layout fits in {limit} per device: the smallest, {small.label} "
                f"({small.kind}), needs {_bytes(small.memory['total'])}",
                f"add devices, recompute activations (recompute=True){shard} or lower the batch"]
    t, mem = best.time, best.memory
    out = [f"{best.label} ({best.kind}, {best.micro_batches} micro-batch"
           f"{'es' if best.micro_batches > 1 else ''}) fits: {_bytes(mem['total'])} of {limit} "
           f"per device ({_bytes(mem['states'])} model states, {_bytes(mem['activations'])} "
           "activations)",
           f"the fastest of the {len(fitting)} layouts that fit: {_seconds(t['total'])} per step "
           f"= compute {_seconds(t['compute'])} + bubble {_seconds(t['bubble'])} + tensor "
           f"{_seconds(t['tensor'])} + pipeline {_seconds(t['pipeline'])} + data "
           f"{_seconds(t['data'])}"]
    plain = {(lay.dp, lay.tp, lay.pp): lay for lay in layouts if lay.zero_stage == 0}
    twin = plain.get((best.dp, best.tp, best.pp))
    if best.zero_stage and twin is not None:
        data_time = (f"the same data communication ({_seconds(t['data'])})"
                     if t["data"] == twin.time["data"] else f"data communication "
                     f"{_seconds(t['data'])} instead of {_seconds(twin.time['data'])}")
        out.append(f"ZeRO-{best.zero_stage} shards the {', '.join(ZERO_SHARDED[best.zero_stage])}"
                   f" over dp={best.dp}: {_bytes(mem['states'])} of model states per device "
                   f"instead of {_bytes(twin.memory['states'])}, {data_time}")
    data = next((lay for lay in layouts if lay.kind in ("data", "single")
                 and lay.tp == lay.pp == 1 and lay.zero_stage == 0), None)
    if data is not None and not data.fits:
        sharded = next((lay for lay in fitting if lay.tp == lay.pp == 1), None)
        out.append(f"pure data parallelism does not fit: every replica needs "
                   f"{_bytes(data.memory['total'])} ({_bytes(data.memory['states'])} of model "
                   "states), so " + ("the model must be split" if sharded is None else
                                     f"they must be sharded: {sharded.label} fits"))
    second = next((lay for lay in fitting if lay.name != best.name), None)  # another grid
    if second is not None:
        out.append(f"runner-up {second.label} ({second.kind}): "
                   f"{_seconds(second.time['total'])}, "
                   f"{100 * (second.time['total'] / t['total'] - 1):.0f}% slower")
    return out
