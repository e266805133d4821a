import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from minidist import cli, data, tour, train


def test_tour_prints_one_table_and_saves_figures(tmp_path, capsys):
    rows = cli.tour(workers=2, backend="thread", steps=60, outdir=str(tmp_path))
    out = capsys.readouterr().out
    assert [r["strategy"] for r in rows] == [label for label, _, _ in cli.TOUR]
    for (_, strategy, options), row in zip(cli.TOUR, rows, strict=True):
        asynchronous = options.get("consistency") in ("asp", "ssp")
        assert row["same as single"].startswith("differs" if asynchronous else "yes"), row
        assert (0.5 if asynchronous else 0.8) < row["test acc"] <= 1.0, row  # chance: 0.1
        assert row["MB sent/worker"] > 0 or strategy == "single"
    assert "same as single" in out and "MB sent/worker" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytes_per_strategy.png",
                                                          "loss_curves.png", "timelines.png"]


@pytest.mark.parametrize("workers, strategy, expected", [
    (4, "tensor_parallel", (4, {})), (3, "tensor_parallel", (2, {})),
    (8, "pipeline", (4, {"micro_batches": 4})), (4, "hybrid", (4, {"dp": 2, "tp": 2})),
    (3, "hybrid", (3, {"dp": 3, "tp": 1})), (4, "single", (1, {}))])
def test_layout_fits_each_strategy_to_the_model(workers, strategy, expected):
    assert cli.layout(strategy, workers) == expected


def test_train_command_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "minidist", "train", "--strategy",
                          "data_parallel", "--workers", "2", "--steps", "30"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "data_parallel" in out and "test acc" in out


def test_doctor_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "minidist", "doctor"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for line in ["python", "numpy", "numba", "cpu cores", "cuda gpu", "cuda sim", "mpi"]:
        assert line in out


# ---- the tour of the tiny GPT (--model gpt) -------------------------------------------------
def test_gpt_tour_runs_every_strategy_that_fits_a_transformer(tmp_path, capsys, monkeypatch):
    model_fn, X, Y, X_val, y_val, settings = tour.problem("gpt")
    X_val, y_val = X_val[:64], y_val[:64]  # 64 of the 969 validation windows: faster
    monkeypatch.setattr(tour, "problem", lambda model, seed: (model_fn, X, Y, X_val, y_val,
                                                              settings))
    drawn = []  # the figures themselves: test_tour_prints_one_table_and_saves_figures
    monkeypatch.setattr(tour, "save_figures", lambda histories, rows, outdir: drawn.append(
        {label: len(h.loss) for label, h in histories.items()}) or [])
    rows = cli.tour(workers=2, backend="thread", steps=12, outdir=str(tmp_path), model="gpt")
    out = capsys.readouterr().out
    expected = cli.TOUR
    assert [r["strategy"] for r in rows] == [label for label, _, _ in expected]
    uniform = np.log(model_fn.args[0])  # the loss of a uniform guess over the vocabulary
    for (_, strategy, options), row in zip(expected, rows, strict=True):
        asynchronous = options.get("consistency") in ("asp", "ssp")
        assert row["same as single"].startswith("differs" if asynchronous else "yes"), row
        assert 0.0 < row["val loss"] < uniform + 0.1 and 0.0 <= row["val acc"] <= 1.0, row
        assert row["MB sent/worker"] > 0 or strategy == "single"
        assert "test acc" not in row
    # the metric: the final model's loss and next-character accuracy on the held-out windows
    with threadpool_limits(1):  # as the tour does: default BLAS threads thrash on 2 cores
        model = train(model_fn, X, Y, steps=12, seed=0, **settings).model()
        logits = model.forward(X_val)
    assert rows[0]["val loss"] == pytest.approx(model.loss(X_val, y_val), rel=1e-12)
    assert rows[0]["val acc"] == pytest.approx(np.mean(logits.argmax(axis=-1) == y_val))
    assert "val loss" in out and "nats per character" in out and "12 steps of 16" in out
    assert f"(64 windows; a uniform guess scores ln {model_fn.args[0]} = {uniform:.2f})" in out
    assert "tensor parallelism splits the heads, the MLP and the vocabulary" in out
    assert drawn == [{row["strategy"]: 12 for row in rows}]


def test_gpt_tour_data_are_shifted_windows_of_the_corpus():
    model_fn, X, Y, X_val, Y_val, settings = tour.problem("gpt")
    tokenizer = data.CharTokenizer(data.load_text())
    ids = tokenizer.encode(data.load_text())
    T = tour.GPT["context"]
    assert X.shape[1] == T and model_fn.args == (tokenizer.vocab_size,)
    np.testing.assert_array_equal(X[3], ids[3 * T:4 * T])
    np.testing.assert_array_equal(Y[3], ids[3 * T + 1:4 * T + 1])
    n_val = int(np.ceil(0.1 * len(ids)))  # the validation windows: the last 10% of the ids
    np.testing.assert_array_equal(X_val[0], ids[-n_val:][:T])
    last = len(X) * T  # the last training target: before the validation ids start
    np.testing.assert_array_equal(Y[-1], ids[last - T + 1:last + 1])
    assert last + 1 <= len(ids) - n_val < last + 1 + T


def test_gpt_pipeline_stages_are_capped_at_the_models_layers():
    layers = len(tour.problem("gpt")[0]().layers)  # embedding, blocks, final norm, head
    assert layers == tour.GPT["n_layers"] + 3
    assert cli.layout("pipeline", 8, "gpt") == (layers, {"micro_batches": 4})
    assert cli.layout("pipeline", 2, "gpt") == (2, {"micro_batches": 4})


def test_model_option_is_parsed_and_checked(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tour", lambda *args: calls.append(args))
    assert cli.main(["tour", "--model", "gpt", "--workers", "2"]) == 0
    assert cli.main(["demo"]) == 0  # --model mlp and the steps of the model, by default
    assert calls == [(2, "process", None, 0, "minidist-tour", "gpt"),
                     (4, "process", None, 0, "minidist-tour", "mlp")]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tour", "--model", "cnn"])
    assert exit_info.value.code == 2
    assert "--model: invalid choice: 'cnn' (choose from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model 'cnn'; allowed: mlp, gpt"):
        cli.tour(workers=2, backend="thread", steps=2, model="cnn")
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        cli.train_one("single", model="cnn")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tour", "--help"])
    assert exit_info.value.code == 0
    assert "--model {mlp,gpt}" in capsys.readouterr().out


def test_the_gpt_tour_splits_heads_and_sequence_over_ranks_that_divide_them():
    assert cli.layout("tensor_parallel", 4, "gpt") == (4, {"sequence_parallel": True})
    assert cli.layout("tensor_parallel", 3, "gpt") == (2, {"sequence_parallel": True})
    assert cli.layout("hybrid", 4, "gpt") == (4, {"dp": 2, "tp": 2, "sequence_parallel": True})
    assert cli.layout("tensor_parallel", 3, "mlp")[1] == {}
