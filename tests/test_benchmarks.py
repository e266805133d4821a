"""The benchmarks' honesty rules: a crashed peer is retried once, then reported (never a
traceback that loses the other peers' results); no fraction of the all-reduce limit above 1."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, load_file

allreduce = load_file("benchmarks/allreduce.py", "benchmark_allreduce")

# the benchmark as `python benchmarks/data_parallel.py ARGS`, with torch made unimportable
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_a_crashed_peer_is_retried_once_then_reported_and_the_others_are_kept(tmp_path):
    # 2 workers: a rank aborts (SIGABRT) in every attempt; 1 worker: in the first attempt only.
    # The crash reads "killed by signal SIGABRT", or "the rank died" when minidist's launcher
    # lets the closed pipe through as an EOFError
    script = str(ROOT / "benchmarks" / "data_parallel.py")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, script, "--configs", "digits", "--quick",
         "--peers", "single", "minidist", "--quiet-wait", "0", "--busy", "99",
         "--out", str(tmp_path), "--inject-abort", "minidist:2", "--inject-abort", "minidist:1:1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads((tmp_path / "data_parallel.json").read_text())
    assert (tmp_path / "data_parallel.png").stat().st_size > 0
    assert report["machine"]["torch"] is None
    (config,) = report["configs"]
    rows = {(r["peer"], r["workers"]): r for r in config["rows"]}
    assert list(rows) == [("minidist single", 1), ("minidist data_parallel", 1),
                          ("minidist data_parallel", 2)]

    crashed = rows[("minidist data_parallel", 2)]  # tried twice, then reported
    assert crashed["crashed"] is True and crashed["attempts"] == [2]
    assert len(crashed["crashes"]) == 2
    assert all("SIGABRT" in c or "died" in c for c in crashed["crashes"]), crashed["crashes"]
    assert crashed["samples_per_s"] is None and crashed["median_step_s"] is None

    retried = rows[("minidist data_parallel", 1)]  # crashed once, ran on the retry
    assert retried["crashed"] is False and len(retried["crashes"]) == 1
    assert "SIGABRT" in retried["crashes"][0] or "died" in retried["crashes"][0]
    assert retried["samples_per_s"] > 0 and retried["params_gap_vs_single"] < 1e-10

    single = rows[("minidist single", 1)]  # untouched, and its results kept
    assert single["crashed"] is False and not single["crashes"] and single["samples_per_s"] > 0
    assert 0.5 < single["test_accuracy"] <= 1.0

    summary = config["summary"]
    assert summary["crashed_peers"] == ["minidist data_parallel 2w"]
    assert summary["efficiency_2w_minidist"] is None  # it needs the crashed peer
    assert summary["data_parallel_matches_single"] is None
    assert "CRASHED in all 2 tries" in done.stdout and "crashed 1× and was retried" in done.stdout


def test_the_least_traffic_of_an_all_reduce():
    # per rank: its chunk of all p buffers read, its chunk written; the other chunks copied
    assert allreduce.traffic_bytes(2**20, 2) == (1.5 * 2**20, 2**20)
    assert allreduce.traffic_bytes(3000, 3) == (5000, 3000)
    # its two phases, run on every rank in turn (phase 1 everywhere, then phase 2), all-reduce
    p, n = 3, 11
    x = np.arange(n, dtype=np.float32)
    bufs = [x * (r + 1) for r in range(p)]
    phases = [allreduce.least_traffic(bufs[r], {s: bufs[s] for s in range(p) if s != r}, r, p)
              for r in range(p)]
    for phase in range(2):
        for r in range(p):
            phases[r][phase]()
    for r in range(p):
        np.testing.assert_array_equal(bufs[r], 6 * x)


def test_no_fraction_of_the_limit_above_one():
    assert allreduce.fraction_of_limit(0.5, 1.0) == (0.5, 0.5, False)
    fraction, measured, clipped = allreduce.fraction_of_limit(1.05, 1.0)
    assert (fraction, clipped) == (1.0, True) and measured == 1.05
    native, limit, mpich = allreduce.NATIVE, allreduce.LIMIT, "MPICH Allreduce"
    sizes = [4096, 16384]
    times = {(native, 4096): [2.0], (limit, 4096): [1.0], (mpich, 4096): [0.9],  # load changed
             (native, 16384): [1.0], (limit, 16384): [1.05], (mpich, 16384): [3.0]}  # noise
    rows = allreduce.result_rows(times, [native, mpich, limit], sizes, 2)
    assert all(r["fraction_of_limit"] <= 1 for r in rows if "fraction_of_limit" in r)
    by = {(r["peer"], r["bytes"]): r for r in rows}
    assert by[(mpich, 4096)]["fraction_clipped"] and not by[(mpich, 16384)]["fraction_clipped"]
    assert by[(native, 16384)]["fraction_clipped"]
    assert not allreduce.limit_violations(rows)  # 5 % is noise: clipped and flagged
    times[(limit, 16384)] = [1.5]  # beside the limit, minidist 1.5× faster than it: a bug
    assert allreduce.limit_violations(allreduce.result_rows(times, [native, mpich, limit],
                                                            sizes, 2))


def test_the_transformer_benchmark_times_the_same_computation_and_renders(tmp_path):
    bench = load_file("benchmarks/transformer.py", "benchmark_transformer")
    bench.main(["--quick", "--threads", "1", "--dtypes", "float64", "--no-profile",
                "--quiet-wait", "0", "--retries", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "transformer.json").read_text())
    assert (tmp_path / "transformer.png").stat().st_size > 0
    assert result["command"].startswith("python benchmarks/transformer.py --quick")
    (row,) = result["rows"]
    assert (row["dtype"], row["threads"], row["vocab"]) == ("float64", 1, 96)
    assert row["loss_gap"] < 1e-10 and row["grad_gap"] < 1e-8 and row["sdpa_loss_gap"] < 1e-10
    assert row["minidist_ms"] > 0 and row["torch_ms"] > 0 and row["numpy_fc_gflops"] > 0
    assert row["torch_over_minidist"] == row["torch_ms"] / row["minidist_ms"]
    assert row["contended"] in (True, False, None) and row["runs_repeated"] == 0  # --retries 0
    assert set(result["minidist_code"]) == {"transformer.py", "attention.py", "layers.py"}
    report = load_file("benchmarks/report.py", "benchmark_report")
    text = report.render_result("transformer", result)
    assert "(`make bench-transformer` runs it again)" in text
    assert "| config | d_model |" in text and "torch_over_minidist" in text


def test_the_transformer_check_catches_a_different_computation():
    import torch

    bench = load_file("benchmarks/transformer.py", "benchmark_transformer")
    config = bench.QUICK[0]
    X, Y, vocab = bench.text_batch(config)
    model = bench.minidist_gpt(config, vocab, np.float64)
    torch_model = bench.torch_gpt(model, sdpa=False)
    bench.copy_weights(model, torch_model)
    fns = bench.step_functions(model, {"torch": torch_model}, X, Y)
    assert max(bench.check_same(model, torch_model, fns, "torch")) < 1e-10
    torch_model = bench.torch_gpt(model, sdpa=False)
    bench.copy_weights(model, torch_model)
    with torch.no_grad():
        torch_model[1].attn.qkv.weight[0, 0] += 1e-3  # one weight off: the check must see it
    fns = bench.step_functions(model, {"torch": torch_model}, X, Y)
    loss_gap, grad_gap, _ = bench.check_same(model, torch_model, fns, "torch")
    assert loss_gap > 1e-10 and grad_gap > 1e-8


def test_the_transformer_benchmark_without_torch_times_minidist_alone(tmp_path):
    script = str(ROOT / "benchmarks" / "transformer.py")
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, script, "--quick", "--threads",
                           "1", "--quiet-wait", "0", "--retries", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "no ratios" in done.stderr
    result = json.loads((tmp_path / "transformer.json").read_text())
    assert result["machine"]["torch"] is None and len(result["rows"]) == 2  # float64, float32
    for row in result["rows"]:
        assert row["minidist_ms"] > 0 and row["torch_ms"] is None
        assert row["torch_over_minidist"] is None and row["loss_gap"] is None
    assert result["profile"] and result["profile"][0]["self_ms_per_step"] > 0


def test_the_zero_benchmark_runs_every_peer_on_the_same_sgd_and_counts_memory(tmp_path):
    # the tiny --quick run: 5 minidist peers and the 4 PyTorch ones (one start of 2 ranks)
    pytest.importorskip("torch")
    from minidist import data, memory, nn
    from minidist.parallel.buckets import units

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zero.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    result = json.loads((tmp_path / "zero.json").read_text())
    assert (tmp_path / "zero.png").stat().st_size > 0
    rows = {r["peer"]: r for r in result["rows"]}
    assert list(rows) == ["dp", "dp_overlap", "zero1", "zero2", "zero3", "ddp",
                          "zero_redundancy", "fsdp_grad_op", "fsdp"]
    for row in rows.values():  # every peer ran, and computed minidist data_parallel's SGD
        assert not row["failed"], row["errors"]
        assert row["params_gap_vs_dp"] < 1e-10 and row["steps_per_s"] > 0
    model = nn.mlp(result["sizes"])
    psi, n = model.num_params, result["workers"]
    held = {(m["peer"], m["rank"]): m for m in result["memory"]}
    for key, stage in (("dp", 0), ("dp_overlap", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3)):
        for rank in range(n):  # the ledger's persistent bytes are the formula's, exactly
            m = held[(key, rank)]
            cut = units(model, rows[key]["options"]["bucket_bytes"])
            formula = memory.zero_state_bytes([u.size for u in cut], stage, n)
            assert {k: m[k] for k in formula} == formula, (key, rank)
            start, stop = data.shard_bounds(result["batch"], rank, n)
            kept = memory.mlp_unit_activations(stop - start, result["sizes"], cut)
            assert m["formula_peak"] == m["peak"] == memory.zero_peak_bytes(
                [u.size for u in cut], stage, n, activations=kept,
                overlap=rows[key]["options"]["overlap"])
            assert m["peak_over_formula"] == m["peak"] / m["formula_peak"]
            assert m["state_over_formula"] == 1.0
    # PyTorch's counted tensors: Ψ float64s each (DDP), the optimizer state split (ZeRO-1),
    # everything halved by FSDP (each parameter's dim 0 padded to a multiple of 2: exact here);
    # the saved activations as minidist's (nll_loss keeps one 8-byte scalar more)
    rows_per_rank = result["batch"] // n
    for rank in range(n):
        assert held[("dp", rank)]["activations"] == memory.mlp_activation_bytes(
            rows_per_rank, result["sizes"])
        assert [held[("ddp", rank)][k] for k in ("params", "grads", "optimizer")] == [8 * psi] * 3
        shards = [held[("zero_redundancy", r)]["optimizer"] for r in range(n)]
        assert sum(shards) == 8 * psi and 0 < min(shards)
        for key in ("fsdp_grad_op", "fsdp"):
            assert [held[(key, rank)][k] for k in ("params", "grads", "optimizer")] == \
                [8 * psi // n] * 3
        for key in ("ddp", "zero_redundancy", "fsdp_grad_op", "fsdp"):
            assert held[(key, rank)]["activations"] == held[("dp", rank)]["activations"] + 8
    rate = {key: row["steps_per_s"] for key, row in rows.items()}
    assert [(s["minidist"], s["peer"], s["ratio"]) for s in result["speed_ratios"]] == [
        (a, b, rate[a] / rate[b]) for a, b in [("dp", "ddp"), ("dp_overlap", "ddp"),
                                               ("zero1", "zero_redundancy"),
                                               ("zero2", "fsdp_grad_op"), ("zero3", "fsdp")]]
    overlap = result["overlap"]
    assert overlap["ratio"] == overlap["exposed_with_ms"] / overlap["exposed_without_ms"]
    report = load_file("benchmarks/report.py", "benchmark_report")
    text = report.render_result("zero", result)
    assert "(`make bench-zero` runs it again)" in text and "| peer | label |" in text


def test_the_parallel_transformer_benchmark_meets_its_formulas_and_single(tmp_path):
    # the tiny --quick run: single, Megatron TP and SP, 1F1B and interleaved pipelines, and
    # PyTorch's own TP and TP+SP (2 gloo ranks); every figure checked against a formula here
    pytest.importorskip("torch")
    from minidist import cost, memory, nn
    from minidist.parallel.pipeline import stage_bounds

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel_transformer.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    result = json.loads((tmp_path / "parallel_transformer.json").read_text())
    assert (tmp_path / "parallel_transformer.png").stat().st_size > 0
    rows = {r["peer"]: r for r in result["rows"]}
    pipelines = [f"pp=2 {s} m={m}" for s in ("1f1b", "interleaved_1f1b v=2") for m in (2, 4, 8)]
    assert list(rows) == ["single", "tp=2", "tp=2 SP", *pipelines, "PyTorch TP", "PyTorch TP+SP"]
    for row in rows.values():  # every peer ran and trained as one process does
        assert not row["errors"] and row["step_ms"] > 0 and row["params_gap_vs_single"] < 1e-10
    c = result["config"]
    N, T, d = c["batch"], c["context"], c["d_model"]
    model = nn.gpt(c["vocab"], T, d, c["n_heads"], c["n_layers"])
    for sp in (False, True):
        row = rows["tp=2 SP" if sp else "tp=2"]
        assert row["bytes_per_rank"] == [cost.megatron_bytes_per_rank(model, N, T, 2, sp, r)[
            "total"] for r in range(2)]
        assert row["activations_per_rank"] == [memory.megatron_activation_bytes(
            N, T, model, 2, sp, r) for r in range(2)]
    assert rows["tp=2 SP"]["activations_per_rank"][0] < rows["tp=2"]["activations_per_rank"][0]
    assert rows["single"]["activations_per_rank"] == [memory.megatron_activation_bytes(N, T,
                                                                                       model)]
    for m in (2, 4, 8):
        # each stage sends every micro-batch's (N/m, T, d) float64s once per chunk boundary:
        # 1F1B one (forward or back); interleaved 3 (chunk 0→1→2→3: two inner chunks both ways)
        plain, interleaved = rows[f"pp=2 1f1b m={m}"], rows[f"pp=2 interleaved_1f1b v=2 m={m}"]
        assert plain["bytes_per_rank"] == [N * T * d * 8] * 2
        assert interleaved["bytes_per_rank"] == [3 * N * T * d * 8] * 2
        # 1F1B: stage s stashes min(p − s, m) micro-batches of its layers
        assert plain["activations_per_rank"] == [min(2 - s, m) * memory.megatron_activation_bytes(
            N // m, T, model, layers=layers) for s, layers in enumerate(stage_bounds(model, 2))]
        for row, v in ((plain, 1), (interleaved, 2)):
            assert row["bubble_formula"] == 1 / (v * m + 1) and 0 < row["bubble"] < 1
    by = {name: row["step_ms"] for name, row in rows.items()}
    assert result["pytorch_over_minidist_step_time"] == {
        "tp": by["PyTorch TP"] / by["tp=2"], "sp": by["PyTorch TP+SP"] / by["tp=2 SP"]}
    assert rows["tp=2"]["speed_vs_single"] == by["single"] / by["tp=2"]
    report = load_file("benchmarks/report.py", "benchmark_report")
    text = report.render_result("parallel_transformer", result)
    assert "(`make bench-parallel-transformer` runs it again)" in text


def test_the_long_context_benchmark_checks_all_to_all_context_and_experts(tmp_path):
    # the tiny --quick run: all_to_all 4 KiB … 1 MiB (minidist, MPICH, gloo when torch is
    # here), then single / cp=2 (both layouts) on a GPT, single / dp=2 / ep=2 on a MoE GPT
    from minidist import cost, memory, nn

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_context.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    result = json.loads((tmp_path / "long_context.json").read_text())
    assert (tmp_path / "long_context.png").stat().st_size > 0
    peers = ["minidist native", "minidist pairwise", "MPICH Alltoallv"] + (
        ["PyTorch gloo"] if result["machine"]["torch"] else [])
    sizes = [4096 * 4**k for k in range(5)]  # 4 KiB … 1 MiB
    a2a = {(r["peer"], r["bytes"]): r for r in result["all_to_all"]}
    assert sorted(a2a) == sorted((p, n) for p in peers for n in sizes)
    for (_, n), r in a2a.items():  # busBW = (p−1)/p·n/t; speed = t(MPICH)/t
        assert r["busbw_GBps"] == pytest.approx(n / 2 / (r["median_us"] * 1e-6) / 1e9)
        assert r["speed_vs_mpich"] == pytest.approx(
            a2a[("MPICH Alltoallv", n)]["median_us"] / r["median_us"])
    rows = {r["peer"]: r for r in result["training"]}
    assert list(rows) == ["single (cp)", "cp=2", "cp=2 load_balance", "single (ep)", "dp=2",
                          "ep=2"]
    for row in rows.values():
        assert not row["errors"] and row["step_ms"] > 0 and row["params_gap_vs_single"] < 1e-10
    c = result["configs"]["cp"]
    N, T, d, L, H = c["batch"], c["context"], c["d_model"], c["n_layers"], c["n_heads"]
    gpt = nn.gpt(96, T, d, H, L)
    B = N * (T // 2) * d * 8  # one rank's K (or V) of one block: forward 2B, backward 4B + 2B
    ring = 8 * gpt.num_params  # ring all-reduce on 2 ranks: 2(p−1)/p·Ψ·8 (Ψ even)
    assert gpt.num_params % 2 == 0
    single_act = rows["single (cp)"]["activations_per_rank"][0]
    assert single_act == memory.megatron_activation_bytes(N, T, gpt)
    for name in ("cp=2", "cp=2 load_balance"):
        assert rows[name]["step_bytes_per_rank"] == [L * 8 * B + ring] * 2
        held = rows[name]["activations_per_rank"]
        assert held[0] == held[1] == memory.context_activation_bytes(N, T, gpt, 2)
        lse, softmax = L * H * N * (T // 2) * 8, L * H * N * T * T * 8  # kept vs never kept
        assert 2 * (held[0] - lse) + softmax == single_act
    e = result["configs"]["ep"]
    moe = nn.gpt(96, e["context"], e["d_model"], e["n_heads"], e["n_layers"],
                 n_experts=e["n_experts"], top_k=e["top_k"])
    psi_x = 2 * e["d_model"] * 4 * e["d_model"] + 4 * e["d_model"] + e["d_model"]
    assert rows["ep=2"]["params_held_per_rank"] == [
        8 * (moe.num_params - e["n_layers"] * e["n_experts"] // 2 * psi_x)] * 2
    assert rows["dp=2"]["params_held_per_rank"] == [8 * moe.num_params] * 2
    assert rows["dp=2"]["step_bytes_per_rank"] == [sum(cost.bytes_per_rank(
        "all_reduce", "ring", n, 8, 2)[0][0] for n in _bucket_sizes(moe.num_params))] * 2
    assert all(0 < a < b for a, b in zip(rows["ep=2"]["all_to_all_bytes_per_rank"],
                                         rows["ep=2"]["bytes_per_rank"], strict=True))
    assert max(rows["ep=2"]["step_bytes_per_rank"]) < min(rows["dp=2"]["step_bytes_per_rank"])
    by = {name: row["step_ms"] for name, row in rows.items()}
    assert result["step_time_ratios"] == {"cp=2 / single (cp)": by["cp=2"] / by["single (cp)"],
                                          "cp=2 load_balance / single (cp)":
                                          by["cp=2 load_balance"] / by["single (cp)"],
                                          "ep=2 / dp=2": by["ep=2"] / by["dp=2"]}
    assert rows["ep=2"]["speed_vs_single"] == by["single (ep)"] / by["ep=2"]


def _bucket_sizes(n, per_bucket=(1 << 20) // 8):
    """data_parallel's default buckets of 1 MiB of float64s, written out."""
    return [min(per_bucket, n - start) for start in range(0, n, per_bucket)]
