import subprocess
import sys

import pytest

from minidist import cli


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
