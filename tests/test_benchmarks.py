"""The benchmarks' honesty rules: a crashed peer is retried once, then reported (never a
traceback that loses the other peers' results); no fraction of the all-reduce limit above 1."""

import json
import subprocess
import sys

import numpy as np
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
